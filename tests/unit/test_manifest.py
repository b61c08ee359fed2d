"""The manifest model: every problem named with the manifest's URL and the field's path."""

import copy
import json

import pytest

from orchestrator.core.errors import UserError
from orchestrator.data.manifest import ManifestError, check_fits_model, parse_manifest

pytestmark = pytest.mark.unit

URL = "s3://bucket/data/train/manifest.json"
SHA = "ab" * 32


def _shard(i, n=10, size=20_000, **kw):
    return {"index": i, "url": f"train-{i:06d}.tar", "num_samples": n, "bytes": size, "sha256": SHA, **kw}


V2 = {
    "version": 2,
    "fingerprint": "0123456789abcdef",
    "split": "train",
    "source": {"kind": "folder", "inputs": ["imgs"], "dataset": "image folder", "holdout": 0.05},
    "format": "png",
    "image_size": 64,
    "channels": 3,
    "bits": 8,
    "num_samples": 20,
    "num_shards": 2,
    "total_bytes": 40_000,
    "skipped": {"count": 0, "examples": []},
    "shards": [_shard(0, num_inputs=10, content=SHA, head=SHA), _shard(1, num_inputs=10, content=SHA, head=SHA)],
}

# exactly what the code before issue 14 wrote (orchestrator/data/prepare.py, manifest version 1)
V1 = {
    "version": 1,
    "fingerprint": "5f1d0c2a9e8b7f60",
    "split": "train",
    "source": {"kind": "vdo", "inputs": ["train_64x64.tar"], "dataset": "imagenet64-vdo (van den Oord et al. 2016)"},
    "format": "png",
    "image_size": 64,
    "num_samples": 20,
    "num_shards": 2,
    "total_bytes": 40_000,
    "skipped": {"count": 0, "examples": []},
    "shards": [_shard(0, first_item=0, last_item=9), _shard(1, first_item=10, last_item=19)],
}


def _parse(doc, url=URL):
    return parse_manifest(json.dumps(doc).encode(), url)


def _problems(doc, url=URL) -> str:
    with pytest.raises(ManifestError) as info:
        _parse(doc, url)
    assert isinstance(info.value, UserError)  # the one error base: exit code 2 in the CLI
    assert str(info.value).startswith(f"{url}: ")
    return str(info.value)


def _with(**changes):
    doc = copy.deepcopy(V2)
    for dotted, value in changes.items():
        node = doc
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return doc


def test_current_and_version_1_manifests_load():
    assert _parse(V2).shards[1].num_inputs == 10
    old = _parse(V1)
    assert old.version == 1 and old.channels == 3 and old.bits == 8 and old.shards[1].first_item == 10


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"shards__0__num_samples": -1}, "shards.0.num_samples: Input should be greater than or equal to 0"),
        ({"shards__1__bytes": -5}, "shards.1.bytes: Input should be greater than or equal to 0"),
        ({"num_samples": -20}, "num_samples: Input should be greater than or equal to 0"),
        ({"num_samples": 21}, "num_samples: 21, but the shards add up to 20"),
        ({"num_shards": 3}, "num_shards: 3, but the shards add up to 2"),
        ({"total_bytes": 1}, "total_bytes: 1, but the shards add up to 40000"),
        ({"shards__1__index": 0}, "shards.1.index: 0, expected its position 1"),
        ({"shards__0__sha256": "xyz"}, "shards.0.sha256: String should match pattern"),
        ({"format": "jpeg"}, "format: Input should be 'png' or 'raw'"),
        ({"image_size": 0}, "image_size: Input should be greater than or equal to 1"),
        ({"bits": 9}, "bits: Input should be less than or equal to 8"),
        ({"shards__0__colour": "blue"}, "shards.0.colour: Extra inputs are not permitted"),
        ({"extra": 1}, "extra: Extra inputs are not permitted"),
    ],
)
def test_a_bad_field_is_named_with_the_manifest_url(changes, message):
    assert message in _problems(_with(**changes))


def test_every_problem_is_reported_at_once():
    text = _problems(_with(shards__0__num_samples=-1, format="gif", image_size=-3))
    assert "3 problem(s)" in text and "shards.0.num_samples" in text and "format" in text and "image_size" in text


def test_a_missing_field_and_an_unknown_version_ask_for_a_re_run_of_prepare():
    doc = copy.deepcopy(V1)
    del doc["shards"]
    assert "shards: Field required" in _problems(doc)
    text = _problems(_with(version=3))
    assert "version: Input should be 1 or 2" in text and "re-run `flowpp prepare`" in text


def test_not_json_or_not_an_object_is_named():
    with pytest.raises(ManifestError, match=rf"^{URL}: not a valid manifest: not JSON"):
        parse_manifest(b"{trunc", URL)
    with pytest.raises(ManifestError, match="a JSON list, not an object"):
        parse_manifest(b"[]", URL)


@pytest.mark.parametrize(
    "shard_url",
    [
        "../valid/valid-000000.tar",
        "sub/../../x.tar",
        "s3://other-bucket/data/train/train-000000.tar",
        "s3://bucket/data/trainX/train-000000.tar",
        "file:///etc/passwd",
        "/data/train/x.tar",
        "gs://bucket/data/train/x.tar",
        "a//b.tar",
        "..\\x.tar",
    ],
)
def test_shard_urls_outside_the_manifest_folder_are_refused_unless_allowed(shard_url):
    doc = _with(shards__1__url=shard_url)
    assert f"shards.1.url: {shard_url!r} lies outside the manifest's folder s3://bucket/data/train/" in _problems(doc)
    doc["allow_external"] = True  # a manifest cannot waive its own check
    assert "data.allow_external_shards lets shards lie elsewhere; a manifest cannot" in _problems(doc)
    if shard_url.startswith(("s3://", "file://", "/")) and ".." not in shard_url:  # the reader allows these
        assert parse_manifest(json.dumps(doc).encode(), URL, allow_external=True).shards[1].url == shard_url


def test_a_shard_claiming_more_samples_than_its_bytes_can_hold_is_refused():
    """10 KiB claiming 1e8 samples: the plan would have sized itself by the claim (memory)."""
    doc = _with(shards__0__num_samples=10**8, shards__0__bytes=10_240, num_samples=10**8 + 10, total_bytes=30_240)
    assert "shards.0.num_samples: 100000000 samples cannot fit in 10240 bytes" in _problems(doc)


@pytest.mark.parametrize("shard_url", ["http://127.0.0.1:9/internal-admin/delete?all=1", "gs://b/x.tar", "s3://b/../x"])
def test_a_reader_that_allows_external_shards_still_refuses_other_schemes(shard_url):
    with pytest.raises(ManifestError, match="only s3:// and file:// shards may lie elsewhere"):
        parse_manifest(json.dumps(_with(shards__1__url=shard_url)).encode(), URL, allow_external=True)


def test_a_shard_url_that_does_not_print_is_refused():
    """A newline in a shard's name would reach log lines (prepare never writes one)."""
    assert "shards.1.url: 'train-000001\\nINFO x.tar' holds a character that does not print" in _problems(
        _with(shards__1__url="train-000001\nINFO x.tar")
    )


def test_shard_urls_inside_the_folder_load():
    for inside in ("sub/train-000001.tar", "s3://bucket/data/train/train-000001.tar"):
        assert _parse(_with(shards__1__url=inside)).shards[1].url == inside
    local = "/srv/data/train/manifest.json"
    assert _parse(_with(shards__1__url="/srv/data/train/t.tar"), local).shards[1].url == "/srv/data/train/t.tar"


def test_a_manifest_the_model_cannot_take_is_refused_naming_field_and_both_values():
    m = V2 | {"bits": 5}
    with pytest.raises(ManifestError) as info:
        check_fits_model(m, URL, image_size=32, channels=3, num_bits=8)
    text = str(info.value)
    assert text.startswith(URL) and "image_size: the manifest's is 64, the model's is 32" in text
    assert "bits: the manifest's shards hold 5-bit pixels, the model needs 8-bit ones" in text
    check_fits_model(V2, URL, image_size=64, channels=3, num_bits=5)  # a 5-bit model reduces 8-bit pixels
    with pytest.raises(ManifestError, match="channels: the manifest's is 3, the model's is 1"):
        check_fits_model(V1, URL, image_size=64, channels=1, num_bits=8)
