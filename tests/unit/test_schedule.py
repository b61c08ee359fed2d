"""train.schedule: the rate of every step (constant, cosine, piecewise, the official ImageNet 64x64
schedules in jobs/), and validation that names every problem with its dotted path."""

import math
from pathlib import Path

import pytest

from orchestrator.config import JobSpecError, TrainSpec, load_job, override_problems, validate
from orchestrator.config.schedule import boundaries, learning_rate

pytestmark = pytest.mark.unit

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _piecewise(*phases, max_steps=100, **train):
    return TrainSpec(max_steps=max_steps, schedule={"kind": "piecewise", "phases": list(phases)}, **train)


def _rates(train, steps):
    return [learning_rate(s, train.rates()) for s in steps]


def test_constant_is_linear_warmup_then_flat():
    train = TrainSpec(lr=4e-4, warmup_steps=4, max_steps=10)
    assert _rates(train, range(6)) == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 4e-4, 4e-4])
    assert learning_rate(0, TrainSpec(lr=1e-3, warmup_steps=0).rates()) == 1e-3
    assert learning_rate(10**6, train.rates()) == 4e-4


def test_cosine_warms_up_then_decays_to_min_lr_on_the_last_step():
    train = TrainSpec(lr=1e-3, warmup_steps=10, max_steps=110, schedule={"kind": "cosine", "min_lr": 1e-4})
    assert _rates(train, [0, 4, 9]) == pytest.approx([1e-4, 5e-4, 1e-3])
    assert learning_rate(59, train.rates()) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way through the 100 decay steps
    assert learning_rate(109, train.rates()) == pytest.approx(1e-4)
    decay = _rates(train, range(9, 110))
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert learning_rate(0, TrainSpec(lr=1e-3, warmup_steps=0, max_steps=4, schedule={"kind": "cosine"}).rates()) < 1e-3


def test_piecewise_phases_follow_each_other():
    train = _piecewise(
        {"kind": "warmup", "steps": 4, "start": 1.0, "to": 2.0},  # 0..3
        {"kind": "hold", "until": 6},  # 4..5
        {"kind": "geometric", "factor": 0.5, "to": 0.3},  # 2 -> 1 -> 0.5 -> 0.3 (clamped): 6..8
        {"kind": "geometric", "factor": 2.0, "to": 0.3},  # already there: no steps
        {"kind": "geometric", "factor": 2.0, "to": 1.0},  # 0.6, 1.0 (clamped): 9..10
        {"kind": "hold"},
    )
    expected = [1.25, 1.5, 1.75, 2.0, 2.0, 2.0, 1.0, 0.5, 0.3, 0.6, 1.0, 1.0, 1.0]
    assert _rates(train, range(13)) == pytest.approx(expected)
    ends = [(s.begin, s.end) for s in boundaries(train.rates())]
    assert ends == [(0, 4), (4, 6), (6, 9), (9, 9), (9, 11), (11, None)]
    assert learning_rate(99, train.rates()) == 1.0


def test_piecewise_ignores_lr_and_a_closed_schedule_keeps_its_last_rate():
    phases = ({"kind": "warmup", "steps": 2, "to": 1e-3}, {"kind": "hold", "until": 5})
    a, b = _piecewise(*phases, max_steps=5, lr=1e-1), _piecewise(*phases, max_steps=5, lr=1e-5)
    assert _rates(a, range(8)) == _rates(b, range(8)) == pytest.approx([5e-4] + [1e-3] * 7)


def _geometric_steps(rate0, to, factor):
    return math.ceil(math.log(to / rate0) / math.log(factor))


def _check_boundaries(train, expected):
    for step, rate in expected.items():
        assert learning_rate(step, train.rates()) == pytest.approx(rate, rel=1e-9, abs=0), step
    rates = _rates(train, range(train.max_steps))
    assert all(math.isfinite(r) and 0 < r <= 4e-4 for r in rates)


@pytest.mark.slow
def test_official_imagenet64_schedule():
    train = load_job(JOBS / "imagenet64.yaml").train
    n = _geometric_steps(4e-4, 3e-4, 0.99995)
    reached = 50_000 + n - 1  # the first step at 3e-4
    assert 55_700 < reached < 55_800  # "~3e-4 at 55K" in the official docstring
    expected = {0: 4e-8, 9999: 4e-4, 10_000: 4e-4, 49_999: 4e-4, 50_000: 4e-4 * 0.99995}
    expected |= {reached - 1: 4e-4 * 0.99995 ** (n - 1), reached: 3e-4, reached + 1: 3e-4, 229_999: 3e-4}
    expected |= {230_000: 1e-5 / 10_000, 239_999: 1e-5, 240_000: 1e-5, 279_999: 1e-5}
    expected |= {280_000: 1e-6 / 10_000, 289_999: 1e-6, 290_000: 1e-6, 299_999: 1e-6}
    assert expected[reached - 1] > 3e-4
    assert train.max_steps == 300_000
    _check_boundaries(train, expected)
    ends = [s.end for s in boundaries(train.rates())]
    assert ends == [10_000, 50_000, reached + 1, 230_000, 240_000, 280_000, 290_000, None]


def test_official_imagenet64_5bit_schedule():
    spec = load_job(JOBS / "imagenet64-5bit.yaml")
    train = spec.train
    assert (spec.model.preset, train.global_batch_size, train.max_steps) == ("imagenet64_5bit", 60, 200_000)
    n = _geometric_steps(4e-4, 3e-4, 0.9995)
    reached = 50_000 + n - 1
    expected = {0: 4e-8, 9999: 4e-4, 10_000: 4e-4, 49_999: 4e-4, 50_000: 4e-4 * 0.9995}
    expected |= {reached - 1: 4e-4 * 0.9995 ** (n - 1), reached: 3e-4, reached + 1: 3e-4, 109_999: 3e-4}
    expected |= {110_000: 1e-5 / 20_000, 129_999: 1e-5, 130_000: 1e-5, 199_999: 1e-5}
    assert expected[reached - 1] > 3e-4
    _check_boundaries(train, expected)
    assert [s.end for s in boundaries(train.rates())] == [10_000, 50_000, reached + 1, 110_000, 130_000, None]


@pytest.mark.parametrize("name", ["imagenet64.yaml", "imagenet64-5bit.yaml"])
def test_a_dumped_schedule_validates_again(name):
    """Ray Train and Tune pass the spec as model_dump(); every field is then 'set'."""
    spec = load_job(JOBS / name)
    again = validate(spec.model_dump())
    assert again.train.schedule == spec.train.schedule
    assert override_problems(spec.model_dump(exclude={"tune"}), "train.seed", 1) == []


def _tree(**train):
    data = {"train": "s3://b/train/manifest.json", "valid": "s3://b/valid/manifest.json"}
    return {"name": "t", "data": data, "train": {"max_steps": 1000, **train}}


def _flat(**train):
    """constant or cosine: a warm-up that fits in max_steps."""
    return _tree(**{"warmup_steps": 10, **train})


def _pw(*phases, **train):
    return _tree(schedule={"kind": "piecewise", "phases": list(phases)}, **train)


WARM = {"kind": "warmup", "steps": 50, "to": 1e-3}
OPEN = {"kind": "hold"}

MISTAKES = {
    "overlap": (
        _pw(WARM, {"kind": "hold", "until": 40}, OPEN),
        "train.schedule.phases.1.until: 40 is not after the phase's start 50 (phases must not overlap or leave gaps)",
    ),
    "gap at the end": (
        _pw(WARM, {"kind": "hold", "until": 500}),
        "train.schedule.phases.1: the schedule ends at step 500, before train.max_steps=1000",
    ),
    "a phase placed elsewhere": (_pw({**WARM, "until": 80}, OPEN), "phases.0.until: not used by a warmup"),
    "open hold not last": (_pw(WARM, OPEN, WARM, OPEN), "train.schedule.phases.1.until: only the last phase may be"),
    "decay away from its target": (
        _pw(WARM, {"kind": "geometric", "factor": 0.99, "to": 2e-3}, OPEN),
        "train.schedule.phases.1.factor: 0.99 moves the rate 0.001 away from to=0.002",
    ),
    "growth away from its target": (
        _pw(WARM, {"kind": "geometric", "factor": 1.01, "to": 1e-4}, OPEN),
        "train.schedule.phases.1.factor: 1.01 moves the rate",
    ),
    "factor 1": (_pw(WARM, {"kind": "geometric", "factor": 1, "to": 1e-4}, OPEN), "phases.1.factor: 1.0 moves"),
    "phases for constant": (
        _flat(schedule={"phases": [WARM]}),
        "train.schedule.phases: only used by kind=piecewise, not kind=constant",
    ),
    "phases for cosine": (_flat(schedule={"kind": "cosine", "phases": [WARM]}), "not kind=cosine"),
    "piecewise without phases": (_pw(), "train.schedule.phases: kind=piecewise needs at least one phase"),
    "cosine min_lr above lr": (
        _flat(lr=1e-4, schedule={"kind": "cosine", "min_lr": 1e-3}),
        "train.schedule.min_lr: 0.001 exceeds train.lr=0.0001",
    ),
    "min_lr without cosine": (_flat(schedule={"min_lr": 1e-5}), "train.schedule.min_lr: only used by kind=cosine"),
    "warmup_steps with piecewise": (
        _pw(WARM, OPEN, warmup_steps=100),
        "train.warmup_steps: not used by train.schedule.kind=piecewise; put the warm-up in its phases",
    ),
    "warmup without to": (_pw({"kind": "warmup", "steps": 5}, OPEN), "train.schedule.phases.0.to: a warmup phase"),
    "geometric without factor": (
        _pw(WARM, {"kind": "geometric", "to": 1e-4}, OPEN),
        "train.schedule.phases.1.factor: a geometric phase needs factor",
    ),
    "start on a hold": (_pw(WARM, {"kind": "hold", "start": 1e-4}), "train.schedule.phases.1.start: not used"),
    "first phase not a warmup": (_pw(OPEN), "train.schedule.phases.0.kind: the first phase must be a warmup"),
    "negative start": (_pw({**WARM, "start": -1e-4}, OPEN), "train.schedule.phases.0.start: Input should be greater"),
    "negative to": (_pw({**WARM, "to": -1e-4}, OPEN), "train.schedule.phases.0.to: Input should be greater than 0"),
    "negative min_lr": (_flat(schedule={"kind": "cosine", "min_lr": -1}), "train.schedule.min_lr: Input should be"),
    "unknown phase key": (_pw({**WARM, "length": 3}, OPEN), "train.schedule.phases.0.length: Extra inputs"),
    "unknown kind": (_flat(schedule={"kind": "linear"}), "train.schedule.kind: Input should be 'constant'"),
    "infinite rate": (_flat(lr=float("inf")), "train.lr: Input should be a finite number"),
    "warm-up past the end": (_flat(warmup_steps=2000), "train.warmup_steps: 2000 exceeds train.max_steps=1000"),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_each_schedule_mistake_is_named_with_its_path(kind):
    tree, expected = MISTAKES[kind]
    with pytest.raises(JobSpecError) as err:
        validate(tree)
    assert expected in str(err.value), str(err.value)


def test_the_good_trees_validate():
    assert validate(_pw(WARM, OPEN)).train.schedule.kind == "piecewise"
    assert validate(_pw(WARM, {"kind": "hold", "until": 1000})).train.schedule.phases[1].until == 1000
    assert validate(_flat(schedule={"kind": "cosine", "min_lr": 1e-5})).train.schedule.min_lr == 1e-5
    assert validate(_flat(warmup_steps=1000)).train.warmup_steps == 1000


def test_every_schedule_problem_is_reported_at_once():
    tree = _pw(
        {"kind": "warmup", "steps": 5},
        {"kind": "geometric", "to": 1e-4, "until": 9},
        OPEN,
        {"kind": "hold", "until": 10},
        warmup_steps=7,
    )
    with pytest.raises(JobSpecError) as err:
        validate(tree)
    assert len(err.value.problems) == 5, str(err.value)
    for path in ("phases.0.to", "phases.1.factor", "phases.1.until", "phases.2.until", "train.warmup_steps"):
        assert path in str(err.value)
