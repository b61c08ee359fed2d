"""flowpp prepare never serves stale or half-written data: fingerprints that cover the inputs,
re-runs that write beside the old shards, unique keys, disjoint splits. Real files, real tars."""

import hashlib
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main as cli_main
from orchestrator.core.errors import UserError
from orchestrator.data.prepare import PrepareOptions, prepare
from orchestrator.data.sources import CorruptInputError, iter_items, split_inputs
from orchestrator.data.stream import ShardStream
from tests.datafixtures import random_image

pytestmark = pytest.mark.integration


def _opts(src, out, **kw):
    args = {"source": "folder", "input": str(src), "output": str(out), "progress": False, "shard_bytes": 30_000}
    return PrepareOptions(**{**args, **kw})


def _put(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _folder(root, n, seed=0):
    """``root/train/img-00..png``: n images of random pixels; returns {key: pixels (3, 64, 64)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        arr = random_image(rng)
        _put(root / "train" / f"img-{i:02d}.png", arr)
        out[f"img-{i:02d}"] = arr.transpose(2, 0, 1)
    return out


def _read(url, **kw):
    """{key: pixels} of every sample a manifest names, read through the stream."""
    got = {}
    for b in ShardStream(str(url), batch_size=1, **kw):
        got[b["keys"][0]] = b["images"][0].numpy()
    return got


def _same(got, want):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _urls(manifest):
    return {s["url"] for s in manifest["shards"]}


# -- the fingerprint covers the inputs --------------------------------------------------------
def test_an_added_image_is_in_the_output_and_the_other_shards_are_kept(tmp_path):
    want = _folder(tmp_path / "src", 24)
    first = prepare(_opts(tmp_path / "src", tmp_path / "out"))
    assert first["num_shards"] >= 6
    arr = random_image(np.random.default_rng(99))
    _put(tmp_path / "src" / "train" / "new.png", arr)
    want["new"] = arr.transpose(2, 0, 1)
    second = prepare(_opts(tmp_path / "src", tmp_path / "out"))
    _same(_read(tmp_path / "out" / "manifest.json", verify=True), want)
    assert second["_kept_shards"] >= first["num_shards"] - 1
    assert len(_urls(first) & _urls(second)) == second["_kept_shards"]


def test_a_removed_image_is_gone_and_the_other_shards_are_kept(tmp_path):
    want = _folder(tmp_path / "src", 24)
    first = prepare(_opts(tmp_path / "src", tmp_path / "out"))
    shard = next(s for s in first["shards"] if s["num_samples"] >= 2)
    with tarfile.open(tmp_path / "out" / shard["url"]) as tar:
        gone = tar.getnames()[1].split(".")[0]  # the shard's second image: a stale shard would keep it
    (tmp_path / "src" / "train" / f"{gone}.png").unlink()
    del want[gone]
    second = prepare(_opts(tmp_path / "src", tmp_path / "out"))
    _same(_read(tmp_path / "out" / "manifest.json"), want)
    assert first["num_shards"] - 1 <= second["_kept_shards"] < first["num_shards"]


def test_a_changed_image_with_the_same_name_size_and_mtime_rebuilds_its_shard_only(tmp_path):
    want = _folder(tmp_path / "src", 24)
    first = prepare(_opts(tmp_path / "src", tmp_path / "out"))
    path = tmp_path / "src" / "train" / "img-11.png"
    stat = path.stat()
    arr = want["img-11"].transpose(1, 2, 0).copy()
    arr[0, 0] = 255 - arr[0, 0]
    _put(path, arr)  # one pixel changed: a PNG of the same size, and the old mtime below
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    want["img-11"] = arr.transpose(2, 0, 1)
    second = prepare(_opts(tmp_path / "src", tmp_path / "out"))
    assert second["_kept_shards"] == first["num_shards"] - 1
    _same(_read(tmp_path / "out" / "manifest.json"), want)


# -- a failed re-run leaves the published data as it was ---------------------------------------
def _late_name(src, split, at_least):
    """A file name that the source reads at position >= at_least (the order is a hash of names)."""
    for i in range(100):
        name = f"bad-{i}.png"
        (src / split / name).write_bytes(b"\x89PNG not really")
        names = [item.name for item in iter_items("folder", [src / split])]
        if names.index(name) >= at_least:
            return name
        (src / split / name).unlink()
    raise AssertionError("no late name")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_that_fails_midway_leaves_the_previous_manifest_and_its_shards_intact(tmp_path, where, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        out, sopts = s3.url("ds", "train"), s3.options
    else:
        out, sopts = str(tmp_path / "out"), None
    src = tmp_path / "src"
    want = _folder(src, 20)
    prepare(_opts(src, out), sopts)
    manifest_url = f"{out}/manifest.json"
    from orchestrator.core import storage

    before = storage.read_bytes(manifest_url, sopts)
    new = _folder(src, 20, seed=1)  # every image changes...
    _late_name(src, "train", at_least=12)  # ...and one that cannot be decoded comes late
    with pytest.raises(CorruptInputError, match="bad-"):
        prepare(_opts(src, out), sopts)
    assert storage.read_bytes(manifest_url, sopts) == before
    _same(_read(manifest_url, verify=True, options=sopts), want)  # every shard it names is intact
    progress = storage.read_bytes(f"{out}/_progress.json", sopts)
    assert b'"shards": [{' in progress  # new shards were written beside the old ones
    for f in (src / "train").glob("bad-*"):
        f.unlink()
    again = prepare(_opts(src, out), sopts)
    assert again["_kept_shards"] >= 1  # the shards the failed run finished are reused
    _same(_read(manifest_url, verify=True, options=sopts), new)


def test_the_manifest_is_replaced_in_one_step(tmp_path):
    src = tmp_path / "src"
    _folder(src, 6)
    prepare(_opts(src, tmp_path / "out"))
    inode = (tmp_path / "out" / "manifest.json").stat().st_ino
    _put(src / "train" / "more.png", random_image(np.random.default_rng(5)))
    prepare(_opts(src, tmp_path / "out"))
    # a new file renamed over the old one (os.replace), never the old file truncated and rewritten
    assert (tmp_path / "out" / "manifest.json").stat().st_ino != inode
    assert not list((tmp_path / "out").glob("*.tmp-*"))


# -- every input keeps its own key ---------------------------------------------------------------
def test_names_that_sanitise_alike_all_appear_with_their_own_pixels(tmp_path):
    names = ["a b.png", "a_b.png", "c.png", "c.jpg", "é.png", "è.png", "e.png", "sub/x.png", "sub_x.png"]
    rng = np.random.default_rng(3)
    pixels = {}
    for name in names:
        arr = np.full((64, 64, 3), rng.integers(0, 256, 3), np.uint8)  # flat: survives JPEG exactly enough
        _put(tmp_path / "src" / "train" / name, arr)
        pixels[name] = arr
    prepare(_opts(tmp_path / "src", tmp_path / "out"))
    got = _read(tmp_path / "out" / "manifest.json")
    assert len(got) == len(names)
    for name, arr in pixels.items():
        matches = [k for k, v in got.items() if np.abs(v.astype(int) - arr.transpose(2, 0, 1)).max() <= 2]
        assert matches, name
    assert "e" in got and "a_b" not in got  # an unambiguous name keeps its plain key


def test_a_duplicate_key_in_a_shard_names_both_inputs(tmp_path):
    tag = hashlib.sha256(b"a b.png").hexdigest()[:8]
    for name in ["a b.png", "a_b.png", f"a_b-{tag}.png"]:  # the last one's own key is the first one's
        _put(tmp_path / "src" / "train" / name, random_image(np.random.default_rng(len(name))))
    with pytest.raises(UserError, match=rf"key 'a_b-{tag}'.*a_b-{tag}\.png|key 'a_b-{tag}'.*a b\.png"):
        prepare(_opts(tmp_path / "src", tmp_path / "out", shard_bytes=10**6))


def test_a_tar_with_a_member_twice_is_refused_naming_both_entries(tmp_path):
    import io
    import tarfile

    from tests.datafixtures import png_bytes

    with tarfile.open(tmp_path / "train_64x64.tar", "w") as tar:
        for seed in (1, 2):
            data = png_bytes(random_image(np.random.default_rng(seed)))
            info = tarfile.TarInfo("train_64x64/same.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CorruptInputError, match=r"train_64x64/same\.png appears twice \(entries 0 and 1\)"):
        prepare(_opts(tmp_path, tmp_path / "out", source="vdo"))


# -- train and valid never share an image ------------------------------------------------------
def test_a_folder_without_splits_is_split_by_name_hash_into_disjoint_sets(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(80):
        _put(tmp_path / "imgs" / f"p{i:03d}.png", random_image(rng))
    assert cli_main(["prepare", "folder", "--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "o")]) == 0
    # another seed for valid does not move an image across (the split ignores the seed)
    prepare(_opts(tmp_path / "imgs", tmp_path / "v2", split="valid", seed=7))
    train = set(_read(tmp_path / "o" / "train" / "manifest.json"))
    valid = set(_read(tmp_path / "o" / "valid" / "manifest.json"))
    assert valid and train and not train & valid and len(train | valid) == 80
    assert set(_read(tmp_path / "v2" / "manifest.json")) == valid


def test_vdo_folder_without_split_files_is_split_disjointly(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(60):
        _put(tmp_path / "pngs" / f"{i:05d}.png", random_image(rng))
    keys = {}
    for split in ("train", "valid"):
        prepare(_opts(tmp_path / "pngs", tmp_path / split, source="vdo", split=split))
        keys[split] = set(_read(tmp_path / split / "manifest.json"))
    assert keys["valid"] and not keys["train"] & keys["valid"] and len(keys["train"] | keys["valid"]) == 60


def test_an_input_named_for_one_split_is_refused_for_the_other(tmp_path):
    (tmp_path / "train_64x64.tar").write_bytes(b"")
    with pytest.raises(UserError, match=r"train_64x64\.tar is the train split"):
        split_inputs("vdo", tmp_path / "train_64x64.tar", "valid")
    with pytest.raises(FileNotFoundError, match=r"holds train_64x64\.tar but no valid split"):
        split_inputs("vdo", tmp_path, "valid")


# -- a job's data.prepare against the data it finds (make demo's, then make demo-long's) ---------
def _job(tmp_path, data, **overrides):
    from orchestrator.config import validate
    from tests.jobs import tiny_job

    tree = tiny_job(tmp_path, **{"data__prepare_count": 64, "data__prepare_valid_count": 16, **overrides})
    tree["data"]["train"], tree["data"]["valid"] = f"{data}/train/manifest.json", f"{data}/valid/manifest.json"
    return validate(tree)


def test_a_job_refuses_data_prepared_with_other_settings_and_uses_its_own(tmp_path, caplog):
    from orchestrator.driver.launch import ensure_data

    data = (tmp_path / "data" / "demo").as_uri()
    ensure_data(_job(tmp_path, data))  # prepares 64 + 16 patches
    manifest = (tmp_path / "data" / "demo" / "train" / "manifest.json").read_bytes()
    with caplog.at_level("INFO", logger="orchestrator.driver.launch"):
        ensure_data(_job(tmp_path, data))  # the same settings: used as it is
    assert "holds the data this job would prepare; using it" in caplog.text
    assert (tmp_path / "data" / "demo" / "train" / "manifest.json").read_bytes() == manifest
    longer = _job(tmp_path, data, data__prepare_count=128, data__prepare_flip=True)
    with pytest.raises(UserError) as refused:
        ensure_data(longer)
    message = str(refused.value)
    assert f"data.train: {data}/train/manifest.json holds data prepared with other settings" in message
    assert "count 64, not 128; flip off, not on" in message and f"delete {data}/train" in message
    assert (tmp_path / "data" / "demo" / "train" / "manifest.json").read_bytes() == manifest  # nothing lost


def test_the_shipped_demo_jobs_keep_their_data_apart(monkeypatch):
    from pathlib import Path

    from orchestrator.config import load_job

    monkeypatch.setenv("FLOWPP_DATA_ROOT", "s3://flowpp/data")  # as infra/local/up sets it
    jobs = Path(__file__).resolve().parents[2] / "jobs"
    places = {name: load_job(jobs / name).data.train for name in ("demo.yaml", "demo-long.yaml", "tune-mixtures.yaml")}
    assert places["demo.yaml"] == "s3://flowpp/data/demo/train/manifest.json"
    assert places["demo-long.yaml"] == "s3://flowpp/data/demo-long/train/manifest.json"
    assert len(set(places.values())) == len(places)
