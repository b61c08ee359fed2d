"""Loopback only: a watch over the listening sockets of the Ray processes the tests start.

A background thread reads ``/proc/net/tcp`` and ``/proc/net/tcp6`` every ``interval_s``. A
listening socket on an address other than loopback is traced to its process (once per socket);
if that process is Ray's (its command line names a Ray part) and was started after the watch
began, it is recorded. The session fails at its end on any record, listing each socket.

Reading the two tables costs well under a millisecond; only a socket not yet seen off loopback
sends the watch through ``/proc/*/fd`` to find its owner.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RAY_PARTS = re.compile(r"raylet|gcs_server|ray/dashboard|dashboard\.py|default_worker\.py|ray::|log_monitor|"
                       r"runtime_env/agent|ray/_private|ray start|ray_client_server|monitor\.py")  # fmt: skip
LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pid: int
    command: str

    def __str__(self) -> str:
        return f"{self.address}:{self.port} (pid {self.pid}: {self.command[:160]})"


def _address(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    return str(ipaddress.IPv6Address(words))


def listening() -> dict[str, tuple[str, int]]:
    """{socket inode: (address, port)} of every listening TCP socket of this machine."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN:
                ip, port = fields[1].split(":")
                found[fields[9]] = (_address(ip), int(port, 16))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def owner(inode: str) -> int | None:
    """The pid holding socket ``inode``, by its descriptors in /proc (None once it is gone)."""
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return int(pid)
        except OSError:
            continue
    return None


def _started_at(pid: int) -> float:
    """The process's start time (wall clock)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class Watch:
    """Records the non-loopback listeners of processes matching ``parts`` started since ``start()``."""

    def __init__(self, interval_s: float = 1.0, parts: re.Pattern = RAY_PARTS, allowed=is_loopback):
        self.interval_s, self.parts, self.allowed = interval_s, parts, allowed
        self.offenders: dict[tuple[str, int, int], Listener] = {}
        self._checked: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loopback-watch", daemon=True)
        self.since = time.time()

    def start(self) -> Watch:
        self.since = time.time() - 1.0
        self._thread.start()
        return self

    def scan(self) -> None:
        for inode, (address, port) in listening().items():
            if inode in self._checked or self.allowed(address):
                continue
            self._checked.add(inode)
            pid = owner(inode)
            if pid is None:
                continue
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                started = _started_at(pid)
            except (OSError, ValueError, IndexError):
                continue
            if started >= self.since and self.parts.search(command):
                self.offenders[(address, port, pid)] = Listener(address, port, pid, command.strip())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan()
            except Exception:  # noqa: BLE001, S112 - a table read mid-change; the next scan sees it
                continue

    def stop(self) -> list[Listener]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.scan()
        return sorted(self.offenders.values(), key=str)
