"""The one lease (orchestrator.core.lease) over its JSON store on local files: acquire,
refusal, renewal, loss to a taker, stale take-over and release by owner only."""

from __future__ import annotations

import json
import threading
import time

import pytest

from orchestrator.core import lease

pytestmark = pytest.mark.unit


@pytest.fixture
def store(tmp_path):
    return lease.JsonStore(str(tmp_path / "lock.json"), None, ttl_s=2.0)


def test_a_live_lease_refuses_a_second_taker_until_released(store):
    first = lease.acquire(store, 2.0, settle_s=0.05, info={"ray_job": "raysubmit_1"})
    with pytest.raises(lease.LeaseHeld) as refused:
        lease.acquire(store, 2.0, settle_s=0.05)
    assert refused.value.holder.owner == first.owner and refused.value.holder.info == {"ray_job": "raysubmit_1"}
    first.release()
    assert store.read() is None
    with lease.acquire(store, 2.0, settle_s=0.05) as second:
        assert second.owner != first.owner and store.read().owner == second.owner
    assert store.read() is None


def test_the_heartbeat_renews_past_the_ttl(store):
    with lease.acquire(store, 0.6, settle_s=0.05) as held:
        first = store.read()
        time.sleep(1.5)  # more than twice the ttl
        now = store.read()
        assert now.owner == held.owner and now.expires > first.expires and now.live()
        held.ensure_held()


def test_a_holder_that_lost_its_lease_never_overwrites_or_deletes_the_takers_record(store):
    seen: list = []
    lost = threading.Event()
    held = lease.acquire(store, 0.6, settle_s=0.05, on_lost=lambda h: (seen.append(h), lost.set()))
    taker = lease.Holder("elsewhere:1:x", time.time() + 600, time.time())
    store.write(taker)  # as if our lease had run out and another owner took over
    assert lost.wait(3.0) and seen[0].owner == "elsewhere:1:x"
    time.sleep(0.5)
    assert store.read().owner == "elsewhere:1:x"  # no renewal after the loss
    with pytest.raises(lease.LeaseLost, match="was lost"):
        held.ensure_held()
    held.release()
    assert store.read().owner == "elsewhere:1:x"  # release deletes only its own record


def test_stale_records_are_taken_over_and_the_stale_test_is_asked(store):
    store.write(lease.Holder("elsewhere:1:x", time.time() - 1, time.time() - 3))
    lease.acquire(store, 2.0, settle_s=0.05).release()
    store.write(lease.Holder("elsewhere:2:y", time.time() + 600, time.time()))
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(store, 2.0, settle_s=0.05)
    lease.acquire(store, 2.0, settle_s=0.05, stale=lambda h: h.owner == "elsewhere:2:y").release()


def test_a_record_without_expiry_expires_a_ttl_after_its_heartbeat(store, tmp_path):
    (tmp_path / "lock.json").write_text(json.dumps({"owner": "old:1:z", "heartbeat": time.time() - 5}))
    assert store.read().owner == "old:1:z" and not store.read().live()
    (tmp_path / "lock.json").write_text("{half a rec")
    assert store.read() is None


class FaultyStore(lease.JsonStore):
    """The JSON store with faults injected: the next ``fail_writes`` writes and every delete while
    ``fail_deletes`` raise; a ``racer`` record, when set, lands right after each write of another owner
    (a taker that read "free" at the same moment, and wrote last)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_writes, self.fail_deletes, self.racer = 0, False, None

    def write(self, holder):
        if self.fail_writes:
            self.fail_writes -= 1
            raise OSError("injected: the store did not answer")
        super().write(holder)
        if self.racer is not None and holder.owner != self.racer.owner:
            super().write(self.racer)

    def delete(self):
        if self.fail_deletes:
            raise OSError("injected: the store did not answer")
        super().delete()


@pytest.fixture
def faulty(tmp_path):
    return FaultyStore(str(tmp_path / "lock.json"), None, ttl_s=2.0)


def test_a_failed_renewal_is_retried_at_the_next_beat(faulty, caplog):
    with lease.acquire(faulty, 0.9, settle_s=0.05) as held:
        first = faulty.read()
        faulty.fail_writes = 1  # the next renewal fails
        time.sleep(1.2)  # four beats: one fails, the others renew
        assert "lease renewal failed, retrying: OSError: injected: the store did not answer" in caplog.text
        now = faulty.read()
        assert now.owner == held.owner and now.expires > first.expires and not held.lost.is_set()


def test_a_release_the_store_refuses_is_a_warning_and_the_record_expires(faulty, caplog):
    held = lease.acquire(faulty, 0.6, settle_s=0.05)
    faulty.fail_deletes = True
    held.release()  # no exception: release runs on the way out of a body that may have failed
    assert "lease not released (it expires in time): OSError: injected" in caplog.text
    left = faulty.read()
    assert left.owner == held.owner
    time.sleep(0.7)
    assert not faulty.read().live()  # no heartbeat since the release


def test_a_taker_that_wrote_last_during_the_settle_wins_the_race(faulty):
    faulty.racer = lease.Holder("elsewhere:3:z", time.time() + 600, time.time())
    with pytest.raises(lease.LeaseHeld) as refused:
        lease.acquire(faulty, 2.0, settle_s=0.05)
    assert refused.value.holder.owner == "elsewhere:3:z" and faulty.read().owner == "elsewhere:3:z"
