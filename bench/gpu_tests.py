"""Call 2 ("tests") of the device check: every gpu test file in its own pytest process.

Run from the repository root after ``bench/gpu_setup``: ``python3 -m bench.gpu_tests``. One file
per process, each with its own timeout (a fair share of what is left of ``--budget-s``: time a
file leaves unused goes to the next), its process group killed at the timeout, so one file's
import error (a version error is not always an ImportError, and aborts a shared session), hang
or crash loses no other file's results. Per test, the ``-v`` lines as they come (a killed file
keeps the results it printed). One markdown table, ``$OUT/gpu_tests.md``, rewritten after every
file; all output in ``$OUT/gpu_tests.log``. Exit 0 when every file passed or skipped.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTCOME = re.compile(r"^(\S+::\S+?)(?: \S+)* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
SUMMARY = re.compile(r"^=+ (.*\d+ (?:passed|failed|errors?|skipped|deselected).*) =+$|^=+ (no tests ran.*) =+$")
COLLECT_ERROR = re.compile(r"^(?:ERROR|E) +(.*(?:Error|Exception|error).*)$")
CALL_S = 240.0  # call 2's timeout_s (README.md, docs/performance.md)
BUDGET_S = 210.0  # every file's pytest: CALL_S less bench/gpu_setup (~15 s) and the last table


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """tests/gpu/test_*.py, then any other test file that applies the gpu mark (``applies_gpu_mark``):
    collecting only these keeps the modules of other tests (moto, S3 servers) from being imported there."""
    files = sorted(root.glob("tests/gpu/test_*.py"))
    files += [f for f in sorted(root.glob("tests/**/test_*.py")) if f not in files and applies_gpu_mark(f.read_text())]
    return [str(f.relative_to(root)) for f in files]


MARK_LINE = re.compile(r"^(?:pytestmark\s*=.*\bpytest\.mark\.gpu\b|\s*@pytest\.mark\.gpu\b)", re.M)


def applies_gpu_mark(source: str) -> bool:
    """Whether a test module marks tests gpu: a module-level ``pytestmark`` that holds ``pytest.mark.gpu``
    (alone or in a list), or ``@pytest.mark.gpu`` on a test function, class or method. Read from the
    syntax tree, so a string or a comment that names the mark (a test of this module's own) does not
    count; a module that does not parse is read line by line (its pytest run then shows the error)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return bool(MARK_LINE.search(source))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        named = any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets)
        if named and any(_is_gpu_mark(n) for n in ast.walk(value)):
            return True
    decorated = (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
    return any(_is_gpu_mark(d.func if isinstance(d, ast.Call) else d) for n in decorated for d in n.decorator_list)


def _is_gpu_mark(node: ast.AST) -> bool:
    """``pytest.mark.gpu`` (or ``mark.gpu`` after ``from pytest import mark``)."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "gpu"
        and (
            (isinstance(node.value, ast.Attribute) and node.value.attr == "mark")
            or (isinstance(node.value, ast.Name) and node.value.id == "mark")
        )
    )


@dataclass
class Result:
    file: str
    verdict: str = "not run"
    seconds: float = 0.0
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> PASSED, FAILED, ...
    summary: str = ""  # pytest's last line
    error: str = ""  # the first error line (a collection error's exception)

    @property
    def detail(self) -> str:
        return "; ".join(part for part in (self.summary, self.error) if part)

    def count(self, *kinds: str) -> int:
        return sum(v in kinds for v in self.outcomes.values())

    @property
    def ok(self) -> bool:
        return self.verdict in ("PASS", "NONE SELECTED")


def run_file(path: str, timeout: float, log) -> Result:
    """pytest -m gpu on one file in its own session; killed with its children at ``timeout``."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "--tb=short", path]
    log.write(f"\n$ python -m pytest {' '.join(cmd[3:])}  (timeout {timeout:.0f} s)\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started, result = time.perf_counter(), Result(path)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    fired: list[bool] = []
    timer = threading.Timer(timeout, _kill_group, args=(proc, fired))
    timer.start()
    for line in proc.stdout:
        log.write(line)
        _read(line.rstrip("\n"), result)
    rc = proc.wait()
    timer.cancel()
    result.seconds = time.perf_counter() - started
    verdict = {0: "PASS", 5: "NONE SELECTED"}.get(rc, f"FAIL ({rc})")
    result.verdict = f"TIMEOUT ({timeout:.0f} s)" if fired else verdict
    log.flush()
    return result


def _kill_group(proc: subprocess.Popen, fired: list[bool]) -> None:
    fired.append(True)
    with contextlib.suppress(ProcessLookupError):  # its own session: pytest and what it started (Ray, workers)
        os.killpg(proc.pid, signal.SIGKILL)


def _read(line: str, result: Result) -> None:
    if m := OUTCOME.match(line):
        result.outcomes[m.group(1)] = m.group(2)
    elif m := SUMMARY.match(line):
        result.summary = (m.group(1) or m.group(2)).strip()
    elif (m := COLLECT_ERROR.match(line)) and not result.error:
        result.error = m.group(1).strip()[:160]


def row(r: Result) -> str:
    cells = [r.file, r.verdict, r.count("PASSED", "XPASS"), r.count("FAILED"), r.count("ERROR"),
             r.count("SKIPPED", "XFAIL"), f"{r.seconds:.0f}", r.detail.replace("|", "/")]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(results: list[Result], budget_s: float, started: float) -> list[str]:
    lines = [
        "| file | result | passed | failed | errors | skipped | s | detail |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [row(r) for r in results]
    failed = [f"{r.file}: {t} {v}" for r in results for t, v in r.outcomes.items() if v in ("FAILED", "ERROR")]
    wall = f"wall time: {time.perf_counter() - started:.0f} s (budget {budget_s:.0f} s)"
    return ["# bench/gpu_tests", "", *lines, "", *(f"- {f}" for f in failed), wall]


def main(argv=None) -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_tests", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="test files (default: every gpu test file)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall time for all files")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    p.add_argument("--out", type=Path, default=out, help="folder for gpu_tests.md and gpu_tests.log ($OUT)")
    args = p.parse_args(argv)
    files = args.files or gpu_test_files()
    results = [Result(f) for f in files]
    folder = args.out or Path(tempfile.gettempdir()) / "gpu_tests"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "gpu_tests.log", "w") as log:
        for i, path in enumerate(files):
            share = (started + args.budget_s - time.perf_counter()) / (len(files) - i)
            results[i] = run_file(path, max(share, 1.0), log) if share > 1.0 else Result(path, "skipped: budget")
            lines = table(results, args.budget_s, started)
            (folder / "gpu_tests.md").write_text("\n".join(lines) + "\n")
            print(row(results[i]), flush=True)
    print("\n".join(lines))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
