"""Compiled rows of bench/gpu_check, each in a child process that can be cut.

A compile can outrun the budget by minutes, and a compile cannot be interrupted from inside.
So each compiled row runs in its own process session (``python -m bench.gpu_row SPEC``): the
child builds the model, runs its first step (the compile) and reports ``compiled``; then waits
for ``go`` on stdin before its timed steps, so rows that compile at once are timed one at a time,
alone on the device. The parent (``Group``) kills the child's whole process group, inductor's
compile workers included, when the compile outruns its window: the row reads "compile over N s".

The children share ``TORCHINDUCTOR_CACHE_DIR`` (FX graphs, AOT autograd, Triton kernels): a row
whose graphs were compiled before (a rerun on the same machine, the same batch again) loads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from bench.gpu_plan import Config, Row

ROOT = Path(__file__).resolve().parent.parent
MARK = "@@gpu_row "
CACHE_DIR = os.path.join(tempfile.gettempdir(), "flowpp-inductor-cache")


# -- the child --------------------------------------------------------------------------------
def emit(kind: str, **fields) -> None:
    print(MARK + json.dumps({"kind": kind, **fields}), flush=True)


def child(spec: dict) -> int:
    import torch

    from bench.gpu_steps import first_line, free, is_oom, run_row

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = torch.device(spec["device"])
    config = Config(**spec["config"])

    def after_first() -> None:
        free(device)  # the others compile meanwhile: hold weights and Adam, not the first step's cache
        emit("compiled")
        if sys.stdin.readline().strip() != "go":
            raise SystemExit(0)  # the parent went away or cut the row

    try:
        row, ema = run_row(spec["preset"], config, spec["warmup"], spec["steps"], device, backend=spec["backend"],
                           after_first=after_first, ema=spec["ema"])  # fmt: skip
    except Exception as e:
        traceback.print_exc()
        emit("error", note="OOM" if is_oom(e) else f"error: {first_line(e)}")
        return 1
    emit("result", row=dataclasses.asdict(row), ema=ema)
    return 0


# -- the parent -------------------------------------------------------------------------------
class Child:
    """One compiled row's process; its output is echoed with a tag, its reports queued."""

    def __init__(self, spec: dict, env: dict, tag: str):
        cmd = [sys.executable, "-m", "bench.gpu_row", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        self.reports: queue.Queue = queue.Queue()
        self.tag = tag
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.reports.put(json.loads(line[len(MARK) :]))
            else:
                print(f"  [{self.tag}] {line}", end="", flush=True)
        self.reports.put({"kind": "exit"})

    def wait(self, deadline: float) -> dict | None:
        """The next report (``exit`` once the output ends), or None at ``deadline``."""
        try:
            return self.reports.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            return None

    def go(self) -> None:
        with contextlib.suppress(OSError):  # a child that died meanwhile: its reports end with "exit"
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: inductor's compile workers too
        self.proc.wait()


def child_env(jobs: int) -> dict:
    """The children's environment: one inductor cache; the CPUs shared out, one left to this process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", CACHE_DIR)
    workers = ((os.cpu_count() or 1) - 1 - jobs) // jobs  # besides each child's own main thread
    env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, workers))
    return env


class Group:
    """Compiled rows that compile at once, each in a child, within one window; then timed one at a
    time, in order (``rows``), each within ``step_timeout_s``. A row not compiled in time is cut."""

    def __init__(self, configs: list[Config], specs: list[dict], window_s: float):
        env = child_env(len(configs))
        self.configs, self.window_s, self.drained = configs, window_s, False
        self.children = [
            Child({**s, "config": dataclasses.asdict(c)}, env, f"b{c.batch}")
            for c, s in zip(configs, specs, strict=True)
        ]
        self.deadline = time.perf_counter() + window_s
        self.first: list[dict | None] = [None] * len(configs)

    def ready(self) -> bool:
        """Whether every child has reported (compiled, failed or exited), without waiting."""
        for i, ch in enumerate(self.children):
            if self.first[i] is None and not ch.reports.empty():
                self.first[i] = ch.reports.get()
        return all(report is not None for report in self.first)

    def rows(self, step_timeout_s: float) -> Iterator[tuple[Row, dict | None]]:
        self.drained = True
        try:
            for i, ch in enumerate(self.children):
                report = self.first[i] or ch.wait(self.deadline)
                yield _timed(self.configs[i], ch, report, self.window_s, step_timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        for ch in self.children:
            ch.kill()


def _timed(config: Config, ch: Child, report: dict | None, window_s: float, step_timeout_s: float):
    if report is None:
        ch.kill()
        return Row(config, note=f"compile over {window_s:.0f} s"), None
    if report["kind"] == "compiled":
        ch.go()
        report = ch.wait(time.perf_counter() + step_timeout_s)
        if report is None:
            ch.kill()
            return Row(config, note=f"steps over {step_timeout_s:.0f} s"), None
    ch.kill()
    if report["kind"] == "result":
        fields = report["row"]
        return Row(**{**fields, "config": Config(**fields["config"])}), report["ema"]
    note = report.get("note") or f"child exited ({ch.proc.returncode}) before reporting"
    return Row(config, note=note), None


if __name__ == "__main__":
    sys.exit(child(json.loads(sys.argv[1])))
