"""``make test``'s second phase: every tier but unit, as two pytest processes at once, and a third
that only takes the CPU they leave idle.

One test at a time, that phase keeps the 2 cores 63% busy: Ray and the services start, workers
import torch, subprocesses wait on each other. A second process fills the gaps. The ``stack`` lane
takes the e2e tier (the local stack and its Ray head, which it starts once), the Tune search, the
elastic cluster and the registration resume; the ``services`` lane takes everything
else but the ``cpu`` lane's, so a new test file lands there. Each lane is its own
pytest session with its own fixtures (its own S3 endpoint and MLflow server, its own loopback
watch), so nothing is shared between them but the machine.

Two lanes keep the 2 cores about 90% busy, not all the time: both wait at once on a Ray start, a
worker group, a server. The ``cpu`` lane takes tests that are CPU alone, with no service and no
clock in them (inductor's kernel generation, the full presets), at ``nice 19``: the scheduler gives it
what the other two leave idle, and them the core back at once when they want it. Its durations are
those of a niced process, long by design.

Each lane's processes (pytest and what it starts) run torch on one thread (``OMP_NUM_THREADS=1``,
unless set): two lanes of two threads each on 2 cores spin against each other, and a test that
trains or evaluates in the pytest process then takes far longer (the promotion models' fixture beside
a torch process: 68 s on two threads, 23 s on one).

The ``services`` lane writes to the terminal as it goes; the others' output is kept and printed when
all are done. Then the 10 slowest tests of the two lanes that are not niced (setup, call and teardown
together, from each lane's JUnit XML), so that drift shows in every CI log.

    python -m tests.lanes [PYTEST OPTIONS...]

Options go to every lane (``--junitxml=P`` becomes ``P`` with the lane's name before the suffix;
with ``COVERAGE_FILE=F`` set, each lane's coverage goes to ``F.<lane>``, for ``coverage combine``).
The exit status is the first failing lane's; a lane that selects nothing (pytest's 5) is not a
failure, and nor are all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

STACK = (
    "tests/e2e",
    "tests/integration/test_tune.py",
    "tests/integration/test_registration_resume.py",
    "tests/integration/test_elastic.py",
)
"""The ``stack`` lane's paths; the ``services`` lane runs the rest of ``tests`` but ``CPU``'s."""

CPU = (
    "tests/integration/test_compile_inductor.py",
    "tests/unit/test_presets.py",
)
"""The ``cpu`` lane's paths (its tests not marked ``unit``: those run in the unit phase)."""

NICE = {"cpu": 19}
"""Each lane's niceness; a lane not named runs at the caller's."""

EMPTY = 5  # pytest: no test was selected


LANES = {
    "services": ["tests", *(f"--ignore={p}" for p in (*STACK, *CPU))],
    "stack": list(STACK),
    "cpu": list(CPU),
}
"""Each lane's paths, in the order they start; the first writes to the terminal as it goes."""


def lane_args(name: str, args: list[str], default_xml: Path) -> tuple[list[str], Path]:
    """``args`` for lane ``name``, its JUnit file renamed for the lane (or ``default_xml``); and that file."""
    out, xml = [], None
    for a in args:
        if a.startswith(("--junitxml=", "--junit-xml=")):
            p = Path(a.split("=", 1)[1])
            xml = p.with_name(f"{p.stem}-{name}{p.suffix}")
            a = f"--junitxml={xml}"
        out.append(a)
    if xml is None:
        xml = default_xml
        out.append(f"--junitxml={xml}")
    return out, xml


def slowest(xmls: list[Path], n: int = 10) -> list[tuple[float, str]]:
    """(seconds, nodeid-like name) of the ``n`` slowest test cases in these JUnit files."""
    cases = []
    for x in xmls:
        if not x.exists():
            continue
        for case in ET.parse(x).iter("testcase"):
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            cases.append((float(case.get("time") or 0), name))
    return sorted(cases, reverse=True)[:n]


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="flowpp-lanes-"))
    base = [sys.executable, "-m", "pytest", "-m", "not unit", "--durations=25"]
    procs: dict[str, tuple[subprocess.Popen, Path | None, Path]] = {}
    for i, (name, paths) in enumerate(LANES.items()):
        args, xml = lane_args(name, argv, work / f"{name}.xml")
        log = None if i == 0 else work / f"{name}.log"
        out = None if log is None else open(log, "wb")  # noqa: SIM115  (closed after the wait)
        # one torch thread a lane process, as in the unit phase: the two lanes' thread pools of two would
        # spin against each other on 2 cores (Ray Train workers and validation tasks set theirs from
        # their CPUs whatever this says)
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        if "COVERAGE_FILE" in env:
            env["COVERAGE_FILE"] = f"{env['COVERAGE_FILE']}.{name}"
        nice = ["nice", "-n", str(NICE[name])] if name in NICE else []
        proc = subprocess.Popen([*nice, *base, *paths, *args], cwd=root, stdout=out,
                                stderr=subprocess.STDOUT if out else None, env=env)  # fmt: skip
        procs[name] = (proc, log, xml)
        if out is not None:
            out.close()
    rc = 0
    for name, (proc, log, _) in procs.items():
        status = proc.wait()
        if log is not None:
            print(f"\n{'=' * 30} lane {name} {'=' * 30}", flush=True)
            sys.stdout.write(log.read_text(errors="replace"))
        print(f"lane {name}: exit {status}", flush=True)
        if status not in (0, EMPTY) and rc == 0:
            rc = status
    print(f"\n{'=' * 20} 10 slowest tests of the lanes not niced (setup + call + teardown) {'=' * 20}")
    for seconds, test in slowest([xml for name, (_, _, xml) in procs.items() if name not in NICE]):
        print(f"{seconds:8.2f}s {test}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
