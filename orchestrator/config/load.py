"""Loading a job spec: YAML (strict: no aliases, no duplicate keys), ``${VAR:-default}`` from
the allowed environment variables (``orchestrator.config.env``), dotted ``--set`` overrides,
and validation, the checks across fields included. Every problem is reported at once, each
with its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config import env as jobenv
from orchestrator.config.schedule import schedule_problems
from orchestrator.config.spec import JobSpec, TrainSpec, world_sizes
from orchestrator.core.errors import UserError, validation_problems
from orchestrator.core.redact import redact

__all__ = ["JobSpecError", "apply_overrides", "load_job", "override_problems", "parse_yaml", "validate"]


class JobSpecError(UserError, ValueError):
    """Every problem in a job spec, one per line, each with its path."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = [redact(p) for p in problems]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the job spec:\n{lines}")


class _JobLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses what a job spec never needs and a reader would misread:
    a key given twice (PyYAML keeps the last one silently), and aliases (``*name``), which also
    make an alias bomb impossible."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.constructor.ConstructorError(None, None, "aliases (*name) are not allowed in a job spec", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first[key]})", key_node.start_mark
                )
            if isinstance(key, (str, int, float, bool)):
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """The YAML document in ``text``, through the job loader (yaml.YAMLError on a problem)."""
    return yaml.load(text, Loader=_JobLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
    kind = "syntax error" if isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError)) else "error"
    return f"YAML {kind} at {where}: {getattr(exc, 'problem', None) or exc}"


def _set(tree: dict, dotted: str, raw: str, problems: list[str]) -> None:
    path = dotted.split(".")
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            problems.append(f"--set {dotted}: {part} is not a section")
            return
    try:
        node[path[-1]] = parse_yaml(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        problems.append(f"--set {dotted}={raw!r}: not a YAML value ({getattr(exc, 'problem', None) or exc})")


def semantic_problems(spec: JobSpec) -> list[str]:
    """Cross-field checks that pydantic's per-field validation cannot see."""
    from flowpp.presets import PRESETS  # lazy: torch

    problems = []
    if spec.model.preset not in PRESETS:
        problems.append(f"model.preset: unknown preset {spec.model.preset!r}; choose from {sorted(PRESETS)}")
    elif spec.model.hidden is not None:
        heads = PRESETS[spec.model.preset]().net.num_heads
        if spec.model.hidden % heads:
            problems.append(f"model.hidden: {spec.model.hidden} is not divisible by the {heads} attention heads")
    scaling, batch = spec.scaling, spec.train.global_batch_size
    can, cannot = world_sizes(batch, scaling.min_workers, scaling.max_workers)
    if cannot and not scaling.elastic:
        problems.append(f"train.global_batch_size: {batch} is not divisible by scaling.num_workers={cannot[0]}")
    elif cannot:
        problems.append(
            f"scaling.num_workers: [{scaling.min_workers}, {scaling.max_workers}] includes "
            f"{', '.join(map(str, cannot))} worker(s), which cannot split train.global_batch_size {batch} "
            f"exactly; the sizes that can: {', '.join(map(str, can)) or 'none'}"
        )
    gpus = spec.scaling.gpus_per_worker
    if gpus > 1 and gpus != int(gpus):
        problems.append(f"scaling.gpus_per_worker: {gpus} GPUs; Ray takes a fraction under 1 or a whole number")
    for field in ("train", "valid"):
        url = getattr(spec.data, field)
        if not url.endswith(".json"):
            problems.append(f"data.{field}: {url!r} should point at a manifest .json file")
    lock = spec.storage.lock
    if lock.stale_s <= 2 * lock.heartbeat_s:
        problems.append(f"storage.lock.stale_s: {lock.stale_s:g} s must exceed twice storage.lock.heartbeat_s "
                        f"({lock.heartbeat_s:g} s), or one late renewal loses the lock")  # fmt: skip
    if spec.storage.path.startswith(("http://", "https://")):
        problems.append(f"storage.path: {spec.storage.path!r} is not a filesystem URL (use s3://, file:// or a path)")
    problems += schedule_problems(spec.train.rates())  # and warmup_steps <= max_steps
    # by value, not by model_fields_set: a dumped and re-validated spec sets every field
    default_warmup = TrainSpec.model_fields["warmup_steps"].default
    if spec.train.schedule.kind == "piecewise" and spec.train.warmup_steps != default_warmup:
        problems.append("train.warmup_steps: not used by train.schedule.kind=piecewise; put the warm-up in its phases")
    if spec.tune is not None:
        problems += tune_problems(spec)
        if spec.train.eval_task is not None:
            problems.append(
                "train.eval_task: a search ranks its trials by the figure each report carries; validation "
                "tasks give it later, off the report: evaluate in the loop (no eval_task)"
            )
    return problems


def tune_problems(spec: JobSpec) -> list[str]:
    """The search space's fields must exist, and every value they can take must validate."""
    problems: list[str] = []
    assert spec.tune is not None
    sched = spec.tune.scheduler
    if sched.time_attr == "training_iteration":
        problems.append("tune.scheduler.time_attr: training_iteration restarts at 0 when a search is resumed; use step")
    if sched.grace_period > sched.max_t:
        problems.append(f"tune.scheduler.grace_period: {sched.grace_period} exceeds max_t={sched.max_t}")
    base = spec.model_dump(exclude={"tune"})
    for key, dist in spec.tune.space.items():
        where = f"tune.space.{key}"
        kinds = [k for k in type(dist).model_fields if getattr(dist, k) is not None]
        if len(kinds) != 1:
            problems.append(f"{where}: give exactly one of {list(type(dist).model_fields)}, got {kinds or 'none'}")
            continue
        values = getattr(dist, kinds[0])
        if kinds[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            problems.append(f"{where}: {kinds[0]} needs low < high, got {list(values)}")
        if kinds[0] == "loguniform" and values[0] <= 0:
            problems.append(f"{where}: loguniform needs low > 0, got {values[0]}")
        if not values:
            problems.append(f"{where}: {kinds[0]} is empty")
        found = [f"{where}: value {value!r}: {p}" for value in values for p in override_problems(base, key, value)]
        problems += found
        if not found and kinds[0] in ("grid", "choice"):
            # as the job spec reads them: YAML takes `1e-6` for a string, the field for a float
            setattr(dist, kinds[0], [_field_value(base, key, value) for value in values])
    return problems


def _field_value(base: dict, dotted: str, value: Any) -> Any:
    node: Any = JobSpec.model_validate(apply_overrides(base, {dotted: value}))
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def apply_overrides(tree: dict, overrides: dict[str, Any]) -> dict:
    """A deep copy of ``tree`` with dotted ``overrides`` set."""
    import copy

    tree = copy.deepcopy(tree)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise KeyError(f"{dotted}: {'.'.join(parents)} is not a section of the job spec")
        node[leaf] = value
    return tree


def override_problems(base: dict, dotted: str, value: Any) -> list[str]:
    """What is wrong with setting ``dotted`` to ``value`` on a job spec tree (nothing: [])."""
    *parents, leaf = dotted.split(".")
    node: Any = JobSpec
    for part in [*parents, leaf]:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            return [f"{dotted!r} is not a field of the job spec"]
        node = field.annotation
        args = [a for a in getattr(node, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        node = args[0] if args else node
    try:
        spec = JobSpec.model_validate(apply_overrides(base, {dotted: value}))
    except ValidationError as exc:
        return [e["msg"] for e in exc.errors()]
    return semantic_problems(spec)


def validate(tree: Any, source: str = "job spec") -> JobSpec:
    if not isinstance(tree, dict):
        raise JobSpecError(source, [f"(top level): expected a mapping of sections, got {type(tree).__name__}"])
    try:
        spec = JobSpec.model_validate(tree)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise JobSpecError(source, problems) from None
    problems = semantic_problems(spec)
    if problems:
        raise JobSpecError(source, problems)
    return spec


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, expand, override and validate a job YAML; raises JobSpecError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise JobSpecError(str(path), ["file not found"])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start]
        raise JobSpecError(str(path), [f"not UTF-8 text: byte 0x{bad:02x} at offset {exc.start}"]) from None
    tree, problems = _expanded_tree(str(path), text)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
            continue
        if isinstance(tree, dict):
            _set(tree, key.strip(), value.strip(), problems)
    if problems:
        raise JobSpecError(str(path), problems)
    return validate(tree, str(path))


def _expanded_tree(source: str, text: str) -> tuple[Any, list[str]]:
    """The document with ``${...}`` expanded scalar by scalar (jobenv), and the reference problems."""
    try:
        tree, problems = jobenv.expand_tree(text, _JobLoader)
    except yaml.YAMLError as exc:
        raise JobSpecError(source, [_yaml_problem(exc)]) from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise JobSpecError(source, ["YAML nested too deeply to read (a job spec is a few levels deep)"]) from None
    if problems:
        raise JobSpecError(source, problems)
    return tree or {}, []
