"""The data plan on its own: equal steps per rank, exactly-once reads, the same images at a step
whatever the world size, exact resume."""

import itertools

import pytest

from orchestrator.data.plan import Plan, RankMajorPlan, default_strands

pytestmark = pytest.mark.unit

COUNTS = [37, 50, 12, 50, 41]  # uneven shards, 190 samples


def _plan(**kw):
    args = dict(counts=COUNTS, seed=3, epoch=0, world_size=2, batch_size=8, num_workers=2, shuffle_buffer=16)
    return Plan(**{**args, **kw})


def _steps(plan, rank):
    """(shard, offset) a rank delivers, step by step: each reading worker's part in worker order."""
    parts = [plan.worker_order(rank, w) for w in range(max(1, plan.num_workers))]
    widths = [len(plan.worker_strands(rank, w)) * plan.strand_batch for w in range(len(parts))]
    return [[s for part, n in zip(parts, widths, strict=True) for s in part[i * n : (i + 1) * n]]
            for i in range(plan.num_batches)]  # fmt: skip


def _delivered(plan, rank, steps=None):
    return list(itertools.chain.from_iterable(_steps(plan, rank)[:steps]))


def _global_steps(plan):
    """Each step's global batch, rank after rank."""
    per_rank = [_steps(plan, r) for r in range(plan.world_size)]
    return [[s for r in range(plan.world_size) for s in per_rank[r][i]] for i in range(plan.num_batches)]


@pytest.mark.parametrize("world,workers,batch", [(1, 0, 8), (2, 2, 8), (3, 2, 16), (4, 3, 4), (8, 4, 2)])
def test_every_rank_gets_the_same_steps_and_no_sample_twice(world, workers, batch):
    plan = _plan(world_size=world, num_workers=workers, batch_size=batch, strands=world * (2 if batch % 2 == 0 else 1))
    per_rank = [_steps(plan, r) for r in range(world)]
    assert {len(p) for p in per_rank} == {plan.num_batches} and all(len(s) == batch for p in per_rank for s in p)
    flat = list(itertools.chain.from_iterable(_delivered(plan, r) for r in range(world)))
    assert len(flat) == len(set(flat))
    assert 0 <= sum(COUNTS) - len(flat) == plan.dropped_now < world * batch
    assert all(step == plan.step_order(i) for i, step in enumerate(_global_steps(plan)))


def test_a_step_holds_the_same_images_at_every_world_size_and_worker_count():
    """8 strands, a global batch of 16: on 1, 2, 4 or 8 ranks, with 0 to 3 loader workers."""
    reference = _global_steps(_plan(world_size=1, batch_size=16, num_workers=0, strands=8))
    assert len(reference) == 190 // 16
    for world, workers in [(2, 0), (2, 3), (4, 1), (4, 2), (8, 2)]:
        plan = _plan(world_size=world, batch_size=16 // world, num_workers=workers, strands=8)
        assert _global_steps(plan) == reference, (world, workers)


def test_resumed_on_another_world_size_a_run_reads_on_the_same_steps():
    two = _plan(world_size=2, batch_size=8, num_workers=2, strands=4)
    one = two.relaid(world_size=1, batch_size=16, num_workers=1)
    assert (one.generation, one.num_batches) == (two.generation, two.num_batches)
    assert _global_steps(one)[5:] == _global_steps(two)[5:]
    assert _steps(one, 0)[5] == _steps(two, 0)[5] + _steps(two, 1)[5]


def test_strands_that_do_not_split_among_the_ranks_or_the_batch_are_refused():
    with pytest.raises(ValueError, match="3 strands cannot split among 2 ranks"):
        _plan(world_size=2, strands=3)
    with pytest.raises(ValueError, match="a global batch of 16"):
        _plan(world_size=2, batch_size=8, strands=32)


def test_a_jobs_strands_suit_every_world_size_of_its_range_and_its_loader_workers():
    assert default_strands([8], 64, 4) == 32  # 4 a rank: one a loader worker
    assert default_strands([4, 8], 64, 2) == 16
    assert default_strands([2, 3], 12, 0) == 6
    assert default_strands([1, 2], 8, 2) == 4
    assert default_strands([3], 9, 8) == 9  # no more than the global batch's divisors allow


def test_fewer_shards_than_ranks_times_workers():
    plan = Plan([30, 30], seed=0, epoch=0, world_size=4, batch_size=3, num_workers=3, shuffle_buffer=100, strands=12)
    per_rank = [_delivered(plan, r) for r in range(4)]
    assert [len(p) for p in per_rank] == [15] * 4
    assert len(set(itertools.chain.from_iterable(per_rank))) == 60


def test_a_worker_beyond_the_ranks_strands_reads_nothing():
    plan = _plan(world_size=2, num_workers=3, strands=4)
    assert [len(plan.worker_strands(1, w)) for w in range(3)] == [1, 1, 0]
    assert plan.worker_order(1, 2) == []


def test_epochs_permute_shards_and_seed_fixes_order():
    a, b = _plan(epoch=0), _plan(epoch=1)
    assert a.shard_order != b.shard_order or _delivered(a, 0) != _delivered(b, 0)
    assert _delivered(_plan(epoch=1), 0) == _delivered(b, 0)
    assert _delivered(_plan(seed=4), 0) != _delivered(a, 0)


def test_shuffle_buffer_mixes_within_chunks_only():
    plan = _plan(world_size=1, batch_size=8, num_workers=0, shuffle_buffer=10)
    order = _delivered(plan, 0)
    for chunk_start in range(0, 40, 10):
        chunk = order[chunk_start : chunk_start + 10]
        assert len({s for s, _ in chunk}) <= 2  # at most a shard boundary inside
    assert order != sorted(order)


@pytest.mark.parametrize("consumed", [0, 1, 5, 10])
@pytest.mark.parametrize("new", [(1, 8, 0), (3, 4, 2), (2, 8, 2), (5, 2, 1)])
def test_replan_reads_every_remaining_sample_exactly_once(consumed, new):
    old = _plan()
    done = _delivered(old, 0, consumed) + _delivered(old, 1, consumed)
    world, batch, workers = new
    fresh = old.replan(consumed, world_size=world, batch_size=batch, num_workers=workers, shuffle_buffer=16)
    rest = list(itertools.chain.from_iterable(_delivered(fresh, r) for r in range(world)))
    assert len(rest) == len(set(rest)) and not set(rest) & set(done)
    missing = sum(COUNTS) - len(done) - len(rest)
    assert missing == fresh.dropped_now < world * batch  # only a stated remainder < one global batch


def _rank_major_delivered(plan: RankMajorPlan, consumed: int) -> list:
    """What a rank-major plan (checkpoints before strands) had delivered after ``consumed`` batches
    a rank: each worker's contiguous run, its batches round-robin over the workers."""
    k = max(1, plan.num_workers)
    counts = [plan.num_batches // k + (i < plan.num_batches % k) for i in range(k)]
    schedule = [(w, i) for i in range(max(counts)) for w in range(k) if i < counts[w]][:consumed]
    out = []
    for rank in range(plan.world_size):
        for w, i in schedule:
            start = rank * plan.per_rank + sum(counts[:w]) * plan.batch_size
            run = plan._order(start, start + counts[w] * plan.batch_size)
            out += run[i * plan.batch_size : (i + 1) * plan.batch_size]
    return out


@pytest.mark.parametrize("consumed", [0, 3, 5])
def test_a_checkpoint_of_the_rank_major_layout_replans_its_rest_exactly_once(consumed):
    saved = {"seed": 3, "epoch": 0, "world_size": 2, "batch_size": 8, "num_workers": 2, "shuffle_buffer": 16,
             "generation": 0, "dropped": 0, "segments": [[0, 190]]}  # fmt: skip
    old = Plan.from_dict(COUNTS, saved)
    assert isinstance(old, RankMajorPlan)
    done = _rank_major_delivered(old, consumed)
    assert len(done) == len(set(done)) == consumed * 16
    fresh = old.replan(consumed, world_size=2, batch_size=8, num_workers=2, shuffle_buffer=16)
    rest = _delivered(fresh, 0) + _delivered(fresh, 1)
    assert len(rest) == len(set(rest)) and not set(rest) & set(done)
    assert sum(COUNTS) - len(done) - len(rest) == fresh.dropped_now < 16


def test_plan_round_trips_through_a_dict():
    plan = _plan().replan(3, world_size=3, batch_size=4, num_workers=1, shuffle_buffer=7)
    again = Plan.from_dict(COUNTS, plan.to_dict())
    assert isinstance(again, Plan) and again.strands == plan.strands
    assert _delivered(again, 2) == _delivered(plan, 2)
