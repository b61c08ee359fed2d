"""Call 1 ("answer") of the device check: its rows, in order, and what each should cost.

Torch-free, so the dry run and CI price the plan without building a model. The order is the
issue's: the goal rows (bf16, compiled) first, so a short lease loses the eager rows, not them;
then the eager rows; sampling and the EMA step are priced separately (``fixed_items``).

Estimates start from ``PRIORS`` (stated assumptions for one H200, not readings) and are replaced
by what the run has measured as it goes (``step_estimate_s``, ``compile_estimate_s``).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.variants import parse_variant

MAX_BATCH = 0
"""The batch of the goal row "the largest batch up to --max-batch that fits": 0 until the probe finds it."""


@dataclass(frozen=True)
class Config:
    batch: int
    precision: str
    mode: str
    variant: str = "eager"
    """bench/variants.py: eager, or compile / reduce-overhead / fused / channels_last joined by +."""

    @property
    def compiled(self) -> bool:
        return bool(parse_variant(self.variant) & {"compile", "reduce-overhead"})

    def label(self, max_batch: int = 256) -> str:
        batch = f"<={max_batch} (largest that fits)" if self.batch == MAX_BATCH else str(self.batch)
        return f"batch {batch} {self.precision} checkpoint={self.mode} {self.variant}"


@dataclass
class Row:
    config: Config
    step_s: float | None = None
    images_s: float | None = None
    peak_bytes: int | None = None
    setup_s: float = 0.0
    compile_s: float | None = None  # a compiled row's first step less a steady one
    note: str = ""  # OOM, error, skipped, compile over N s: shown in place of the step time
    wall_s: float = 0.0  # the whole row, setup and compile included


@dataclass(frozen=True)
class Prior:
    """What a row costs on one H200 before anything is measured (assumptions, stated in PRIORS)."""

    gflop: float  # model FLOPs per training image, forward + backward
    host_s: float  # eager host time per step: dispatched ops x 10 us, the same at any batch
    compile_s: float  # cold-cache compile of every shape class at one batch, default mode
    setup_s: float  # build, data-dependent init, weights to the device


# imagenet64: 175 GFLOP/image (bench/capacity.py, README); 26,519 ops per forward + backward
# x 10 us of host time each (infra/README.md, A3). Compile, cold cache: 7 shape classes
# (flowpp.compile); dynamo + AOT autograd alone took 64 s for them on one core of the 2-core
# development CPU (backend aot_eager, batch 1: a first step of 104 s against 40 s for the next);
# inductor's lowering and code generation are assumed to take as long again, and Triton's kernel
# builds, spread over the device's 16 CPUs, 20 s more: ~150 s. Not measured on a GPU yet: the
# first compiled row's compile time replaces it (compile_estimate_s). debug: rough, for tests.
PRIORS = {
    "imagenet64": Prior(gflop=175.0, host_s=0.27, compile_s=150.0, setup_s=6.0),
    "debug": Prior(gflop=0.05, host_s=0.05, compile_s=30.0, setup_s=1.0),
}
PRIORS["imagenet64_5bit"] = PRIORS["imagenet64"]
# Sustained throughput assumed for the budget (the goal, 1,100 images/s at 175 GFLOP, is 193
# TFLOP/s): low on purpose, so rows are over- rather than under-priced.
TFLOPS = {"bf16": 150.0, "fp32": 60.0}
COMPILED_HOST = 0.5  # a compiled step's host time against eager's: the glue and Adam stay eager
CHECKPOINT_COST = {"none": 1.0, "attention": 1.1, "all": 1.35}  # recomputed forward
CHILD_START_S = 10.0  # a spawned row: python, import torch, a CUDA context, flowpp
CONCURRENT_SLOWDOWN = 0.1  # each further row compiling at once: tracing is one thread per process,
# so the rows trace side by side; they share the CPUs for Triton's builds
HEADROOM = 1.5  # a compile window is its estimate times this, where the budget allows


def prior_for(preset: str) -> Prior:
    """The preset's prior; presets without one are priced as imagenet64 (the largest stored)."""
    return PRIORS.get(preset, PRIORS["imagenet64"])


def goal_rows(max_batch: int, goal_batch: int, official_batch: int, variant: str) -> list[Config]:
    """bf16 compiled at the goal batch, at the largest batch that fits, at the official batch."""
    batches = [goal_batch, MAX_BATCH if max_batch > goal_batch else None, official_batch]
    return [Config(b, "bf16", "none", variant) for b in batches if b is not None]


def eager_rows(batches: list[int], precisions: list[str], modes: list[str]) -> list[Config]:
    return [Config(b, p, m) for b in batches for m in modes for p in precisions]


def step_prior_s(config: Config, prior: Prior, max_batch: int) -> float:
    batch = max_batch if config.batch == MAX_BATCH else config.batch
    host = prior.host_s * (COMPILED_HOST if config.compiled else 1.0)
    device = batch * prior.gflop * 1e9 * CHECKPOINT_COST[config.mode] / (TFLOPS[config.precision] * 1e12)
    return host + device


def step_estimate_s(config: Config, done: list[Row], prior: Prior, max_batch: int) -> float:
    """A step's seconds: from the nearest measured row of the same precision and compiledness
    (its step time at a smaller batch, scaled up per image; at a larger one, as is), else the prior."""
    batch = max_batch if config.batch == MAX_BATCH else config.batch
    alike = [
        r for r in done if r.step_s and (r.config.precision, r.config.compiled) == (config.precision, config.compiled)
    ]
    if not alike:
        return step_prior_s(config, prior, max_batch)
    below = [r for r in alike if r.config.batch <= batch]
    near = max(below, key=lambda r: r.config.batch) if below else min(alike, key=lambda r: r.config.batch)
    return near.step_s * max(1.0, batch / near.config.batch)


def compile_estimate_s(done: list[Row], prior: Prior) -> float:
    """One compiled row's compile: the longest measured in this run, else the cold-cache prior."""
    measured = [r.compile_s for r in done if r.compile_s is not None]
    return max(measured) if measured else prior.compile_s


def compile_window_s(rows: int, done: list[Row], prior: Prior) -> float:
    """Wall seconds for ``rows`` compiled rows compiling at once, from spawn to their first step's end."""
    slowdown = 1.0 + CONCURRENT_SLOWDOWN * max(0, rows - 1)
    return CHILD_START_S + prior.setup_s + compile_estimate_s(done, prior) * slowdown


def row_estimate_s(config: Config, done: list[Row], prior: Prior, steps: int, max_batch: int) -> float:
    """Seconds of one row after its compile (a compiled row's compile is priced by compile_window_s)."""
    step = step_estimate_s(config, done, prior, max_batch)
    setup = 0.0 if config.compiled else prior.setup_s
    return setup + steps * step


@dataclass(frozen=True)
class Item:
    """A priced line of the plan that is not a table row."""

    name: str
    seconds: float
    outside: bool = False  # run before bench/gpu_check, in the same call


SETUP_S = 15.0  # bench/gpu_setup: pip installs the carried wheels (57 MiB) into /tmp/site: 3 s on the dev CPU
PREFLIGHT_S = 15.0  # python3 -m bench.gpu_preflight: import torch, a CUDA context, metadata of the wheels
STOP_S = 10.0  # bench/gpu_check past its --budget-s: the last table printed and written, child processes killed


def fixed_items(prior: Prior, max_batch: int, goal_batch: int, official_batch: int) -> dict[str, Item]:
    """The call's non-row work: before the rows (setup to probe) and after them (sample, EMA)."""
    probe_steps = step_prior_s(Config(max_batch, "bf16", "none"), prior, max_batch)
    probe_steps += step_prior_s(Config(goal_batch, "bf16", "none"), prior, max_batch)
    probe_steps += step_prior_s(Config(official_batch, "bf16", "none"), prior, max_batch)
    sample_s = 8 * step_prior_s(Config(16, "fp32", "none"), prior, max_batch)  # 4 x (sample + log_prob)
    ema_s = prior.setup_s + 14 * step_prior_s(Config(goal_batch, "bf16", "none"), prior, max_batch)
    return {
        "setup": Item("setup: bench/gpu_setup (carried wheels into /tmp/site, .pth)", SETUP_S, outside=True),
        "preflight": Item("preflight: python3 -m bench.gpu_preflight", PREFLIGHT_S, outside=True),
        "flops": Item("FLOP count of one image on the device", prior.setup_s),
        "probe": Item(
            f"memory probe: eager bf16 steps at {official_batch}, {goal_batch}, the largest predicted",
            prior.setup_s + 2 * probe_steps,
        ),  # fmt: skip
        "sample": Item("sample(16) against log_prob(16), eager fp32", prior.setup_s + sample_s),
        "ema": Item(f"train_step + EMA.update against train_step, eager bf16 batch {goal_batch}", ema_s),
    }


@dataclass(frozen=True)
class Plan:
    """What call 1 runs. The first ``compile_jobs`` goal rows compile at once in child processes
    while this process runs the eager rows, sampling and the EMA step (``overlap``); then they are
    timed one at a time, alone on the device. Further goal rows compile and run one by one after."""

    preset: str
    goals: list[Config]
    eager: list[Config]
    max_batch: int
    goal_batch: int
    official_batch: int
    steps: int  # warm-up + timed steps of a row
    compile_jobs: int = 3
    overlap: bool = True
    sample: bool = True
    ema: bool = True

    @property
    def prior(self) -> Prior:
        return prior_for(self.preset)

    def groups(self) -> list[list[Config]]:
        jobs = max(1, self.compile_jobs)
        return [self.goals[:jobs], *([c] for c in self.goals[jobs:])] if self.goals else []

    def items(self) -> dict[str, Item]:
        return fixed_items(self.prior, self.max_batch, self.goal_batch, self.official_batch)

    def tail(self) -> list[Item]:
        items = self.items()
        return [items[k] for k, wanted in (("sample", self.sample), ("ema", self.ema)) if wanted]

    def row_s(self, config: Config, done: list[Row] | None = None) -> float:
        return row_estimate_s(config, done or [], self.prior, self.steps, self.max_batch)

    def eager_work_s(self, done: list[Row] | None = None) -> float:
        """The eager rows, sampling and the EMA step: what runs while the first group compiles."""
        return sum(self.row_s(c, done) for c in self.eager) + sum(item.seconds for item in self.tail())


@dataclass(frozen=True)
class Line:
    """A priced line of the plan: ``counted`` is False for work inside a compile window."""

    name: str
    seconds: float
    counted: bool = True
    outside: bool = False  # before bench/gpu_check, in the same call


def price(plan: Plan) -> list[Line]:
    """Every step of call 1, in order, priced from the priors."""
    items = plan.items()
    lines = [
        Line(items[k].name, items[k].seconds, outside=items[k].outside)
        for k in ("setup", "preflight", "flops", "probe")
    ]
    for number, group in enumerate(plan.groups()):
        window = compile_window_s(len(group), [], plan.prior)
        first = number == 0 and plan.overlap
        phase = max(window, plan.eager_work_s()) if first else window
        rows = f"{len(group)} rows at once" if len(group) > 1 else "1 row"
        lines.append(Line(f"compile {rows} in child processes, cold cache (window {window:.0f} s)", phase))
        if first:
            lines += _eager_lines(plan, "  meanwhile here: ", counted=False)
        lines += [Line(f"  {config.label(plan.max_batch)}: timed alone", plan.row_s(config)) for config in group]
    if not plan.groups() or not plan.overlap:
        lines += _eager_lines(plan, "", counted=True)
    return lines


def _eager_lines(plan: Plan, prefix: str, counted: bool) -> list[Line]:
    lines = [Line(f"{prefix}{c.label(plan.max_batch)}", plan.row_s(c), counted) for c in plan.eager]
    return lines + [Line(f"{prefix}{item.name}", item.seconds, counted) for item in plan.tail()]


def budget_lines(plan: Plan, budget_s: float, call_s: float) -> tuple[list[str], bool]:
    """The priced plan as text, and whether it fits both bench/gpu_check's budget and the call's:
    the plan as estimated, and the call at most (``call_at_most_s``: bench/gpu_check running to its
    budget), against ``call_s``, the call's ``timeout_s``."""
    priced = price(plan)
    inside = sum(line.seconds for line in priced if line.counted and not line.outside)
    whole = sum(line.seconds for line in priced if line.counted)
    before = sum(line.seconds for line in priced if line.outside)
    most = call_at_most_s(budget_s, before)
    lines = [f"{'est. s':>7}  step of call 1, in order (preset {plan.preset}; priors: {prior_note(plan.preset)})"]
    for line in priced:
        where = "  [before bench/gpu_check]" if line.outside else ""
        lines.append(f"{line.seconds:7.0f}{' ' if line.counted else '*'} {line.name}{where}")
    if not all(line.counted for line in priced):
        lines.append("         (* runs inside the compile window above: not added again)")
    lines.append(f"{inside:7.0f}  bench/gpu_check, against its --budget-s {budget_s:.0f}: {verdict(inside, budget_s)}")
    lines.append(
        f"{whole:7.0f}  call 1 in all, setup included, against --call-s {call_s:.0f}: {verdict(whole, call_s)}"
    )
    lines.append(
        f"{most:7.0f}  call 1 at most (setup, preflight, all of --budget-s {budget_s:.0f}, {STOP_S:.0f} s to stop), "
        f"against --call-s {call_s:.0f}: {verdict(most, call_s)}"
    )
    return lines, inside <= budget_s and whole <= call_s and most <= call_s


def call_at_most_s(budget_s: float, before_s: float = SETUP_S + PREFLIGHT_S) -> float:
    """Call 1's wall time when bench/gpu_check uses all of ``budget_s`` (counted from the launcher's
    start, before torch is imported): the steps before it, the budget, and the stop after it."""
    return before_s + budget_s + STOP_S


def verdict(seconds: float, limit: float) -> str:
    return "fits" if seconds <= limit else "OVER"


def prior_note(preset: str) -> str:
    return preset if preset in PRIORS else "imagenet64's (none stored for this preset)"
