"""The real Ray Train loop on GPUs (``scaling.use_gpu: true``): a few steps, a checkpoint, a
resume; then ``flowpp evaluate|sample|promote --device cuda`` on the model it registered.
On 2 workers sharing one GPU (gloo over CUDA tensors), and on 2 ranks where 2 GPUs exist
(NCCL). Skipped without CUDA (tests/conftest.py), and without Ray or MLflow installed (a bare
GPU machine: see bench/gpu_wheels and bench/gpu_tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.train")
pytest.importorskip("mlflow")

from orchestrator.cli import main  # noqa: E402
from orchestrator.config import validate  # noqa: E402
from tests.jobs import tiny_job  # noqa: E402
from tests.rayauth import token_auth  # noqa: E402
from tests.rayfixtures import local_ray  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_ray(tmp_path_factory):
    import ray

    auth = token_auth(tmp_path_factory.mktemp("ray-auth"))
    with local_ray(num_cpus=4):
        assert ray.cluster_resources().get("GPU", 0) >= 1
        yield
    auth.restore()


def gpu_job(tmp_path: Path, workers: int, **overrides):
    return validate(
        tiny_job(
            tmp_path,
            scaling__use_gpu=True,
            scaling__num_workers=workers,
            train__max_steps=20,
            train__checkpoint_every=10,
            train__eval_every=20,
            **overrides,
        )
    )


def records(tmp_path: Path, rank: int) -> list[dict]:
    path = tmp_path / "trace" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_gpu_trains_checkpoints_resumes_and_its_model_is_served_on_cuda(tmp_path, gpu_ray, capsys):
    from orchestrator.driver.launch import run_training

    spec = gpu_job(tmp_path, 1)
    result = run_training(spec)
    assert result.error is None and result.metrics["step"] == 20
    assert math.isfinite(result.metrics["val_bpd"]) and math.isfinite(result.metrics["val_bpd_iw"])
    final = [r for r in records(tmp_path, 0) if "final_step" in r]
    assert final[-1]["device"].startswith("cuda")

    longer = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 30})})
    assert run_training(longer).metrics["step"] == 30
    steps = [r for r in records(tmp_path, 0) if "step" in r]
    second = [r["step"] for r in steps if r["pid"] != steps[0]["pid"]]
    assert second == list(range(20, 30))  # resumed from the step-20 checkpoint, not from 0

    uri, model = spec.mlflow.tracking_uri, f"models:/{spec.mlflow.registered_model}/1"
    common = ["--tracking-uri", uri, "--device", "cuda"]
    assert main(["evaluate", "--model", model, "--data", spec.data.valid, "--iw-samples", "2", *common]) == 0
    assert "(cuda)" in capsys.readouterr().out
    assert main(["sample", "--model", model, "-n", "4", "--out", str(tmp_path / "s.png"), *common]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert main(["promote", "--model", spec.mlflow.registered_model, *common]) == 0
    assert "promoted" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_ranks_train_over_nccl_and_end_identical(tmp_path, gpu_ray):
    from orchestrator.driver.launch import run_training

    result = run_training(gpu_job(tmp_path, 2))
    assert result.error is None and result.metrics["step"] == 20
    finals = [[r for r in records(tmp_path, rank) if "final_step" in r][-1] for rank in (0, 1)]
    assert finals[0]["params_sha256"] == finals[1]["params_sha256"]
    assert all(f["device"].startswith("cuda") for f in finals)


def test_two_workers_share_one_gpu_over_gloo_and_end_identical_after_a_resume(tmp_path, gpu_ray):
    """The multi-rank path on a single GPU: 2 Ray Train workers at half a GPU each, DDP over gloo with
    CUDA tensors (scaling.gpus_per_worker: 0.5): the init broadcast, the gradient all-reduce, a
    checkpoint, and a resume from it, all on cuda, with both ranks' parameters equal at each end."""
    from orchestrator.driver.launch import run_training

    spec = gpu_job(tmp_path, 2, scaling__gpus_per_worker=0.5)
    result = run_training(spec)
    assert result.error is None and result.metrics["step"] == 20
    longer = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 30})})
    assert run_training(longer).metrics["step"] == 30
    for rank in (0, 1):
        steps = [r for r in records(tmp_path, rank) if "step" in r]
        assert [r["step"] for r in steps if r["pid"] != steps[0]["pid"]] == list(range(20, 30)), rank  # resumed
    finals = [[r for r in records(tmp_path, rank) if "final_step" in r] for rank in (0, 1)]
    for first, second in zip(*finals, strict=True):  # at step 20, then at step 30
        assert first["params_sha256"] == second["params_sha256"]
        assert first["device"].startswith("cuda") and second["device"].startswith("cuda")
    assert [f["final_step"] for f in finals[0]] == [20, 30]
