"""bench/gpu_check without a GPU: call 1's priced plan (the dry run CI makes), its arguments, MFU
and the table, and the benchmark itself on the CPU: the real train_step, OOM, errors, the
budget, compiled rows in child processes (aot_eager) and a compile cut at its window."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_bench, gpu_plan, gpu_report, gpu_row, gpu_tests
from bench.gpu_plan import Config, Row

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ESTIMATE = re.compile(r"^ +(\d+)([ *]) (.*)$", re.M)


@pytest.fixture(autouse=True)
def one_thread():
    """As main sets for CPU work: OpenMP threads that share the cores with other work crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dry_run(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    cmd = [sys.executable, "bench/gpu_check", "--dry-run", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_dry_run_of_call_1_prices_every_step_compile_included_and_fits_its_budget():
    """The real plan (imagenet64, every default): CI's check that call 1 fits in 5 minutes."""
    proc = dry_run("--no-flops")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    priced = proc.stdout.split("(* runs inside the compile window")[0]
    steps = [(int(s), mark == "*", name) for s, mark, name in ESTIMATE.findall(priced)]
    names = [name for _, _, name in steps]
    goals = ["batch 64 bf16 checkpoint=none compile+fused", "batch <=256 (largest that fits) bf16 checkpoint=none "
             "compile+fused", "batch 9 bf16 checkpoint=none compile+fused"]  # fmt: skip
    eager = [
        f"batch {b} {p} checkpoint={m} eager" for b in (9, 64) for m in ("none", "attention") for p in ("fp32", "bf16")
    ]
    compile_at = next(i for i, n in enumerate(names) if n.startswith("compile 3 rows at once"))
    assert names[:compile_at] == [n for n in names[:compile_at] if not n.startswith("  ")]  # setup, preflight, probe
    assert [n.removeprefix("  meanwhile here: ") for n in names[compile_at + 1 : compile_at + 9]] == eager
    assert [n.removeprefix("  ").removesuffix(": timed alone") for n in names[-3:]] == goals
    window = steps[compile_at][0]
    assert window >= gpu_plan.PRIORS["imagenet64"].compile_s  # priced with its compile, not at the eager rate
    counted = sum(s for s, inside, name in steps if not inside)
    # against call 1's real limit, its documented timeout_s (test_the_documented_calls_...): 300 s
    total = re.search(r"^ +(\d+)  call 1 in all, setup included, against --call-s 300: fits$", proc.stdout, re.M)
    inside = re.search(r"^ +(\d+)  bench/gpu_check, against its --budget-s 240: fits$", proc.stdout, re.M)
    most = re.search(r"^ +(\d+)  call 1 at most \(setup, preflight, all of --budget-s 240, 10 s to stop\), "
                     r"against --call-s 300: fits$", proc.stdout, re.M)  # fmt: skip
    assert total and inside and most, proc.stdout
    assert abs(int(total.group(1)) - counted) <= len(steps)  # the total is the sum of its rounded lines
    assert int(inside.group(1)) <= 240 and int(total.group(1)) <= 300
    before = sum(s for s, _, name in steps if name.startswith(("setup: ", "preflight: ")))
    assert int(most.group(1)) == before + 240 + gpu_plan.STOP_S <= 300  # the budget leaves room for the setup


CALL = re.compile(
    r'^\*\*Call (\d), "(\w+)"\*\*: `kind: "([^"]+)"`, `carry: (\[[^]]*\])`, `timeout_s: (\d+)`\n\n```bash\n(.+)\n```$',
    re.M,
)
LEASE_S, START_S = 900, 90  # a lent machine's device time in all, and its start (~1.5 min)


def documented_calls(page: Path) -> dict[int, tuple[str, str, str, int, str]]:
    return {int(n): (name, kind, carry, int(t), cmd) for n, name, kind, carry, t, cmd in CALL.findall(page.read_text())}


def test_the_documented_calls_are_what_the_budgets_are_checked_against():
    """README.md gives both calls as docs/performance.md does; call 1's timeout_s is the --call-s the
    dry run checks, and each call's own budget leaves room for its setup within its timeout_s."""
    calls = documented_calls(ROOT / "README.md")
    assert calls == documented_calls(ROOT / "docs" / "performance.md") and sorted(calls) == [1, 2]
    (name1, _, carry1, limit1, cmd1), (name2, _, carry2, limit2, cmd2) = calls[1], calls[2]
    assert (name1, name2) == ("answer", "tests") and carry1 == carry2 == '[".whl"]'
    assert cmd1.startswith("bench/gpu_setup && ") and cmd1.endswith("python3 -m bench.gpu_preflight && bench/gpu_check")
    assert cmd2.startswith("bench/gpu_setup && ") and cmd2.endswith("python3 -m bench.gpu_tests")
    args = gpu_bench.parse_args([])
    assert limit1 == args.call_s == gpu_bench.CALL_S <= 300  # at most 5 minutes, setup included
    assert gpu_plan.call_at_most_s(args.budget_s) <= limit1
    assert limit2 == gpu_tests.CALL_S <= 300
    assert limit2 >= gpu_plan.SETUP_S + gpu_tests.BUDGET_S + gpu_plan.STOP_S
    planned1 = sum(line.seconds for line in gpu_plan.price(gpu_bench.make_plan(args)) if line.counted)
    assert START_S + limit1 + limit2 + max(limit2, planned1) <= LEASE_S  # room to rerun one call (call 1 as planned)


@pytest.mark.slow
def test_a_plan_over_its_budget_fails_the_dry_run():
    proc = dry_run("--no-flops", "--budget-s", "120")
    assert proc.returncode == 1
    assert re.search(r"bench/gpu_check, against its --budget-s 120: OVER$", proc.stdout, re.M)
    proc = dry_run("--no-flops", "--compile-jobs", "1", "--call-s", "300")  # one compile after another: too long
    assert proc.returncode == 1 and "against --call-s 300: OVER" in proc.stdout


@pytest.mark.slow
def test_the_dry_run_counts_flops_unless_told_not_to():
    proc = dry_run("--preset", "debug")
    assert proc.returncode == 0, proc.stderr
    flops = re.search(r"^FLOPs/image: ([\d,]+) ", proc.stdout, re.M)
    assert flops and int(flops.group(1).replace(",", "")) > 0, proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the automatic dry run is for machines without CUDA")
def test_no_cuda_means_a_dry_run(capsys):
    assert gpu_bench.main(["--preset", "debug", "--no-flops"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device: dry run" in out and "batch 9 bf16 checkpoint=none compile+fused: timed alone" in out


def test_estimates_use_measured_rows_and_compiles_once_there_are_some():
    prior = gpu_plan.PRIORS["imagenet64"]
    bf16_64 = Config(64, "bf16", "none")
    assert gpu_plan.step_estimate_s(bf16_64, [], prior, 256) == pytest.approx(0.27 + 64 * 175e9 / 150e12)
    done = [Row(Config(9, "bf16", "none"), step_s=0.3), Row(Config(64, "fp32", "none"), step_s=9.0)]
    assert gpu_plan.step_estimate_s(bf16_64, done, prior, 256) == pytest.approx(0.3 * 64 / 9)  # same precision only
    assert gpu_plan.step_estimate_s(Config(9, "fp32", "none"), done, prior, 256) == pytest.approx(9.0)  # larger: as is
    compiled = Config(64, "bf16", "none", "compile+fused")
    assert gpu_plan.step_estimate_s(compiled, done, prior, 256) < gpu_plan.step_estimate_s(bf16_64, [], prior, 256)
    assert gpu_plan.compile_estimate_s(done, prior) == prior.compile_s
    done.append(Row(compiled, step_s=0.05, compile_s=40.0))
    assert gpu_plan.compile_estimate_s(done, prior) == 40.0
    assert gpu_plan.compile_window_s(3, done, prior) == pytest.approx(gpu_plan.CHILD_START_S + prior.setup_s + 40 * 1.2)


def test_mfu_arithmetic_and_table_row():
    row = Row(Config(9, "bf16", "attention"), step_s=0.009, images_s=1000.0, peak_bytes=3 * 2**30)
    cut = Row(Config(64, "bf16", "none", "compile+fused"), note="compile over 120 s")
    lines = gpu_report.table([row, cut], 175e9, 989e12)
    assert lines[2] == "| 9 | bf16 | attention | eager | 9.0 | 1,000.0 | 3.00 | 17.69 | - |"
    assert lines[3] == "| 64 | bf16 | none | compile+fused | compile over 120 s | - | - | - | - |"


@pytest.mark.parametrize(
    "argv, flag",
    [(["--batches", "0"], "--batches"), (["--batches", "9,x"], "--batches"), (["--precisions", "fp16"], "--precisions"),
     (["--modes", "selective"], "--modes"), (["--steps", "0"], "--steps"), (["--warmup", "0"], "--warmup"),
     (["--goal-variant", "fused"], "--goal-variant"), (["--goal-variant", "compile+turbo"], "--goal-variant")],
)  # fmt: skip
def test_bad_arguments_name_their_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_defaults_and_out_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_bench.parse_args([])
    assert (args.goal_batch, args.official_batch, args.max_batch, args.goal_variant) == (64, 9, 256, "compile+fused")
    assert (args.batches, args.precisions, args.modes) == ([9, 64], ["fp32", "bf16"], ["none", "attention"])
    assert (args.warmup, args.steps, args.budget_s, args.call_s, args.compile_jobs) == (3, 10, 240.0, 300.0, 3)
    assert args.out == tmp_path / "gpu_check.md"


def cpu_args(*argv: str):
    fixed = ["--device", "cpu", "--preset", "debug", "--warmup", "1", "--steps", "1", "--no-flops", "--no-goals"]
    return gpu_bench.parse_args([*fixed, "--precisions", "fp32", "--modes", "none", "--no-sample", "--no-ema", *argv])


@pytest.mark.slow
def test_cpu_run_of_the_real_train_step_writes_the_table_sample_and_ema(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_bench, "train_flops_per_image", lambda config, device: 1e9)  # the real one: dry run
    out = tmp_path / "gpu_check.md"
    args = cpu_args("--batches", "2", "--precisions", "fp32,bf16", "--peak-tflops", "1", "--out", str(out))
    args.no_flops = False
    assert gpu_bench.bench(args, torch.device("cpu"), time.perf_counter()) == 0
    text = out.read_text()
    assert "step: orchestrator.training.step.train_step;" in text
    rows = [ln.split(" | ") for ln in text.splitlines() if ln.startswith("| 2 | ")]
    assert [(r[1], r[2], r[3]) for r in rows] == [("fp32", "none", "eager"), ("bf16", "none", "eager")]
    for r in rows:
        images_s = float(r[5].replace(",", ""))
        assert images_s > 0 and float(r[7]) == pytest.approx(100 * 1e9 * images_s / 1e12, abs=0.01)
    args = cpu_args("--batches", "2", "--goal-batch", "2", "--out", str(out))
    args.no_sample = args.no_ema = False
    assert gpu_bench.bench(args, torch.device("cpu"), time.perf_counter()) == 0
    text = out.read_text()
    assert re.search(r"^sample\(16\): [\d,.]+ ms .* -> goal sample <= log_prob (MET|NOT met)$", text, re.M)
    ema = re.search(
        r"^train_step \+ EMA.update \(batch 2 bf16 .*\): ([\d,.]+) ms against train_step alone ([\d,.]+)", text, re.M
    )
    assert ema and float(ema.group(1)) > 0 and float(ema.group(2)) > 0, text


@pytest.mark.slow
def test_oom_is_a_row_an_error_fails_the_run_and_the_rest_go_on(capsys):
    def step(model, opt, x, *, lr, grad_clip):
        if x.shape[0] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if x.shape[0] == 4:
            raise RuntimeError("boom")
        return False

    args = cpu_args("--batches", "2,3,4,5")
    assert gpu_bench.bench(args, torch.device("cpu"), time.perf_counter(), step_fn=step) == 1
    out = capsys.readouterr().out
    assert "| 3 | fp32 | none | eager | OOM | - | - | - | - |" in out
    assert "| 4 | fp32 | none | eager | error: RuntimeError: boom |" in out
    assert re.search(r"^\| 5 \| fp32 \| none \| eager \| [\d,.]+ \|", out, re.M)


def test_a_spent_budget_skips_rows(capsys):
    args = cpu_args("--batches", "2,3", "--budget-s", "1")
    assert gpu_bench.bench(args, torch.device("cpu"), time.perf_counter() - 10) == 0
    assert capsys.readouterr().out.count("skipped: budget (0 s left") == 2 * 2  # progress lines and the table


@pytest.mark.slow
def test_goal_rows_compile_at_once_in_children_then_are_timed_with_the_ema_step(tmp_path):
    """The whole call-1 order on the CPU: goal rows (aot_eager: traced, no kernels) in child
    processes while the eager rows run here, then timed; the goal batch's child times the EMA step."""
    out = tmp_path / "gpu_check.md"
    args = cpu_args("--batches", "2", "--goal-batch", "2", "--official-batch", "1", "--max-batch", "4",
                    "--compile-backend", "aot_eager", "--out", str(out))  # fmt: skip
    args.no_goals = args.no_ema = False
    assert gpu_bench.bench(args, torch.device("cpu"), time.perf_counter()) == 0
    text = out.read_text()
    rows = [ln.split(" | ") for ln in text.splitlines() if re.match(r"\| \d+ \| ", ln)]
    assert [(int(r[0][2:]), r[3]) for r in rows][:4] == [(2, "compile+fused"), (4, "compile+fused"),
                                                         (1, "compile+fused"), (2, "eager")]  # fmt: skip
    for r in rows[:3]:
        assert float(r[4].replace(",", "")) > 0 and float(r[8].strip(" |")) >= 0  # step ms, compile s
    child = r"^train_step \+ EMA.update \(batch 2 bf16 checkpoint=none compile\+fused, in its child\): [\d.]+ ms"
    assert re.search(child, text, re.M), text
    assert "compiling 3 goal row(s) at once" in text


def test_a_compile_that_outruns_its_window_is_cut_and_its_process_group_killed():
    spec = {
        "preset": "debug",
        "warmup": 1,
        "steps": 1,
        "device": "cpu",
        "backend": "aot_eager",
        "threads": 1,
        "ema": False,
    }
    group = gpu_row.Group([Config(2, "bf16", "none", "compile")], [spec], window_s=0.5)
    pid = group.children[0].proc.pid
    [(row, ema)] = list(group.rows(step_timeout_s=30))
    assert row.note == "compile over 0 s" and row.step_s is None and ema is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of its session is left


def test_goal_lines_take_the_fastest_qualifying_row():
    def row(batch, precision, images_s, variant="eager"):
        return Row(Config(batch, precision, "none", variant), step_s=1.0, images_s=images_s)

    rows = [row(9, "fp32", 160.0), row(9, "bf16", 120.0), row(64, "bf16", 900.0), row(64, "fp32", 2000.0),
            row(128, "bf16", 1200.0, "compile+fused")]  # fmt: skip
    big, official = gpu_report.goal_lines(rows)
    assert big.endswith("best 1,200.0 (batch 128 bf16 checkpoint=none compile+fused) -> MET")
    assert official.endswith("best 160.0 (batch 9 fp32 checkpoint=none eager) -> MET")
    big, official = gpu_report.goal_lines([row(64, "bf16", 900.0), row(32, "bf16", 5000.0)])
    assert big.endswith("-> NOT met") and official.endswith("not measured")
