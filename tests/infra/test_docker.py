"""infra/docker/ and infra/mlflow/Dockerfile: hadolint, every COPY source present, and the images
that the manifests run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.infra.checks import INFRA, ROOT, all_manifests, containers, copy_sources, hadolint, missing_copy_sources

pytestmark = [pytest.mark.unit, pytest.mark.infra]

DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "mlflow" / "Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_hadolint_passes(path):
    result = subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_an_unpinned_install():
    bad = "FROM python:3.11\nRUN pip install ray\n"
    result = subprocess.run([hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3013" in result.stdout


def test_dockerfile_copies_only_existing_paths():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    sources = copy_sources(dockerfile)
    assert {"pyproject.toml", "flowpp/", "orchestrator/", "jobs/"} <= set(sources)
    assert missing_copy_sources(dockerfile, ROOT) == []
    broken = dockerfile + "COPY --chown=1000 configs/ \\\n    setup.py /app/\n"
    assert missing_copy_sources(broken, ROOT) == ["configs/", "setup.py"]


def test_training_image_has_the_tested_torch():
    pin = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    base = re.search(r"^FROM (\S+)$", (INFRA / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(f"pytorch/pytorch:{pin}-cuda") and base.endswith("-runtime")


def test_every_pod_runs_the_images_built_here():
    ecr = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    images = {c["image"] for d in all_manifests() for c in containers(d)}
    assert images == {f"{ecr}/flowpp-train:0.1.0", f"{ecr}/flowpp-mlflow:3.17.2", "postgres:16.4"}
    aws = yaml.safe_load((INFRA / "aws" / "ray-cluster.yaml").read_text())
    assert aws["docker"]["image"] == f"{ecr}/flowpp-train:0.1.0"


# -- requirements/constraints.txt (`make lock`): the training image and CI install through it ------
LOCK = ROOT / "requirements" / "constraints.txt"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!-]+)\s*(;.*)?$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str) -> tuple[dict[str, str], list[str]]:
    """({name: version} of the pinned lines, the lines that are not one exact pin)."""
    pins, loose = {}, []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        if m:
            pins[_norm(m["name"])] = m["version"]
        else:
            loose.append(line)
    return pins, loose


def lock_problems(text: str) -> list[str]:
    """What makes a constraints file unfit to pin the image and CI."""
    from packaging.requirements import Requirement

    from tests.unit.test_dependencies import project

    pins, loose = lock_pins(text)
    ray = re.search(r"^ARG RAY_VERSION=(\S+)$", (INFRA / "docker" / "Dockerfile").read_text(), re.M).group(1)
    problems = [f"not an exact pin: {line}" for line in loose]
    problems += [f"{name}=={pins.get(name)}, wanted {want}"
                 for name, want in (("torch", "2.13.0"), ("ray", ray)) if pins.get(name) != want]  # fmt: skip
    problems += [
        f"CUDA wheel pinned: {name}" for name in pins if name == "triton" or re.match(r"nvidia-(?!ml-py)", name)
    ]
    for spec in project()["dependencies"]:  # the core: every package pinned, inside pyproject's range
        req = Requirement(spec)
        version = pins.get(_norm(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}: pinned {version}, pyproject asks {req.specifier} (run `make lock`)")
    return problems


def test_constraints_pin_every_package():
    text = LOCK.read_text()
    assert lock_problems(text) == []
    pins, _ = lock_pins(text)
    assert {"mlflow-skinny", "psutil", "nvidia-ml-py", "pytest", "moto"} <= set(pins)
    stale = text.replace("\nray==", "\nray>=").replace("\nnumpy==", "\n# numpy==")
    assert sorted(p.split()[0] for p in lock_problems(stale)) == ["not", "numpy:", "ray:", "ray==None,"]


def test_the_image_and_ci_install_through_the_constraints():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert "requirements/constraints.txt" in copy_sources(dockerfile)
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all("-c requirements/constraints.txt" in line for line in installs)
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements/constraints.txt" in makefile
    setup = makefile.split("$(BIN)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "lock='-c $(LOCK)'" in setup
    assert "pip install -q $$lock torch==2.13.0 && $(BIN)/pip install -q $$lock -e '.[test]'" in setup
    assert "make setup" in (ROOT / ".ci" / "run").read_text()
    # one Python: the lock's, the image's (its build asserts it) and the Makefile's choice
    python = re.search(r"^LOCK_PYTHON := (3\.\d+)$", makefile, re.M).group(1)
    assert f"autogenerated by pip-compile with Python {python}\n" in LOCK.read_text()
    assert f"sys.version_info[:2] == ({python.replace('.', ', ')})" in dockerfile


# -- a C compiler for Triton (model.compile: true on the cluster) -----------------------------
CHECK_COMPILER = INFRA / "docker" / "check-compiler"


def test_training_image_installs_a_compiler_and_checks_it_at_build_time():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    run = re.search(r"^RUN apt-get update(?:.*\\\n)*.*$", dockerfile, re.M).group(0)  # with its continued lines
    assert {"gcc", "libc6-dev"} <= set(re.split(r"[\s\\]+", run))
    assert run.endswith("&& check-compiler")  # after the install, in the same layer
    assert "COPY infra/docker/check-compiler /usr/local/bin/check-compiler" in dockerfile
    assert dockerfile.index("COPY infra/docker/check-compiler") < dockerfile.index("&& check-compiler")


def test_check_compiler_builds_and_imports_a_python_extension():
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable}
    ok = subprocess.run([str(CHECK_COMPILER)], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "can build Triton kernels" in ok.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [({"CC": "/bin/false"}, "/bin/false cannot build a Python extension"),
     ({"PATH": "/nonexistent"}, "no C compiler (CC, gcc or clang)")],
)  # fmt: skip
def test_check_compiler_fails_without_a_working_compiler(env, message):
    base = {"PATH": os.environ["PATH"], "PYTHON": sys.executable}
    sh = shutil.which("sh")
    bad = subprocess.run([sh, str(CHECK_COMPILER)], env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and message in bad.stderr, bad.stderr
