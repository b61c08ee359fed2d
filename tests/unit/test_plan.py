"""The data plan on its own: equal steps per rank, exactly-once reads, exact resume."""

import itertools

import pytest

from orchestrator.data.plan import Plan

pytestmark = pytest.mark.unit

COUNTS = [37, 50, 12, 50, 41]  # uneven shards, 190 samples


def _plan(**kw):
    args = dict(counts=COUNTS, seed=3, epoch=0, world_size=2, batch_size=8, num_workers=2, shuffle_buffer=16)
    return Plan(**{**args, **kw})


def _delivered(plan, rank, batches=None):
    """(shard, offset) in the canonical order a rank delivers them."""
    orders = [plan.sample_order(rank, w) for w in range(max(1, plan.num_workers))]
    out = []
    for w, i in plan.schedule()[:batches]:
        out.extend(orders[w][i * plan.batch_size : (i + 1) * plan.batch_size])
    return out


@pytest.mark.parametrize("world,workers,batch", [(1, 0, 8), (2, 2, 8), (3, 2, 16), (4, 3, 4), (8, 4, 2)])
def test_every_rank_gets_the_same_steps_and_no_sample_twice(world, workers, batch):
    plan = _plan(world_size=world, num_workers=workers, batch_size=batch)
    per_rank = [_delivered(plan, r) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    flat = list(itertools.chain.from_iterable(per_rank))
    assert len(flat) == len(set(flat))
    assert 0 <= sum(COUNTS) - len(flat) == plan.dropped_now < world * batch


def test_fewer_shards_than_ranks_times_workers():
    plan = Plan([30, 30], seed=0, epoch=0, world_size=4, batch_size=3, num_workers=3, shuffle_buffer=100)
    per_rank = [_delivered(plan, r) for r in range(4)]
    assert [len(p) for p in per_rank] == [15] * 4
    assert len(set(itertools.chain.from_iterable(per_rank))) == 60


def test_epochs_permute_shards_and_seed_fixes_order():
    a, b = _plan(epoch=0), _plan(epoch=1)
    assert a.shard_order != b.shard_order or _delivered(a, 0) != _delivered(b, 0)
    assert _delivered(_plan(epoch=1), 0) == _delivered(b, 0)
    assert _delivered(_plan(seed=4), 0) != _delivered(a, 0)


def test_shuffle_buffer_mixes_within_chunks_only():
    plan = _plan(world_size=1, num_workers=0, shuffle_buffer=10)
    order = _delivered(plan, 0)
    for chunk_start in range(0, 40, 10):
        chunk = order[chunk_start : chunk_start + 10]
        assert len({s for s, _ in chunk}) <= 2  # at most a shard boundary inside
    assert order != sorted(order)


@pytest.mark.parametrize("consumed", [0, 1, 5, 10])
@pytest.mark.parametrize("new", [(1, 8, 0), (3, 4, 2), (2, 8, 2), (5, 2, 1)])
def test_replan_reads_every_remaining_sample_exactly_once(consumed, new):
    old = _plan()
    done = list(itertools.chain.from_iterable(_delivered(old, r, consumed) for r in range(old.world_size)))
    world, batch, workers = new
    fresh = old.replan(consumed, world_size=world, batch_size=batch, num_workers=workers, shuffle_buffer=16)
    rest = list(itertools.chain.from_iterable(_delivered(fresh, r) for r in range(world)))
    assert len(rest) == len(set(rest)) and not set(rest) & set(done)
    missing = sum(COUNTS) - len(done) - len(rest)
    assert missing == fresh.dropped_now < world * batch  # only a stated remainder < one global batch


def test_plan_round_trips_through_a_dict():
    plan = _plan().replan(3, world_size=3, batch_size=4, num_workers=1, shuffle_buffer=7)
    again = Plan.from_dict(COUNTS, plan.to_dict())
    assert _delivered(again, 2) == _delivered(plan, 2)
