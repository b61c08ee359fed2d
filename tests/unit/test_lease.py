"""The one lease (orchestrator.core.lease) over its JSON store on local files: acquire by a
conditional create, refusal, renewal, loss to a taker, stale take-over at the version judged
stale, release by owner only; and the same store without atomic writes (settle, read back)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest

from orchestrator.core import lease, storage

pytestmark = pytest.mark.unit


@pytest.fixture
def store(tmp_path):
    return lease.JsonStore(str(tmp_path / "lock.json"), None, ttl_s=2.0)


def owner(store) -> str | None:
    found = store.read()
    return found[0].owner if found else None


def put(store, holder: lease.Holder) -> None:
    """Another owner's record, written over whatever is there (as a taker after a take-over would)."""
    record = {"owner": holder.owner, "heartbeat": holder.beat, "expires": holder.expires}
    storage.write_bytes(store.where, json.dumps(record).encode())


def test_a_live_lease_refuses_a_second_taker_until_released(store):
    first = lease.acquire(store, 2.0, info={"ray_job": "raysubmit_1"})
    with pytest.raises(lease.LeaseHeld) as refused:
        lease.acquire(store, 2.0)
    assert refused.value.holder.owner == first.owner and refused.value.holder.info == {"ray_job": "raysubmit_1"}
    first.release()
    assert store.read() is None
    with lease.acquire(store, 2.0) as second:
        assert second.owner != first.owner and owner(store) == second.owner
    assert store.read() is None


def test_of_takers_racing_for_a_free_lease_exactly_one_wins(store):
    barrier, won, refused = threading.Barrier(8), [], []

    def take() -> None:
        barrier.wait()
        try:
            won.append(lease.acquire(store, 5.0))
        except lease.LeaseHeld as exc:
            refused.append(exc.holder)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert owner(store) == won[0].owner
    won[0].release()


def test_of_takers_racing_for_a_stale_lease_exactly_one_wins(store):
    put(store, lease.Holder("elsewhere:1:x", time.time() - 1, time.time() - 3))
    barrier, won = threading.Barrier(6), []

    def take() -> None:
        barrier.wait()
        with contextlib.suppress(lease.LeaseHeld):
            won.append(lease.acquire(store, 5.0))

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and owner(store) == won[0].owner
    won[0].release()


def test_the_heartbeat_renews_past_the_ttl(store):
    with lease.acquire(store, 0.6) as held:
        first = store.read()[0]
        time.sleep(1.5)  # more than twice the ttl
        now = store.read()[0]
        assert now.owner == held.owner and now.expires > first.expires and now.live()
        held.ensure_held()


def test_a_holder_that_lost_its_lease_never_overwrites_or_deletes_the_takers_record(store):
    seen: list = []
    lost = threading.Event()
    held = lease.acquire(store, 0.6, on_lost=lambda h: (seen.append(h), lost.set()))
    put(store, lease.Holder("elsewhere:1:x", time.time() + 600, time.time()))  # as if ours ran out, and was taken
    assert lost.wait(3.0) and seen[0].owner == "elsewhere:1:x"
    time.sleep(0.5)
    assert owner(store) == "elsewhere:1:x"  # no renewal after the loss
    with pytest.raises(lease.LeaseLost, match="was lost"):
        held.ensure_held()
    held.release()
    assert owner(store) == "elsewhere:1:x"  # release deletes only its own record


def test_stale_records_are_taken_over_and_the_stale_test_is_asked(store):
    put(store, lease.Holder("elsewhere:1:x", time.time() - 1, time.time() - 3))
    lease.acquire(store, 2.0).release()
    put(store, lease.Holder("elsewhere:2:y", time.time() + 600, time.time()))
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(store, 2.0)
    lease.acquire(store, 2.0, stale=lambda h: h.owner == "elsewhere:2:y").release()


def test_a_record_without_expiry_expires_a_ttl_after_its_heartbeat(store, tmp_path):
    (tmp_path / "lock.json").write_text(json.dumps({"owner": "old:1:z", "heartbeat": time.time() - 5}))
    assert owner(store) == "old:1:z" and not store.read()[0].live()
    (tmp_path / "lock.json").write_text("{half a rec")
    assert not store.read()[0].live()  # unreadable: stale, so taken over (not read as free and overwritten blindly)
    lease.acquire(store, 2.0).release()


class FaultyStore(lease.JsonStore):
    """The JSON store with faults injected: the next ``fail_replaces`` renewals and every delete while
    ``fail_deletes`` raise; ``cut`` fails every call (a holder cut off from the store); ``lost_reply``
    makes the next create land and then answer as a retry of it would (412: it exists)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_replaces, self.fail_deletes, self.cut, self.lost_reply = 0, False, threading.Event(), False

    def _gate(self) -> None:
        if self.cut.is_set():
            raise OSError("injected: cut off from the store")

    def read(self):
        self._gate()
        return super().read()

    def create(self, holder):
        self._gate()
        version = super().create(holder)
        if self.lost_reply:
            self.lost_reply = False
            raise storage.PreconditionFailed("injected: the retried create found the object")
        return version

    def replace(self, holder, version):
        self._gate()
        if self.fail_replaces:
            self.fail_replaces -= 1
            raise OSError("injected: the store did not answer")
        return super().replace(holder, version)

    def delete(self, version):
        self._gate()
        if self.fail_deletes:
            raise OSError("injected: the store did not answer")
        super().delete(version)


@pytest.fixture
def faulty(tmp_path):
    return FaultyStore(str(tmp_path / "lock.json"), None, ttl_s=2.0)


def test_a_failed_renewal_is_retried_at_the_next_beat(faulty, caplog):
    with lease.acquire(faulty, 0.9) as held:
        first = faulty.read()[0]
        faulty.fail_replaces = 1  # the next renewal fails
        time.sleep(1.2)  # four beats: one fails, the others renew
        assert "lease renewal failed, retrying: OSError: injected: the store did not answer" in caplog.text
        now = faulty.read()[0]
        assert now.owner == held.owner and now.expires > first.expires and not held.lost.is_set()


def test_a_holder_cut_off_past_its_ttl_finds_the_lease_taken_and_stops(faulty):
    lost = threading.Event()
    held = lease.acquire(faulty, 0.6, on_lost=lambda h: lost.set())
    faulty.cut.set()  # the holder cannot reach the store: its renewals fail
    time.sleep(0.8)  # past its ttl
    taker_store = lease.JsonStore(faulty.where, None, ttl_s=2.0)  # another driver, which can
    taker = lease.acquire(taker_store, 5.0)
    taken = taker_store.read()
    faulty.cut.clear()  # the first holder is back: its next renewal is refused (the record changed)
    assert lost.wait(2.0)
    time.sleep(0.5)
    now = taker_store.read()
    assert now[0].owner == taker.owner and now[0].expires >= taken[0].expires  # untouched by the old holder
    held.release()
    assert owner(taker_store) == taker.owner
    taker.release()


def test_a_retried_create_that_finds_its_own_record_holds_the_lease(faulty):
    faulty.lost_reply = True
    with lease.acquire(faulty, 2.0) as held:
        assert owner(faulty) == held.owner and held.version == faulty.read()[1]
    assert faulty.read() is None


def test_a_release_the_store_refuses_is_a_warning_and_the_record_expires(faulty, caplog):
    held = lease.acquire(faulty, 0.6)
    faulty.fail_deletes = True
    held.release()  # no exception: release runs on the way out of a body that may have failed
    assert "lease not released (it expires in time): OSError: injected" in caplog.text
    assert owner(faulty) == held.owner
    time.sleep(0.7)
    assert not faulty.read()[0].live()  # no heartbeat since the release


class RacedStore(lease.JsonStore):
    """Without atomic writes: a racer's record lands right after each write of another owner
    (a taker that read "free" at the same moment, and wrote last)."""

    def __init__(self, *args, racer: lease.Holder, **kwargs):
        super().__init__(*args, atomic=False, **kwargs)
        self.racer = racer

    def _write(self, holder):
        version = super()._write(holder)
        if holder.owner != self.racer.owner:
            put(self, self.racer)
        return version


def test_without_atomic_writes_the_taker_that_wrote_last_during_the_settle_wins(tmp_path):
    racer = lease.Holder("elsewhere:3:z", time.time() + 600, time.time())
    raced = RacedStore(str(tmp_path / "lock.json"), None, ttl_s=2.0, racer=racer)
    with pytest.raises(lease.LeaseHeld) as refused:
        lease.acquire(raced, 2.0, settle_s=0.05)
    assert refused.value.holder.owner == "elsewhere:3:z" and owner(raced) == "elsewhere:3:z"
    plain = lease.JsonStore(str(tmp_path / "plain.json"), None, ttl_s=2.0, atomic=False)
    with lease.acquire(plain, 2.0, settle_s=0.05) as held:  # the fallback still takes and renews a free lease
        assert owner(plain) == held.owner
        with pytest.raises(lease.LeaseHeld):
            lease.acquire(plain, 2.0, settle_s=0.05)
    assert plain.read() is None
