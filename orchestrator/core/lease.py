"""The one lease: acquire, heartbeat, take over when stale, release by owner, over a small store.

A lease is a record naming its owner and when it expires. The holder renews it from a
heartbeat thread; a record past its expiry (or one a ``stale`` test rejects, such as a
killed process of this machine) is taken over by the next taker. Renewal and release
compare the owner first, so a holder that lost its lease never extends or deletes the
record of the one that took over; it sets ``lost`` and calls ``on_lost`` instead.

The stores here have no atomic create-if-absent, so a taker writes, waits ``settle_s`` and
reads back: of two takers that wrote at once, the one whose record stayed wins. The job
lock keeps its record in a JSON object (``JsonStore``); the promotion lock in a tag of the
registered model (``orchestrator.driver.promote``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.core import storage
from orchestrator.core.errors import FlowppError
from orchestrator.core.redact import first_line

__all__ = ["Holder", "JsonStore", "Lease", "LeaseHeld", "LeaseLost", "LeaseStore", "acquire", "new_owner"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """A lease record: who holds it, until when (wall clock), when it was last renewed, and more."""

    owner: str
    expires: float
    beat: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def live(self) -> bool:
        return self.expires > time.time()


class LeaseStore(Protocol):
    """Where one lease record lives. ``where`` names it in messages."""

    where: str

    def read(self) -> Holder | None: ...

    def write(self, holder: Holder) -> None: ...

    def delete(self) -> None: ...


class LeaseHeld(FlowppError):
    """A live owner holds the lease; ``holder`` is its record (None: it vanished meanwhile)."""

    def __init__(self, where: str, holder: Holder | None):
        super().__init__(f"{where} is held by {holder.owner if holder else 'another taker'}")
        self.holder = holder


class LeaseLost(FlowppError):
    """This owner no longer holds the lease: it ran out, and another owner took it over."""


def new_owner() -> str:
    """``host:pid:random``: unique, and tells whether a holder was a process of this machine."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JsonStore:
    """A lease record as a JSON object at an fsspec URL: ``{"owner", "heartbeat", "expires", **info}``.

    A record without ``expires`` (written before it existed) expires ``ttl_s`` after its heartbeat.
    """

    def __init__(self, url: str, options: storage.StorageOptions | None, ttl_s: float):
        self.where, self.options, self.ttl_s = url, options, ttl_s

    def read(self) -> Holder | None:
        if storage.object_size(self.where, self.options) is None:
            return None
        try:
            record = json.loads(storage.read_bytes(self.where, self.options))
            beat = float(record.pop("heartbeat", 0))
            expires = float(record.pop("expires", beat + self.ttl_s))
            return Holder(str(record.pop("owner", "")), expires, beat, record)
        except (ValueError, TypeError, AttributeError, FileNotFoundError):
            return None  # a half-written or vanished record counts as none

    def write(self, holder: Holder) -> None:
        record = {"owner": holder.owner, "heartbeat": holder.beat, "expires": holder.expires, **holder.info}
        storage.write_bytes(self.where, json.dumps(record).encode(), self.options)

    def delete(self) -> None:
        fs, path = storage.filesystem(self.where, self.options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)


class Lease:
    """A held lease, renewed every ``beat_s`` (default a third of ``ttl_s``) until released."""

    def __init__(
        self,
        store: LeaseStore,
        ttl_s: float,
        *,
        beat_s: float | None = None,
        info: dict | None = None,
        on_lost: Callable[[Holder | None], Any] | None = None,
    ):
        self.store, self.ttl_s, self.beat_s = store, ttl_s, beat_s or ttl_s / 3
        self.owner, self.info, self.on_lost = new_owner(), dict(info or {}), on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{store.where}", daemon=True)

    def record(self) -> Holder:
        now = time.time()
        return Holder(self.owner, now + self.ttl_s, now, self.info)

    def held(self) -> bool:
        holder = self.store.read()
        return holder is not None and holder.owner == self.owner

    def ensure_held(self) -> None:
        """Raise ``LeaseLost`` unless this owner still holds the lease (checked before acting on it)."""
        if self.lost.is_set() or not self.held():
            self.lost.set()
            raise LeaseLost(f"{self.store.where}: the lease of {self.owner} was lost (it ran out and was taken over)")

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                holder = self.store.read()
                if holder is None or holder.owner != self.owner:  # read, compare, renew: never another's record
                    self.lost.set()
                    if self.on_lost is not None:
                        self.on_lost(holder)
                    return
                self.store.write(self.record())
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the lease has time left
                log.warning("%s: lease renewal failed, retrying: %s", self.store.where, first_line(exc))

    def release(self) -> None:
        """Stop renewing, and delete the record if it still names this owner."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.beat_s + 5)
        try:
            if self.held():
                self.store.delete()
        except Exception as exc:  # noqa: BLE001 - never hides the body's own error; the record expires
            log.warning("%s: lease not released (it expires in time): %s", self.store.where, first_line(exc))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(
    store: LeaseStore,
    ttl_s: float,
    *,
    settle_s: float = 1.0,
    stale: Callable[[Holder], bool] = lambda holder: False,
    **lease: Any,
) -> Lease:
    """Take the lease and start its heartbeat, or raise ``LeaseHeld`` if a live owner holds it."""
    held = store.read()
    if held is not None and held.live() and not stale(held):
        raise LeaseHeld(store.where, held)
    if held is not None:
        log.warning("%s: taking over a stale lease of %s", store.where, held.owner)
    taken = Lease(store, ttl_s, **lease)
    store.write(taken.record())
    time.sleep(settle_s)  # a taker that read "free" at the same time has written by now; the last write wins
    now = store.read()
    if now is None or now.owner != taken.owner:
        raise LeaseHeld(store.where, now)
    taken._thread.start()
    return taken
