"""infra/iam/: each role's policy reaches only the S3 prefixes its job spec or server names."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.infra.checks import INFRA, JOB, by_kind, object_access, policy_problems, s3_prefix

pytestmark = [pytest.mark.unit, pytest.mark.infra]


def test_training_policy_reads_data_and_reads_writes_runs():
    job = yaml.safe_load(JOB.read_text())
    data = s3_prefix(job["data"]["train"], levels_up=2)  # .../imagenet64-vdo/train/manifest.json
    assert data == s3_prefix(job["data"]["valid"], levels_up=2)
    runs = s3_prefix(job["storage"]["path"])
    policy = json.loads((INFRA / "iam" / "training-role-policy.json").read_text())
    allowed = dict(p.split("/", 1) for p in (data, runs))
    assert policy_problems(policy, allowed) == []
    access = object_access(policy)
    assert access[data] == {"s3:GetObject"}  # read-only: training never writes its data
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= access[runs]
    assert set(access) == {data, runs}


def test_mlflow_policy_reads_writes_its_artifact_prefix():
    args = by_kind(INFRA / "mlflow" / "mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    destination = next(a for a in args if a.startswith("--artifacts-destination=")).split("=", 1)[1]
    artifacts = s3_prefix(destination)
    policy = json.loads((INFRA / "iam" / "mlflow-role-policy.json").read_text())
    assert policy_problems(policy, dict([artifacts.split("/", 1)])) == []
    access = object_access(policy)
    assert set(access) == {artifacts}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= access[artifacts]


BAD_STATEMENTS = {
    "wildcard action": {"Action": "s3:*", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64/*"},
    "star action": {"Action": "*", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64/*"},
    "star resource": {"Action": "s3:GetObject", "Resource": "*"},
    "whole bucket objects": {"Action": "s3:GetObject", "Resource": "arn:aws:s3:::flowpp-runs/*"},
    "sibling prefix": {"Action": "s3:GetObject", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64-old/*"},
    "inner wildcard": {"Action": "s3:GetObject", "Resource": "arn:aws:s3:::flowpp-runs/*/imagenet64/*"},
    "other bucket": {"Action": "s3:GetObject", "Resource": "arn:aws:s3:::flowpp-secrets/imagenet64/*"},
    "unlimited listing": {"Action": "s3:ListBucket", "Resource": "arn:aws:s3:::flowpp-runs"},
    "listing elsewhere": {
        "Action": "s3:ListBucket",
        "Resource": "arn:aws:s3:::flowpp-runs",
        "Condition": {"StringLike": {"s3:prefix": ["*"]}},
    },
    "not action": {"NotAction": "s3:DeleteObject", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64/*"},
    "iam action": {"Action": "iam:PassRole", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64/*"},
}


@pytest.mark.parametrize("name", BAD_STATEMENTS)
def test_policy_check_rejects(name):
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", **BAD_STATEMENTS[name]}]}
    assert policy_problems(policy, {"flowpp-runs": "imagenet64/"})
