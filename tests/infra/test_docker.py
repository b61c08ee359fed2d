"""infra/docker/ and infra/mlflow/Dockerfile: hadolint, every COPY source present, and the images
that the manifests run."""

from __future__ import annotations

import re
import subprocess

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
