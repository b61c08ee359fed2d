"""The one lease: acquire, heartbeat, take over when stale, release by owner, over a small store.

A lease is a record naming its owner and when it expires. The holder renews it from a
heartbeat thread; a record past its expiry (or one a ``stale`` test rejects, such as a
killed process of this machine) is taken over by the next taker.

Every change is conditional on the version the changer last read: a taker creates the record
only if there is none, takes over a stale one only if it is still the version it judged stale,
and each renewal and the release apply only to the version the holder wrote last. So of two
takers exactly one wins, and a holder that was cut off for longer than its lease finds, on its
next renewal, that the record changed: it never extends or deletes the record of the one that
took over; it sets ``lost`` and calls ``on_lost`` instead. A condition that fails after a retry
of a change that did land (its reply was lost) is told apart by the owner: only this holder
writes its own owner id.

A store whose changes are not atomic (``atomic = False``: a store that ignores conditions, or
the registered model's tags of the promotion lock) gets the same checks by reading first, and a
taker then writes, waits ``settle_s`` and reads back: of two takers that wrote at once, the one
whose record stayed wins. The job lock keeps its record in a JSON object (``JsonStore``), the
promotion lock in a tag of the registered model (``orchestrator.driver.promote``).
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
    """Where one lease record lives, with a version per write. ``where`` names it in messages;
    ``atomic``: whether ``create``, ``replace`` and ``delete`` are enforced by the store itself."""

    where: str
    atomic: bool

    def read(self) -> tuple[Holder, str] | None:
        """The record and its version, or None if there is none."""

    def create(self, holder: Holder) -> str:
        """Write a first record; ``storage.PreconditionFailed`` if one exists. Its version."""

    def replace(self, holder: Holder, version: str) -> str:
        """Overwrite the record if still at ``version``; ``storage.PreconditionFailed`` if not."""

    def delete(self, version: str) -> None:
        """Delete the record if still at ``version``; ``storage.PreconditionFailed`` if not."""


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
    """A lease record as a JSON object at an fsspec URL: ``{"owner", "heartbeat", "expires", **info}``,
    changed by the conditional writes of ``orchestrator.core.storage`` (``atomic=False``: plain
    writes, for a store that ignores conditions, each checked by a read first).

    A record without ``expires`` (written before it existed) expires ``ttl_s`` after its heartbeat.
    """

    def __init__(self, url: str, options: storage.StorageOptions | None, ttl_s: float, atomic: bool = True):
        self.where, self.options, self.ttl_s, self.atomic = url, options, ttl_s, atomic

    def _parse(self, data: bytes) -> Holder | None:
        try:
            record = json.loads(data)
            beat = float(record.pop("heartbeat", 0))
            expires = float(record.pop("expires", beat + self.ttl_s))
            return Holder(str(record.pop("owner", "")), expires, beat, record)
        except (ValueError, TypeError, AttributeError):
            return None

    def read(self) -> tuple[Holder, str] | None:
        found = storage.read_versioned(self.where, self.options)
        if found is None:
            return None
        holder = self._parse(found[0])
        # a record that does not parse (half-written by an old driver) is stale: taken over at its version
        return (holder or Holder("(unreadable record)", 0.0), found[1])

    @staticmethod
    def _bytes(holder: Holder) -> bytes:
        record = {"owner": holder.owner, "heartbeat": holder.beat, "expires": holder.expires, **holder.info}
        return json.dumps(record).encode()

    def _check(self, version: str | None) -> None:
        """Without atomic writes: the condition, checked by a read (a race can still slip past)."""
        found = storage.read_versioned(self.where, self.options)
        if (found[1] if found else None) != version:
            raise storage.PreconditionFailed(f"{self.where}: the lease record changed")

    def create(self, holder: Holder) -> str:
        if self.atomic:
            return storage.create_exclusive(self.where, self._bytes(holder), self.options)
        self._check(None)
        return self._write(holder)

    def replace(self, holder: Holder, version: str) -> str:
        if self.atomic:
            return storage.replace_if(self.where, self._bytes(holder), version, self.options)
        self._check(version)
        return self._write(holder)

    def delete(self, version: str) -> None:
        if self.atomic:
            return storage.delete_if(self.where, version, self.options)
        self._check(version)
        fs, path = storage.filesystem(self.where, self.options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    def _write(self, holder: Holder) -> str:
        storage.write_bytes(self.where, self._bytes(holder), self.options)
        found = storage.read_versioned(self.where, self.options)
        return found[1] if found else ""


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
        self.version = ""
        """The version of the record this owner wrote last: every change is conditional on it."""
        self._last_seen: Holder | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{store.where}", daemon=True)

    def record(self) -> Holder:
        now = time.time()
        return Holder(self.owner, now + self.ttl_s, now, self.info)

    def held(self) -> bool:
        found = self.store.read()
        return found is not None and found[0].owner == self.owner

    def ensure_held(self) -> None:
        """Raise ``LeaseLost`` unless this owner still holds the lease (checked before acting on it)."""
        if self.lost.is_set() or not self.held():
            self.lost.set()
            raise LeaseLost(f"{self.store.where}: the lease of {self.owner} was lost (it ran out and was taken over)")

    def _ours(self) -> bool:
        """After a failed condition: whether the record is this owner's after all (a change that
        landed, and whose reply was lost, then retried); if so its version is adopted."""
        found = self.store.read()
        if found is not None and found[0].owner == self.owner:
            self.version = found[1]
            return True
        self._last_seen = found[0] if found else None
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                try:
                    self.version = self.store.replace(self.record(), self.version)
                    continue
                except storage.PreconditionFailed:
                    if self._ours():
                        continue
                self.lost.set()  # the record changed: taken over (or deleted) while this holder was away
                if self.on_lost is not None:
                    self.on_lost(self._last_seen)
                return
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the lease has time left
                log.warning("%s: lease renewal failed, retrying: %s", self.store.where, first_line(exc))

    def release(self) -> None:
        """Stop renewing, and delete the record if it is still the one this owner wrote."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.beat_s + 5)
        if self.lost.is_set():
            return
        try:
            try:
                self.store.delete(self.version)
            except storage.PreconditionFailed:
                if self._ours():
                    self.store.delete(self.version)
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
    found = store.read()
    taken = Lease(store, ttl_s, **lease)
    try:
        if found is None:
            taken.version = store.create(taken.record())
        else:
            held, version = found
            if held.live() and not stale(held):
                raise LeaseHeld(store.where, held)
            log.warning("%s: taking over a stale lease of %s", store.where, held.owner)
            taken.version = store.replace(taken.record(), version)  # only if nobody else took it meanwhile
    except storage.PreconditionFailed:
        if not taken._ours():  # another taker won the race (or a retried write of ours landed)
            raise LeaseHeld(store.where, taken._last_seen) from None
    if not store.atomic:
        time.sleep(settle_s)  # a taker that read "free" at the same time has written by now; the last write wins
        now = store.read()
        if now is None or now[0].owner != taken.owner:
            raise LeaseHeld(store.where, now[0] if now else None)
        taken.version = now[1]
    taken._thread.start()
    return taken
