"""bench/gpu_check without a GPU: the dry run's plan and FLOPs, MFU and the peak table, arguments,
and the benchmark loop itself on the CPU (real train_step; OOM, errors and the budget)."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_bench

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PLAN_LINE = re.compile(r"^\s+\d+\. batch (\d+) (\w+) checkpoint=(\w+) ([\w+-]+)$", re.M)


@pytest.fixture(autouse=True)
def one_thread():
    """As main sets for CPU work: OpenMP threads that share the cores with other work crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_flops(monkeypatch):
    """1 GFLOP per image: the real count runs in the dry-run test."""
    monkeypatch.setattr(gpu_bench, "count_flops", lambda mode, preset, device, config=None: {"step": 1e9})


def test_dry_run_plans_eight_configs_official_first_and_counts_flops():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    cmd = [sys.executable, "bench/gpu_check", "--dry-run", "--preset", "debug", "--skip-tests"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "plan: 8 configurations" in proc.stdout
    planned = [(int(b), p, m, v) for b, p, m, v in PLAN_LINE.findall(proc.stdout)]
    expected = itertools.product((9, 64), ("fp32", "bf16"), ("attention",), ("eager", "compile+fused"))
    assert sorted(planned) == sorted(expected)
    assert planned[:2] == [(9, "fp32", "attention", "eager"), (9, "bf16", "attention", "eager")]
    flops = re.search(r"^FLOPs/image: ([\d,]+) ", proc.stdout, re.M)
    assert flops and int(flops.group(1).replace(",", "")) > 0, proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the automatic dry run is for machines without CUDA")
def test_no_cuda_means_a_dry_run(fake_flops, capsys):
    assert gpu_bench.main(["--preset", "debug", "--skip-tests", "--batches", "9"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device: dry run" in out and "plan: 4 configurations" in out


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA H200", 989), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA A100-SXM4-80GB", 312),
     ("NVIDIA H100 PCIe", None), ("NVIDIA H200 MIG 1g.18gb", None), ("NVIDIA GeForce RTX 4090", None)],
)  # fmt: skip
def test_peak_table(name, tflops):
    assert gpu_bench.peak_flops(name) == (tflops and tflops * 1e12)
    assert gpu_bench.peak_flops(name, override_tflops=100.0) == 100e12


def test_mfu_arithmetic_and_table_row():
    assert gpu_bench.mfu(175e9, 1000.0, 989e12) == pytest.approx(0.17695, abs=1e-5)
    assert gpu_bench.mfu(175e9, 1000.0, None) is None and gpu_bench.mfu(None, 1000.0, 989e12) is None
    row = gpu_bench.Row(gpu_bench.Config(9, "bf16", "attention"), step_s=0.009, images_s=1000.0, peak_bytes=3 * 2**30)
    oom = gpu_bench.Row(gpu_bench.Config(64, "fp32", "none"), note="OOM")
    lines = gpu_bench.table([row, oom], 175e9, 989e12)
    assert lines[2] == "| 9 | bf16 | attention | eager | 9.0 | 1,000.0 | 3.00 | 17.69 | - |"
    assert lines[3] == "| 64 | fp32 | none | eager | OOM | - | - | - | - |"


@pytest.mark.parametrize(
    "argv, flag",
    [(["--batches", "0"], "--batches"), (["--batches", "9,x"], "--batches"), (["--precisions", "fp16"], "--precisions"),
     (["--modes", "selective"], "--modes"), (["--steps", "0"], "--steps"), (["--warmup", "-1"], "--warmup"),
     (["--variants", "compile+turbo"], "--variants")],
)  # fmt: skip
def test_bad_arguments_name_their_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_defaults_and_out_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_bench.parse_args([])
    assert (args.batches, args.precisions, args.modes) == ([9, 64], ["fp32", "bf16"], ["attention"])
    assert args.variants == ["eager", "compile+fused"]
    assert (args.warmup, args.steps, args.budget_s, args.tests_timeout) == (3, 10, 420.0, 300.0)
    assert args.out == tmp_path / "gpu_check.md"


def test_cpu_run_of_the_real_train_step_writes_the_table(fake_flops, tmp_path):
    out = tmp_path / "gpu_check.md"
    argv = ["--device", "cpu", "--preset", "debug", "--batches", "2", "--modes", "attention", "--warmup", "0",
            "--steps", "1", "--skip-tests", "--peak-tflops", "1", "--variants", "eager", "--out", str(out)]  # fmt: skip
    assert gpu_bench.main(argv) == 0
    text = out.read_text()
    assert "step: orchestrator.step.train_step;" in text
    sampled = re.search(
        r"^sample\(16\): ([\d,.]+) ms .* against log_prob\(16\) ([\d,.]+) ms, ratio ([\d.]+)", text, re.M
    )
    assert sampled and float(sampled.group(1).replace(",", "")) > 0, text
    assert re.search(r"-> goal sample <= log_prob (MET|NOT met)$", text, re.M)
    rows = [ln.split(" | ") for ln in text.splitlines() if re.match(r"\| 2 \| ", ln)]
    assert [(r[1], r[2]) for r in rows] == [("fp32", "attention"), ("bf16", "attention")]
    for r in rows:
        images_s, mfu_pct = float(r[5].replace(",", "")), float(r[7])
        assert images_s > 0 and float(r[4].replace(",", "")) > 0
        assert mfu_pct == pytest.approx(100 * 1e9 * images_s / 1e12, abs=0.01)


def _args(*argv: str):
    return gpu_bench.parse_args(["--device", "cpu", "--preset", "debug", "--warmup", "0", "--steps", "1",
                                 "--skip-tests", "--modes", "none", "--precisions", "fp32", "--variants", "eager",
                                 *argv])  # fmt: skip


def test_oom_is_a_row_and_the_rest_go_on(fake_flops, capsys):
    def step(model, opt, x, *, lr, grad_clip):
        if x.shape[0] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return False

    args = _args("--batches", "2,3,4")
    assert gpu_bench.bench(args, torch.device("cpu"), gpu_bench.time.perf_counter(), step_fn=step) == 0
    out = capsys.readouterr().out
    assert "| 3 | fp32 | none | eager | OOM | - | - | - | - |" in out
    assert re.search(r"^\| 4 \| fp32 \| none \| eager \| [\d,.]+ \|", out, re.M)


def test_an_error_is_a_row_and_fails_the_run(fake_flops, capsys):
    def step(model, opt, x, *, lr, grad_clip):
        raise RuntimeError("boom")

    args = _args("--batches", "2")
    assert gpu_bench.bench(args, torch.device("cpu"), gpu_bench.time.perf_counter(), step_fn=step) == 1
    assert "| 2 | fp32 | none | eager | error: RuntimeError: boom |" in capsys.readouterr().out


def test_spent_budget_skips_configs(fake_flops, capsys):
    args = _args("--batches", "2,3", "--budget-s", "1")
    started = gpu_bench.time.perf_counter() - 10  # the tests took the budget
    assert gpu_bench.bench(args, torch.device("cpu"), started, step_fn=None) == 0
    assert capsys.readouterr().out.count("skipped: budget (0 s left") == 2 * 2  # progress lines and the table


def test_budget_estimate_scales_the_slowest_step_per_image():
    args = _args()
    done = [gpu_bench.Row(gpu_bench.Config(9, "fp32", "none"), step_s=0.9, images_s=10.0, setup_s=2.0)]
    assert gpu_bench.estimate_s(gpu_bench.Config(64, "fp32", "none"), [], args) == 0.0
    assert gpu_bench.estimate_s(gpu_bench.Config(64, "fp32", "none"), done, args) == pytest.approx(2.0 + 6.4)
    done.append(gpu_bench.Row(gpu_bench.Config(32, "bf16", "none"), step_s=1.6, images_s=20.0, setup_s=1.0))
    assert gpu_bench.estimate_s(gpu_bench.Config(64, "fp32", "none"), done, args) == pytest.approx(2.0 + 3.2)


def test_goal_lines_take_the_fastest_qualifying_row():
    def row(batch, precision, images_s, variant="eager"):
        return gpu_bench.Row(gpu_bench.Config(batch, precision, "attention", variant), step_s=1.0, images_s=images_s)

    rows = [row(9, "fp32", 160.0), row(9, "bf16", 120.0), row(64, "bf16", 900.0), row(64, "fp32", 2000.0),
            row(128, "bf16", 1200.0, "compile+fused")]  # fmt: skip
    big, official = gpu_bench.goal_lines(rows)
    assert big.endswith("best 1,200.0 (batch 128 bf16 checkpoint=attention compile+fused) -> MET")
    assert official.endswith("best 160.0 (batch 9 fp32 checkpoint=attention eager) -> MET")
    big, official = gpu_bench.goal_lines([row(64, "bf16", 900.0), row(32, "bf16", 5000.0)])
    assert big.endswith("-> NOT met") and official.endswith("not measured")


def test_a_compiled_variant_runs_and_reports_its_compile_time(fake_flops, tmp_path):
    out = tmp_path / "gpu_check.md"
    argv = ["--device", "cpu", "--preset", "debug", "--batches", "2", "--precisions", "fp32", "--warmup", "1",
            "--steps", "1", "--skip-tests", "--variants", "fused,compile+fused", "--out", str(out)]  # fmt: skip
    assert gpu_bench.main(argv) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 2 |")]
    assert [r.split(" | ")[3] for r in rows] == ["fused", "compile+fused"]
    assert rows[0].endswith("| - |")  # eager: no compile time
    assert float(rows[1].rsplit("|", 2)[1]) >= 0  # compiled: its first step less a steady one
