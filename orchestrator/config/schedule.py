"""Learning-rate schedules: ``train.schedule`` in the job spec, and the rate of each step.

Three kinds:

- ``constant``: linear warm-up from 0 to ``train.lr`` over ``train.warmup_steps``, then ``train.lr``.
- ``cosine``: the same warm-up, then a half cosine from ``train.lr`` down to ``min_lr``.
- ``piecewise``: ``phases`` in order from step 0, each beginning where the previous one ended, so
  they can neither overlap nor leave gaps (only a hold says where it ends). ``train.lr`` and
  ``train.warmup_steps`` are not used: the phases carry every rate.

Every ramp reaches its target on its own last step: a warm-up of ``n`` steps from ``a`` to ``b``
gives ``a + (b - a) * k / n`` on its k-th step (k = 1..n), as the official launchers do.
``learning_rate`` walks the few phases on every call (no cache: the spec can be reassigned), so it
costs O(phases) per training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from orchestrator.core.strict import SpecModel


class Phase(SpecModel):
    """One piece of a piecewise schedule; it begins where the previous phase ended (step 0 first)."""

    kind: Literal["warmup", "hold", "geometric"]
    """warmup: linear from ``start`` to ``to``; hold: keep the previous phase's last rate;
    geometric: multiply the previous phase's last rate by ``factor`` each step until it is ``to``."""
    steps: int | None = Field(None, ge=1)
    """warmup only: its length in steps (it reaches ``to`` on its last one)."""
    until: int | None = Field(None, ge=1)
    """hold only: the step where the hold ends (exclusive). None: to the end of training (last phase only)."""
    start: float = Field(0.0, ge=0, allow_inf_nan=False)
    """warmup only: the rate the ramp starts from (its first step is already one ``steps``-th above it)."""
    to: float | None = Field(None, gt=0, allow_inf_nan=False)
    """warmup: the rate reached on its last step; geometric: the rate where the decay stops."""
    factor: float | None = Field(None, gt=0, allow_inf_nan=False)
    """geometric only: the multiplier per step; below 1 decays, above 1 grows (then ``to`` must be
    above the starting rate). Its length is computed: ceil(log(to / start rate) / log(factor))."""


class ScheduleSpec(SpecModel):
    """``train.schedule``: how the learning rate moves over the steps (see the module docstring)."""

    kind: Literal["constant", "cosine", "piecewise"] = "constant"
    """constant: warm-up to ``train.lr``, then flat; cosine: warm-up, then cosine to ``min_lr`` on the
    last step; piecewise: the ``phases`` (``train.lr`` and ``train.warmup_steps`` are then unused)."""
    min_lr: float = Field(0.0, ge=0, allow_inf_nan=False)
    """cosine only: the rate of the last step (``train.max_steps - 1``)."""
    phases: list[Phase] = Field(default_factory=list)
    """piecewise only: the phases in order; the last is an open hold (``until: null``) or the phases
    cover ``train.max_steps``."""


@dataclass(frozen=True)
class Rates:
    """What a schedule reads: its own spec and three numbers (``TrainSpec.rates()`` gives them)."""

    schedule: ScheduleSpec
    lr: float
    warmup_steps: int
    max_steps: int


@dataclass(frozen=True)
class Segment:
    """One piecewise phase placed on the step axis."""

    index: int
    begin: int
    end: int | None
    """Exclusive; None: to the end of training."""
    rate0: float
    """The rate the previous phase ended on (0 before the first phase)."""
    phase: Phase


def learning_rate(step: int, train: Rates) -> float:
    """The learning rate of (0-based) step ``step``, the one being taken."""
    kind = train.schedule.kind
    if kind == "constant":
        return _warm(step, train)
    if kind == "cosine":
        return _cosine(step, train)
    return _piecewise(step, train.schedule.phases)


def _warm(step: int, train: Rates) -> float:
    warm = train.warmup_steps
    return train.lr * min(1.0, (step + 1) / warm) if warm else train.lr


def _cosine(step: int, train: Rates) -> float:
    warm, lo, hi = train.warmup_steps, train.schedule.min_lr, train.lr
    if step < warm:
        return _warm(step, train)
    span = train.max_steps - warm
    done = min(1.0, (step - warm + 1) / span) if span > 0 else 1.0
    return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * done))


def _piecewise(step: int, phases: list[Phase]) -> float:
    begin, rate0 = 0, 0.0
    for p in phases:
        end = _end(p, begin, rate0)
        if end is None or step < end:
            return _rate(p, step, begin, rate0)
        begin, rate0 = end, _last_rate(p, rate0)
    return rate0  # past a closed last phase (validation refuses that before max_steps)


def _rate(p: Phase, step: int, begin: int, rate0: float) -> float:
    if p.kind == "warmup":
        assert p.steps is not None and p.to is not None
        return p.start + (p.to - p.start) * min(1.0, (step - begin + 1) / p.steps)
    if p.kind == "hold":
        return rate0
    assert p.factor is not None and p.to is not None
    rate = rate0 * p.factor ** (step - begin + 1)
    return max(rate, p.to) if p.factor < 1 else min(rate, p.to)  # never past the target


def _end(p: Phase, begin: int, rate0: float) -> int | None:
    if p.kind == "warmup":
        assert p.steps is not None
        return begin + p.steps
    if p.kind == "hold":
        return p.until
    assert p.factor is not None and p.to is not None
    return begin + (0 if p.to == rate0 else math.ceil(math.log(p.to / rate0) / math.log(p.factor)))


def _last_rate(p: Phase, rate0: float) -> float:
    return rate0 if p.kind == "hold" else float(p.to or 0.0)


def boundaries(train: Rates) -> list[Segment]:
    """Where each piecewise phase begins and ends, for a schedule that validated."""
    out: list[Segment] = []
    begin, rate0 = 0, 0.0
    for i, p in enumerate(train.schedule.phases):
        end = _end(p, begin, rate0)
        out.append(Segment(i, begin, end, rate0, p))
        if end is None:
            break
        begin, rate0 = end, _last_rate(p, rate0)
    return out


# ---- validation: every problem, each with its dotted path ----

_WHERE = "train.schedule"
_NEEDS = {"warmup": ("steps", "to"), "hold": (), "geometric": ("factor", "to")}
_USES = {"warmup": {"steps", "to", "start"}, "hold": {"until"}, "geometric": {"factor", "to"}}


def schedule_problems(train: Rates) -> list[str]:
    """What is wrong with ``train.schedule`` (and the ``train`` fields it reads); [] when nothing."""
    problems = _kind_problems(train)
    if train.schedule.kind == "piecewise" and train.schedule.phases:
        found = _phase_problems(train.schedule.phases)
        problems += found or _layout_problems(train)
    return problems or _numeric_problems(train)


def _kind_problems(train: Rates) -> list[str]:
    s, problems = train.schedule, []
    if s.kind != "piecewise" and s.phases:
        problems.append(f"{_WHERE}.phases: only used by kind=piecewise, not kind={s.kind}")
    if s.kind != "piecewise" and train.warmup_steps > train.max_steps and train.max_steps > 1:
        problems.append(f"train.warmup_steps: {train.warmup_steps} exceeds train.max_steps={train.max_steps}")
    if s.kind != "cosine" and s.min_lr:
        problems.append(f"{_WHERE}.min_lr: only used by kind=cosine, not kind={s.kind}")
    if s.kind == "cosine" and s.min_lr > train.lr:
        problems.append(f"{_WHERE}.min_lr: {s.min_lr} exceeds train.lr={train.lr} (cosine decays from lr to min_lr)")
    if s.kind == "piecewise" and not s.phases:
        problems.append(f"{_WHERE}.phases: kind=piecewise needs at least one phase")
    return problems


def _phase_problems(phases: list[Phase]) -> list[str]:
    """Each phase on its own: the fields its kind needs, and no others."""
    problems = []
    for i, p in enumerate(phases):
        where = f"{_WHERE}.phases.{i}"
        problems += [f"{where}.{f}: a {p.kind} phase needs {f}" for f in _NEEDS[p.kind] if getattr(p, f) is None]
        given = {f for f in ("steps", "until", "to", "factor") if getattr(p, f) is not None}
        given |= {"start"} if p.start else set()
        problems += [f"{where}.{f}: not used by a {p.kind} phase" for f in sorted(given - _USES[p.kind])]
        if i == 0 and p.kind != "warmup":
            problems.append(f"{where}.kind: the first phase must be a warmup ({p.kind} continues a previous rate)")
        if p.kind == "hold" and p.until is None and i < len(phases) - 1:
            problems.append(f"{where}.until: only the last phase may be an open hold (until: null); say where it ends")
    return problems


def _layout_problems(train: Rates) -> list[str]:
    """The phases placed in order: holds that end after they begin, targets a geometric can reach,
    and no gap before ``train.max_steps``."""
    problems: list[str] = []
    begin, rate0 = 0, 0.0
    for i, p in enumerate(train.schedule.phases):
        where = f"{_WHERE}.phases.{i}"
        if p.kind == "hold" and p.until is not None and p.until <= begin:
            msg = f"{p.until} is not after the phase's start {begin} (phases must not overlap or leave gaps)"
            problems.append(f"{where}.until: {msg}")
        if p.kind == "geometric" and _moves_away(p, rate0):
            problems.append(f"{where}.factor: {p.factor} moves the rate {rate0:g} away from to={p.to}; never reached")
            return problems  # an endless phase: the ones after it have no start
        end = _end(p, begin, rate0)
        if end is None:
            return problems
        begin, rate0 = max(begin, end), _last_rate(p, rate0)
    if begin < train.max_steps:
        last = f"{_WHERE}.phases.{len(train.schedule.phases) - 1}"
        problems.append(
            f"{last}: the schedule ends at step {begin}, before train.max_steps={train.max_steps} "
            "(leave no gap at the end: finish with an open hold, until: null, or cover every step)"
        )
    return problems


def _moves_away(p: Phase, rate0: float) -> bool:
    assert p.factor is not None and p.to is not None
    if p.to == rate0:
        return False
    return p.factor == 1 or (p.factor < 1) != (p.to < rate0)


def _numeric_problems(train: Rates) -> list[str]:
    """The rate at the start, the end and around every boundary must be a finite number >= 0."""
    warm = train.warmup_steps
    steps = {0, train.max_steps - 1, warm - 1, warm, warm + 1}
    if train.schedule.kind == "piecewise":
        for seg in boundaries(train):
            steps |= {seg.begin - 1, seg.begin, seg.begin + 1}
            steps |= {seg.end - 1} if seg.end is not None else set()
    problems = []
    for step in sorted(s for s in steps if 0 <= s < train.max_steps):
        rate = learning_rate(step, train)
        if not (math.isfinite(rate) and rate >= 0):
            problems.append(f"{_WHERE}: the rate at step {step} is {rate} (it must be a finite number >= 0)")
    return problems
