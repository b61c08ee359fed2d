"""The job spec: every file in jobs/ validates; bad specs list every problem with its path."""

import os
from pathlib import Path

import pytest

from orchestrator.config import JobSpecError, load_job, public_params, validate
from orchestrator.config.spec import batching
from tests.jobs import tiny_job

pytestmark = pytest.mark.unit

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))
GOOD = """
name: t
data: {train: s3://b/train/manifest.json, valid: s3://b/valid/manifest.json}
"""


def _write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_file_validates(path):
    spec = load_job(path)
    assert spec.model.flow_config() is not None
    for world in range(spec.scaling.min_workers, spec.scaling.max_workers + 1):
        b = spec.batching(world)  # every size of the range makes the global batch exactly
        assert b.micro * b.steps * world == spec.train.global_batch_size, (world, b)


def test_shipped_jobs_that_share_a_registered_model_model_the_same_images():
    """Promotion refuses to compare models of other images: the shipped jobs never mix them."""
    seen: dict[str, tuple] = {}
    for path in JOBS:
        spec = load_job(path)
        cfg = spec.model.flow_config()
        shape = (cfg.image_size, cfg.channels, cfg.num_bits)
        assert seen.setdefault(spec.mlflow.registered_model, shape) == shape, (path.name, spec.mlflow.registered_model)


def test_there_are_jobs():
    assert {"demo.yaml", "imagenet64.yaml"} <= {p.name for p in JOBS}


def test_imagenet64_is_the_official_recipe():
    spec = load_job(Path(JOBS[0]).parent / "imagenet64.yaml")
    assert spec.model.preset == "imagenet64" and spec.model.checkpoint == "none"
    t = spec.train
    assert (t.global_batch_size, t.lr, t.schedule.kind, t.grad_clip, t.ema_decay) == (72, 4e-4, "piecewise", 1.0, 0.999)
    assert spec.scaling.use_gpu and spec.data.train.startswith("s3://") and spec.storage.path.startswith("s3://")
    assert (t.init_batch_size, t.final_eval_samples) == (72, 16)


def test_imagenet64_5bit_is_the_official_5_bit_recipe():
    spec = load_job(Path(JOBS[0]).parent / "imagenet64-5bit.yaml")
    cfg = spec.model.flow_config()
    assert (cfg.num_bits, cfg.num_levels, cfg.image_size) == (5, 32, 64)
    t = spec.train
    assert (t.global_batch_size, t.init_batch_size, t.ema_decay, t.grad_clip) == (60, 60, 0.999, 1.0)
    assert spec.per_worker_batch * spec.scaling.num_workers == 60


@pytest.mark.parametrize(
    ("world", "micro", "want"),
    [(1, None, (72, 72, 1)), (8, None, (9, 9, 1)), (8, 4, (9, 3, 3)), (1, 16, (72, 12, 6)), (3, 16, (24, 12, 2)),
     (6, 5, (12, 4, 3)), (2, 1000, (36, 36, 1)), (4, 1, (18, 1, 18))],
)  # fmt: skip
def test_every_world_size_makes_the_global_batch_with_micro_batches_under_the_bound(world, micro, want):
    """micro x steps x world == global at every size, each micro-batch at most the bound, the
    fewest micro-batches that split a worker's share exactly."""
    b = batching(72, world, micro)
    assert (b.per_worker, b.micro, b.steps) == want
    assert b.micro * b.steps * world == 72 and (micro is None or b.micro <= micro)


def test_an_elastic_range_is_its_min_and_max_and_the_per_worker_batch_its_largest_size():
    spec = validate(
        tiny_job(Path("/tmp/t"), scaling__num_workers=[1, 4], train__global_batch_size=12, train__micro_batch_size=3)
    )
    s = spec.scaling
    assert (s.min_workers, s.max_workers, s.elastic) == (1, 4, True)
    assert spec.per_worker_batch == 3  # at the largest size
    assert [(spec.batching(w).steps, spec.batching(w).micro) for w in (1, 2, 3, 4)] == [(4, 3), (2, 3), (2, 2), (1, 3)]
    fixed = validate(tiny_job(Path("/tmp/t"), scaling__num_workers=2)).scaling
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic) == (2, 2, False)


MISTAKES = {
    "unknown key": ("train: {lrr: 0.1}", "train.lrr: Extra inputs are not permitted"),
    "wrong type": ("train: {max_steps: lots}", "train.max_steps: Input should be a valid integer"),
    "out of range": ("train: {lr: -1}", "train.lr: Input should be greater than 0"),
    "bad choice": ("model: {checkpoint: sometimes}", "model.checkpoint: Input should be 'none', 'attention' or 'all'"),
    "unknown preset": ("model: {preset: imagenet128}", "model.preset: unknown preset 'imagenet128'"),
    "indivisible batch": (
        "train: {global_batch_size: 10}\nscaling: {num_workers: 4}",
        "train.global_batch_size: 10 is not divisible by scaling.num_workers=4",
    ),
    "elastic range that cannot split the batch": (
        "scaling: {num_workers: [2, 8]}",
        "scaling.num_workers: [2, 8] includes 5, 7 worker(s), which cannot split train.global_batch_size 72 "
        "exactly; the sizes that can: 2, 3, 4, 6, 8",
    ),
    "elastic range upside down": ("scaling: {num_workers: [4, 2]}", "scaling.num_workers: Value error, [4, 2]: give"),
    "elastic range of three": ("scaling: {num_workers: [1, 2, 3]}", "with 1 <= min <= max"),
    "micro-batch of none": ("train: {micro_batch_size: 0}", "train.micro_batch_size: Input should be greater than"),
    "bad name": ("name: 'has spaces'", "name: String should match pattern"),
    "not a manifest": (
        "data: {train: s3://b/train/, valid: s3://b/v/manifest.json}",
        "data.train: 's3://b/train/' should point at a manifest",
    ),
    "unknown section": ("trian: {lr: 1}", "trian: Extra inputs are not permitted"),
    "bad placement": ("scaling: {placement_strategy: RANDOM}", "scaling.placement_strategy: Input should be"),
    "seed past what numpy takes per rank": (
        "train: {seed: 20241202}",
        "train.seed: Input should be less than or equal to 4000000",
    ),
    "infinite retry budget": (
        "storage: {retry_budget_s: .inf}",
        "storage.retry_budget_s: Input should be a finite number",
    ),
    "infinite mlflow budget": (
        "mlflow: {retry_budget_s: .inf}",
        "mlflow.retry_budget_s: Input should be a finite number",
    ),
    "infinite grad clip": ("train: {grad_clip: .inf}", "train.grad_clip: Input should be a finite number"),
    "NaN rate": ("train: {lr: .nan}", "train.lr: Input should be a finite number"),
    "system metrics every nanosecond": (
        "mlflow: {system_metrics_interval_s: 1.0e-9}",
        "mlflow.system_metrics_interval_s: Input should be greater than or equal to 0.1",
    ),
    "registry name with a slash": (
        "mlflow: {registered_model: a/b}",
        "mlflow.registered_model: String should match pattern",
    ),
    "lock stale before two beats": (
        "storage: {lock: {heartbeat_s: 30, stale_s: 45}}",
        "storage.lock.stale_s: 45 s must exceed twice storage.lock.heartbeat_s (30 s)",
    ),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_each_kind_of_mistake_is_named_with_its_path(tmp_path, kind):
    extra, expected = MISTAKES[kind]
    text = (
        GOOD + extra
        if not extra.startswith(("name:", "data:"))
        else GOOD.replace(GOOD.strip().splitlines()[0 if extra.startswith("name:") else 1], extra)
    )
    with pytest.raises(JobSpecError) as err:
        load_job(_write(tmp_path, text))
    assert expected in str(err.value), str(err.value)


def test_all_problems_are_reported_at_once(tmp_path):
    text = GOOD + "train: {lrr: 1, max_steps: lots}\nmodel: {checkpoint: x}\nscaling: {num_workers: 0}\n"
    with pytest.raises(JobSpecError) as err:
        load_job(_write(tmp_path, text))
    assert len(err.value.problems) == 4
    for path in ("train.lrr", "train.max_steps", "model.checkpoint", "scaling.num_workers"):
        assert path in str(err.value)


def test_missing_section_yaml_syntax_and_top_level(tmp_path):
    with pytest.raises(JobSpecError, match="data: Field required"):
        load_job(_write(tmp_path, "name: t\n"))
    with pytest.raises(JobSpecError, match=r"YAML syntax error at line 3"):
        load_job(_write(tmp_path, "name: t\ntrain: {lr: [1, 2\n"))
    with pytest.raises(JobSpecError, match="expected a mapping"):
        validate([1, 2])
    with pytest.raises(JobSpecError, match="file not found"):
        load_job(tmp_path / "nope.yaml")
    with pytest.raises(JobSpecError, match="YAML nested too deeply to read"):
        load_job(_write(tmp_path, GOOD + "x: " + "[" * 3000 + "]" * 3000 + "\n"))


def test_set_overrides_any_field(tmp_path):
    spec = load_job(
        _write(tmp_path, GOOD),
        [
            "train.lr=3e-4",
            "model.num_components=8",
            "scaling.use_gpu=true",
            "model.stages=[s2d, 'stripe:2']",
            "mlflow.experiment=x",
        ],
    )
    assert spec.train.lr == 3e-4 and spec.model.num_components == 8 and spec.scaling.use_gpu
    assert spec.model.stages == ["s2d", "stripe:2"] and spec.mlflow.experiment == "x"
    assert spec.model.flow_config().num_components == 8
    with pytest.raises(JobSpecError, match="train.nope: Extra inputs"):
        load_job(_write(tmp_path, GOOD), ["train.nope=1"])
    with pytest.raises(JobSpecError, match="expected KEY=VALUE"):
        load_job(_write(tmp_path, GOOD), ["train.lr"])


def test_model_width_and_depth_override_the_main_flow_only(tmp_path):
    spec = load_job(_write(tmp_path, GOOD), ["model.hidden=32", "model.num_blocks=2"])
    cfg, preset = spec.model.flow_config(), load_job(_write(tmp_path, GOOD)).model.flow_config()
    assert (cfg.net.hidden, cfg.net.num_blocks) == (32, 2) != (preset.net.hidden, preset.net.num_blocks)
    assert cfg.dequant == preset.dequant and cfg.net.num_heads == preset.net.num_heads
    with pytest.raises(JobSpecError, match=r"model.hidden: 33 is not divisible by the 2 attention heads"):
        load_job(_write(tmp_path, GOOD), ["model.hidden=33"])
    assert load_job(_write(tmp_path, GOOD), ["data.prepare_flip=true"]).data.prepare_flip


def test_env_expansion_and_secret_free_params(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWPP_X", "s3://from-env")
    monkeypatch.delenv("FLOWPP_NOPE_Q", raising=False)
    spec = load_job(_write(tmp_path, GOOD + "storage: {path: '${FLOWPP_X}/a ${FLOWPP_NOPE_Q:-dflt}'}\n"))
    assert spec.storage.path == "s3://from-env/a dflt"
    spec = load_job(
        _write(tmp_path, GOOD + "ray:\n  runtime_env:\n    env_vars: {AWS_SECRET_ACCESS_KEY: hush, A: b}\n")
    )
    params = public_params(spec)
    assert "train.lr" in params and params["ray.runtime_env.env_vars.A"] == "***"
    assert params["ray.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"] == "***"
    assert not any("hush" in v for v in params.values())


def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path):
    text = GOOD + "train:\n  lr: 1.0e-4\n  max_steps: 10\n  lr: 3.0e-4\n"
    with pytest.raises(JobSpecError) as err:
        load_job(_write(tmp_path, text))
    (problem,) = err.value.problems
    assert problem.startswith("YAML error at line 7, column 3: duplicate key 'lr' (first at line 5)"), problem
    with pytest.raises(JobSpecError, match="duplicate key 'name'"):
        load_job(_write(tmp_path, GOOD + "name: again\n"))


def test_aliases_and_an_alias_bomb_are_refused_without_expanding(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)
    )
    with pytest.raises(JobSpecError, match=r"line 2, column \d+: aliases \(\*name\) are not allowed"):
        load_job(_write(tmp_path, bomb + GOOD))
    with pytest.raises(JobSpecError, match="aliases"):
        load_job(_write(tmp_path, GOOD + "model: &m {preset: debug}\ntune: {base: *m}\n"))


def test_a_file_that_is_not_utf8_is_one_clear_problem(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_bytes(GOOD.encode() + b"# caf\xe9 in latin-1\n")
    with pytest.raises(JobSpecError) as err:
        load_job(p)
    assert err.value.problems == [f"not UTF-8 text: byte 0xe9 at offset {len(GOOD.encode()) + 5}"]


def test_a_malformed_set_value_is_a_problem_not_a_traceback(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(JobSpecError) as err:
        load_job(path, ["train.lr=[1, 2", "train.max_steps=5", "model.stages=*x"])
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("--set train.lr='[1, 2': not a YAML value (")
    assert problems[1].startswith("--set model.stages='*x': not a YAML value (")
    assert load_job(path, ["train.max_steps=5", "train.warmup_steps=0"]).train.max_steps == 5


@pytest.mark.parametrize(
    ("scaling", "backend"),
    [({"use_gpu": True}, "nccl"), ({"use_gpu": True, "gpus_per_worker": 2}, "nccl"),
     ({"use_gpu": True, "gpus_per_worker": 0.5}, "gloo"), ({}, "gloo")],
)  # fmt: skip
def test_workers_that_share_a_gpu_talk_over_gloo(tmp_path, scaling, backend):
    from orchestrator.driver.launch import process_group_backend

    spec = validate(tiny_job(tmp_path, scaling__num_workers=2, **{f"scaling__{k}": v for k, v in scaling.items()}))
    assert process_group_backend(spec.scaling) == backend


def test_a_fraction_of_gpus_above_one_is_named(tmp_path):
    with pytest.raises(JobSpecError, match=r"scaling.gpus_per_worker: 1.5 GPUs; Ray takes a fraction under 1"):
        validate(tiny_job(tmp_path, scaling__use_gpu=True, scaling__gpus_per_worker=1.5))


def test_the_controller_gets_the_start_timeout_and_the_preemption_poll_interval_while_it_runs(tmp_path, monkeypatch):
    from orchestrator.driver.launch import CONTROLLER_VARS, controller_settings

    timeout, poll = CONTROLLER_VARS
    monkeypatch.setenv(timeout, "600")
    monkeypatch.delenv(poll, raising=False)
    spec = validate(tiny_job(tmp_path, scaling__start_timeout_s=10, scaling__preemption={"poll_interval_s": 0.5}))
    with controller_settings(spec):
        assert (os.environ[timeout], os.environ[poll]) == ("10", "0.5")
    assert os.environ[timeout] == "600" and poll not in os.environ  # put back as they were
    with pytest.raises(JobSpecError, match=r"scaling.preemption.poll_interval_s"):
        validate(tiny_job(tmp_path, scaling__preemption={"poll_interval_s": 0}))
