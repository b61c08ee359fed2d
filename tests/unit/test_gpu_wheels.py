"""bench/gpu_wheels pins from requirements/constraints.txt (no .venv needed), and bench/gpu_setup
puts the carried folder first on sys.path, ahead of the interpreter's own copies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def wheels(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "bench/gpu_wheels", *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_versions_come_from_the_lock():
    lock = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line):
            lock[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    proc = wheels("--list", "--add", "anyio")
    assert proc.returncode == 0, proc.stderr
    pins = dict(re.findall(r"^(\S+)==(\S+)  # ", proc.stdout, re.M))
    assert {"ray", "pydantic", "mlflow-skinny", "webdataset", "protobuf", "typing-extensions", "anyio"} <= set(pins)
    assert all(lock[name] == version for name, version in pins.items())


def test_a_package_missing_from_the_lock_is_named(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("ray==2.60.0\n    # via foo\npydantic==2.14.4 ; python_version >= '3.9'\n")
    proc = wheels("--list", "--constraints", str(lock))
    assert proc.returncode == 1
    assert "no version of jsonschema, jsonschema-specifications" in proc.stderr and "pydantic," not in proc.stderr


def make_wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
        z.writestr(f"{info}/RECORD", "".join(f"{arc},,\n" for arc in files) + f"{info}/RECORD,,\n")
    return path


def test_setup_installs_the_wheels_and_its_pth_puts_them_before_the_interpreters_own(tmp_path):
    carried, older, pth_dir, site = tmp_path / "whl", tmp_path / "older", tmp_path / "pth", tmp_path / "site"
    for folder in (carried, older, pth_dir):
        folder.mkdir()
    make_wheel(carried, "shadowed", "2.0")
    (older / "shadowed.py").write_text("VERSION = '1.0'\n")  # the device's own, older copy
    env = {**os.environ, "PYTHON": sys.executable, "PTH_DIR": str(pth_dir)}
    proc = subprocess.run(["bench/gpu_setup", str(carried), str(site)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (pth_dir / "00-gpu-carried.pth").read_text() == f"import sys; sys.path.insert(0, '{site}')\n"
    # site.addsitedir runs the .pth as start-up does for site-packages; the older copy is on sys.path first
    probe = (f"import sys, site; sys.path.insert(0, {str(older)!r}); site.addsitedir({str(pth_dir)!r}); "
             "import shadowed; print(shadowed.VERSION, sys.path.index(" + repr(str(site)) + "))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["2.0", "0"]


def test_setup_without_wheels_says_what_to_do(tmp_path):
    proc = subprocess.run(["bench/gpu_setup", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "run bench/gpu_wheels" in proc.stderr
