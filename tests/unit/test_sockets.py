"""The session's loopback watch (tests/sockets.py) finds a Ray-named process listening off the
allowed addresses, by its socket in /proc; it ignores older processes and allowed addresses.

Nothing here leaves loopback: 127.0.0.2 plays the routable address (``allowed`` takes only
127.0.0.1), so the whole path runs (the tables, the owner by inode, the command, the start time).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests import sockets

pytestmark = pytest.mark.unit

LISTENER = "import socket, sys, time; s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(); " \
           "print(s.getsockname()[1], flush=True); time.sleep(60)"  # fmt: skip


def listen(address: str, name: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, address, name], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_watch_reports_a_ray_process_listening_off_loopback_and_nothing_else():
    before, before_port = listen("127.0.0.2", "old-raylet")  # started before the watch
    time.sleep(1.2)
    watch = sockets.Watch(interval_s=0.1, allowed=lambda address: address == "127.0.0.1").start()
    procs = [before]
    try:
        offender, port = listen("127.0.0.2", "fake-raylet")
        allowed, allowed_port = listen("127.0.0.1", "other-raylet")
        innocent, innocent_port = listen("127.0.0.2", "not-a-ray-part")
        procs += [offender, allowed, innocent]
        time.sleep(0.5)
        found = watch.stop()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [(f.address, f.port, f.pid) for f in found] == [("127.0.0.2", port, offender.pid)]
    assert found[0].command.endswith("fake-raylet") and f"127.0.0.2:{port} (pid {offender.pid}" in str(found[0])
    assert sockets.is_loopback("127.0.0.1") and sockets.is_loopback("::1") and sockets.is_loopback("::ffff:127.0.0.1")
    assert not sockets.is_loopback("192.0.2.7") and not sockets.is_loopback("0.0.0.0")
