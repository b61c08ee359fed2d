"""Manifests where they are used: old ones still stream, counts are verified, shard URLs stay
inside the manifest's folder, and a job whose data the model cannot take stops before training."""

import json

import pytest

from orchestrator.core import storage
from orchestrator.data.manifest import ManifestError
from orchestrator.data.prepare import PrepareOptions, prepare
from orchestrator.data.stream import ShardIntegrityError, ShardStream
from tests.datafixtures import make_vdo_tar
from tests.integration.test_cli_errors import run_cli
from tests.jobs import tiny_job, write_job

pytestmark = pytest.mark.integration


def _prepared(tmp_path, out=None, sopts=None, n=12):
    make_vdo_tar(tmp_path / "train_64x64.tar", n)
    out = out or str(tmp_path / "out")
    opts = PrepareOptions(source="vdo", input=str(tmp_path), output=out, shard_bytes=30_000, progress=False)
    return prepare(opts, sopts), storage.join(out, "manifest.json")


def _keys(url, **kw):
    return [k for b in ShardStream(url, batch_size=1, **kw) for k in b["keys"]]


def _as_version_1(manifest: dict) -> dict:
    """The same shards, described as the code before issue 14 described them."""
    doc = {k: v for k, v in manifest.items() if k not in ("channels", "bits", "_kept_shards")}
    doc["version"] = 1
    doc["source"] = {k: v for k, v in doc["source"].items() if k not in ("holdout", "holdout_taken")}
    first = 0
    doc["shards"] = []
    for s in manifest["shards"]:
        old = {k: s[k] for k in ("index", "url", "num_samples", "bytes", "sha256")}
        doc["shards"].append(old | {"first_item": first, "last_item": first + s["num_samples"] - 1})
        first += s["num_samples"]
    return doc


def test_a_version_1_manifest_streams_and_a_re_run_writes_beside_it(tmp_path):
    manifest, url = _prepared(tmp_path)
    v1 = _as_version_1(manifest)
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(v1))
    (tmp_path / "out" / "_progress.json").write_text(json.dumps({"fingerprint": "f", "shards": v1["shards"]}))
    assert sorted(_keys(url, verify=True)) == sorted(f"train_64x64_{i:08d}" for i in range(12))
    old = {s["url"]: (tmp_path / "out" / s["url"]).read_bytes() for s in manifest["shards"]}
    again = prepare(PrepareOptions(source="vdo", input=str(tmp_path), output=str(tmp_path / "out"),
                                   shard_bytes=30_000, progress=False))  # fmt: skip
    assert again["version"] == 2 and again["_kept_shards"] == 0  # a v1 shard records no inputs: rebuilt
    assert not {s["url"] for s in again["shards"]} & set(old)
    assert all((tmp_path / "out" / name).read_bytes() == data for name, data in old.items())


def test_a_shard_count_other_than_the_manifest_s_is_an_error_when_verifying(tmp_path):
    manifest, url = _prepared(tmp_path)
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    doc["shards"][0]["num_samples"] += 1
    doc["num_samples"] += 1
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(doc))
    n = manifest["shards"][0]["num_samples"]
    with pytest.raises(
        ShardIntegrityError, match=rf"holds {n} samples, but its manifest's shards\.0\.num_samples is {n + 1}"
    ):
        _keys(url, verify=True)
    assert len(_keys(url)) == 13  # without verify: read as a truncated shard, the step count kept


def test_a_manifest_pointing_outside_its_folder_is_refused_before_any_shard_is_read(tmp_path, s3):
    _, url = _prepared(tmp_path, s3.url("ds", "train"), s3.options)
    doc = json.loads(storage.read_bytes(url, s3.options))
    doc["shards"][0]["url"] = "s3://another-bucket/secret.tar"
    doc["shards"][1]["url"] = "../../elsewhere/x.tar"
    storage.write_bytes(url, json.dumps(doc).encode(), s3.options)
    with pytest.raises(ManifestError) as info:
        ShardStream(url, batch_size=1, options=s3.options)
    text = str(info.value)
    assert text.startswith(f"{url}: 2 problem(s)") and "shards.0.url" in text and "shards.1.url" in text
    # the manifest cannot waive its own check, and the job that allows other places allows S3 and files only
    doc["allow_external"] = True
    doc["shards"][1]["url"] = "http://127.0.0.1:9/internal-admin/delete?all=1"
    storage.write_bytes(url, json.dumps(doc).encode(), s3.options)
    with pytest.raises(ManifestError, match="a manifest cannot"):
        ShardStream(url, batch_size=1, options=s3.options)
    with pytest.raises(
        ManifestError, match=r"shards.1.url: 'http://127.0.0.1:9/internal-admin.*only s3:// and file://"
    ):
        ShardStream(url, batch_size=1, options=s3.options, allow_external=True)


def test_train_refuses_data_of_another_image_size_before_training_starts(tmp_path, capsys):
    for split in ("train", "valid"):
        prepare(PrepareOptions(source="demo", input="", output=str(tmp_path / "data" / split), split=split,
                               count=32, image_size=32, progress=False))  # fmt: skip
    tree = tiny_job(tmp_path, data__prepare=None)  # the debug preset: 16x16 images
    code, err = run_cli(["train", str(write_job(tree, tmp_path / "job.yaml"))], capsys)
    url = f"file://{tmp_path}/data/train/manifest.json"
    assert code == 2  # a user mistake, reported by the preflight (ensure_data), before Ray is started
    assert f"data.train {url} (model.preset debug): image_size: the manifest's is 32, the model's is 16" in err
