"""flowpp prepare: every source, shard format and fault option, on real files."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main as cli_main
from orchestrator.data.prepare import PrepareOptions, prepare
from orchestrator.data.sources import (
    DEMO_GREY,
    DEMO_PHOTOS,
    DEMO_SCALES,
    CorruptInputError,
    _demo_dir,
    demo_photos,
    demo_plan,
    iter_items,
)
from orchestrator.data.stream import ShardStream, load_manifest
from tests.datafixtures import make_npz_batch, make_vdo_tar, png_bytes

pytestmark = pytest.mark.integration


def _opts(out, **kw):
    return PrepareOptions(**{"source": "vdo", "input": "", "output": str(out), "progress": False, **kw})


def _all_samples(manifest_url, batch=1):
    stream = ShardStream(manifest_url, batch_size=batch)
    out = {}
    for b in stream:
        for k, img, lab in zip(b["keys"], b["images"], b["labels"], strict=True):
            out[k] = (img.numpy(), int(lab))
    return out


def test_vdo_tar_to_png_shards_with_a_manifest(tmp_path):
    src = make_vdo_tar(tmp_path / "train_64x64.tar", 40)
    m = prepare(_opts(tmp_path / "out", input=str(tmp_path), shard_bytes=60_000))
    assert m["num_samples"] == 40 and m["num_shards"] > 1
    assert m["source"]["kind"] == "vdo" and "van den Oord" in m["source"]["dataset"]
    for i, shard in enumerate(m["shards"]):
        assert shard["url"] == f"train-{i:06d}.tar"
        data = (tmp_path / "out" / shard["url"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert shard["bytes"] <= 60_000 + 20_000  # about the target
    assert m["total_bytes"] == sum(s["bytes"] for s in m["shards"])
    # the PNG bytes of a 64x64 RGB source pass through untouched
    with tarfile.open(src) as tar:
        first = tar.extractfile(tar.getmembers()[0]).read()
    assert first in b"".join((tmp_path / "out" / s["url"]).read_bytes() for s in m["shards"])


def test_vdo_folder_and_tar_give_the_same_pixels(tmp_path):
    make_vdo_tar(tmp_path / "valid_64x64.tar", 12, seed=1)
    with tarfile.open(tmp_path / "valid_64x64.tar") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    prepare(_opts(tmp_path / "a", input=str(tmp_path), split="valid"))
    prepare(_opts(tmp_path / "b", input=str(tmp_path / "extracted" / "valid_64x64"), split="valid"))
    a = _all_samples(str(tmp_path / "a" / "manifest.json"))
    b = _all_samples(str(tmp_path / "b" / "manifest.json"))
    pixels = lambda d: sorted(v[0].tobytes() for v in d.values())  # noqa: E731
    assert len(a) == 12 and pixels(a) == pixels(b)


def test_npz_batches_keep_planes_and_labels(tmp_path):
    _, imgs1, labels1 = make_npz_batch(tmp_path / "train_data_batch_1.npz", 10, seed=1)
    _, imgs2, labels2 = make_npz_batch(tmp_path / "train_data_batch_2.npz", 7, seed=2)
    m = prepare(_opts(tmp_path / "out", source="npz", input=str(tmp_path), format="raw"))
    assert m["num_samples"] == 17 and "Chrabaszcz" in m["source"]["dataset"]
    assert m["source"]["inputs"] == ["train_data_batch_1.npz", "train_data_batch_2.npz"]
    got = _all_samples(str(tmp_path / "out" / "manifest.json"))
    for i in range(10):
        img, lab = got[f"train_data_batch_1_{i:07d}"]
        np.testing.assert_array_equal(img, imgs1[i].transpose(2, 0, 1))  # R, G, B planes restored
        assert lab == labels1[i]  # 1..1000, kept as given
    assert got["train_data_batch_2_0000006"][1] == labels2[6]


def test_npz_valid_split_file(tmp_path):
    make_npz_batch(tmp_path / "val_data.npz", 5)
    m = prepare(_opts(tmp_path / "out", source="npz", input=str(tmp_path), split="valid"))
    assert m["num_samples"] == 5 and m["shards"][0]["url"] == "valid-000000.tar"


def test_any_folder_is_box_downsampled(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "imgs" / "wide.jpg", quality=95)
    Image.fromarray(np.full((128, 128, 3), 77, np.uint8)).save(tmp_path / "imgs" / "sub" / "sq.png")
    m = prepare(_opts(tmp_path / "out", source="folder", input=str(tmp_path / "imgs")))
    got = _all_samples(str(tmp_path / "out" / "manifest.json"))
    assert m["num_samples"] == 2 and set(got) == {"wide", "sub_sq"}
    assert got["sub_sq"][0].shape == (3, 64, 64) and (got["sub_sq"][0] == 77).all()


def test_demo_source_splits_by_photograph(tmp_path):
    rc = cli_main(["prepare", "demo", "--output", str(tmp_path / "demo"), "--count", "72", "--valid-count", "16"])
    assert rc == 0
    train = load_manifest(str(tmp_path / "demo" / "train" / "manifest.json"))
    valid = load_manifest(str(tmp_path / "demo" / "valid" / "manifest.json"))
    assert train["num_samples"] == 72 and valid["num_samples"] == 16
    tk = set(_all_samples(str(tmp_path / "demo" / "train" / "manifest.json")))
    vk = set(_all_samples(str(tmp_path / "demo" / "valid" / "manifest.json")))
    photo = lambda k: k.rsplit("_", 1)[0]  # noqa: E731
    assert {photo(k) for k in tk}.isdisjoint({photo(k) for k in vk})
    imgs = np.stack([v[0] for v in _all_samples(str(tmp_path / "demo" / "valid" / "manifest.json")).values()])
    assert imgs.std() > 20  # real photographs, not flat fills
    # every photograph of the split gives patches, and the manifest says which went where
    td, vd = train["source"]["demo"], valid["source"]["demo"]
    assert set(td["photos"]) == set(DEMO_PHOTOS["train"]) and sum(td["photos"].values()) == 72
    assert set(vd["photos"]) == set(DEMO_PHOTOS["valid"]) and sum(vd["photos"].values()) == 16
    assert td["other_split_photos"] == list(DEMO_PHOTOS["valid"]) == list(vd["photos"])
    assert vd["other_split_photos"] == [*DEMO_PHOTOS["train"], *DEMO_GREY]
    assert {Path(p).stem for p in td["photos"]} == {photo(k) for k in tk}
    assert len(td["scales"]) > 1 and td["flipped"] == 0  # several scales; no flips without --flip


@pytest.mark.parametrize("how", ["", "--progress off", "FLOWPP_PROGRESS=off", "TQDM_DISABLE=1"])
def test_prepares_bar_follows_the_progress_choice(tmp_path, monkeypatch, capsys, how):
    monkeypatch.setenv("FLOWPP_PROGRESS", "on")  # a live bar on stderr, unless switched off below
    args = ["prepare", "demo", "--output", str(tmp_path), "--count", "8", "--valid-count", "4"]
    if how.startswith("--"):
        args += how.split()
    elif how:
        monkeypatch.setenv(*how.split("="))
    assert cli_main(args) == 0
    err = capsys.readouterr().err
    assert ("prepare train" in err) == (how == ""), err


def test_demo_source_draws_from_every_bundled_photograph():
    """DEMO_PHOTOS is every photograph in scikit-image's data folder: a new release's
    additions or removals show up here, not as a silently smaller demo."""
    synthetic = {"chessboard_GRAY.png", "chessboard_RGB.png", "color.png", "horse.png", "logo.png", "phantom.png"}
    animations = {"multipage.tif", "multipage_rgb.tif", "no_time_for_that_tiny.gif"}
    exts = {".png", ".jpg", ".jpeg", ".tif", ".gif"}
    shipped = {p.name for p in _demo_dir().iterdir() if p.suffix in exts}
    listed = {*DEMO_PHOTOS["train"], *DEMO_PHOTOS["valid"], *DEMO_GREY}
    assert listed == shipped - synthetic - animations
    assert not set(demo_photos("train", grey=True)) & set(demo_photos("valid", grey=True))


def test_demo_scales_are_box_downsampled_crops_and_flip_mirrors():
    plan = demo_plan("train", 400, 32, seed=3, flip=True)
    assert {p.scale for p in plan} == set(DEMO_SCALES)
    assert 120 < sum(p.flip for p in plan) < 280
    items = {it.key: it for it in iter_items("demo", [], split="train", count=400, size=32, seed=3, flip=True)}
    for i, p in enumerate(plan[:40]):
        with Image.open(_demo_dir() / p.photo) as im:
            photo = np.asarray(im.convert("RGB")).astype(np.float64)
        side = 32 * p.scale
        crop = photo[p.y : p.y + side, p.x : p.x + side]
        want = crop.reshape(32, p.scale, 32, p.scale, 3).mean(axis=(1, 3))  # the box filter
        if p.flip:
            want = want[:, ::-1]
        got = items[f"{Path(p.photo).stem}_{i:06d}"].array
        assert got.shape == (32, 32, 3)
        assert np.abs(got - want).max() <= 1.0, (p, np.abs(got - want).max())
    # same seed, same patches; --flip changes only which are mirrored
    unflipped = demo_plan("train", 400, 32, seed=3)
    assert not any(p.flip for p in unflipped)
    assert demo_plan("train", 400, 32, seed=3, flip=True) == plan


def test_demo_flip_mirrors_and_grey_adds_grey_photographs_to_training_only(tmp_path):
    args = ["prepare", "demo", "--output", str(tmp_path), "--count", "36", "--valid-count", "16", "--flip", "--grey"]
    assert cli_main(args) == 0
    train = load_manifest(str(tmp_path / "train" / "manifest.json"))["source"]["demo"]
    valid = load_manifest(str(tmp_path / "valid" / "manifest.json"))["source"]["demo"]
    assert train["flipped"] > 0 and valid["flipped"] == 0
    assert set(train["photos"]) == {*DEMO_PHOTOS["train"], *DEMO_GREY} and set(valid["photos"]) == set(
        DEMO_PHOTOS["valid"]
    )
    grey = [v for k, v in _all_samples(str(tmp_path / "train" / "manifest.json")).items() if k.startswith("camera_")]
    assert grey and all((img[0] == img[1]).all() and (img[1] == img[2]).all() for img, _ in grey)


def test_shards_are_byte_identical_and_members_have_mtime_zero(tmp_path):
    make_vdo_tar(tmp_path / "train_64x64.tar", 30)
    m1 = prepare(_opts(tmp_path / "a", input=str(tmp_path), shard_bytes=50_000))
    m2 = prepare(_opts(tmp_path / "b", input=str(tmp_path), shard_bytes=50_000))
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert members and all(t.mtime == 0 and not t.pax_headers for t in members)


def test_raw_format_is_12288_bytes_per_image(tmp_path):
    make_vdo_tar(tmp_path / "train_64x64.tar", 4)
    prepare(_opts(tmp_path / "out", input=str(tmp_path), format="raw"))
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        sizes = {t.name.rsplit(".", 1)[1]: t.size for t in tar.getmembers()}
    assert sizes == {"raw": 12288}


def test_rerun_skips_verified_shards_and_rebuilds_damaged_ones(tmp_path, caplog):
    make_vdo_tar(tmp_path / "train_64x64.tar", 40)
    opts = _opts(tmp_path / "out", input=str(tmp_path), shard_bytes=40_000)
    first = prepare(opts)
    n = first["num_shards"]
    again = prepare(opts)
    assert again["_kept_shards"] == n and again["shards"] == first["shards"]
    damaged = tmp_path / "out" / first["shards"][1]["url"]
    damaged.write_bytes(damaged.read_bytes()[:-1000])
    third = prepare(opts)
    assert third["_kept_shards"] == n - 1  # only the damaged shard is rebuilt, under a new name
    rebuilt = third["shards"][1]
    assert rebuilt["url"] != first["shards"][1]["url"] and rebuilt["sha256"] == first["shards"][1]["sha256"]
    assert hashlib.sha256((tmp_path / "out" / rebuilt["url"]).read_bytes()).hexdigest() == rebuilt["sha256"]
    assert [s["url"] for s in third["shards"][2:]] == [s["url"] for s in first["shards"][2:]]


def test_corrupt_input_raises_naming_the_file_or_is_skipped_and_counted(tmp_path):
    make_vdo_tar(tmp_path / "train_64x64.tar", 10, corrupt=(3, 7))
    with pytest.raises(CorruptInputError, match=r"train_64x64\.tar:train_64x64/0000000[37]\.png"):
        prepare(_opts(tmp_path / "out", input=str(tmp_path)))
    m = prepare(_opts(tmp_path / "out2", input=str(tmp_path), on_error="skip"))
    assert m["num_samples"] == 8 and m["skipped"]["count"] == 2
    assert all("0000000" in e for e in m["skipped"]["examples"])
    on_disk = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert on_disk["skipped"]["count"] == 2


def test_missing_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare(_opts(tmp_path / "out", source="folder", input=str(tmp_path / "nowhere")))


def test_png_in_tar_must_decode(tmp_path):
    # a PNG header with garbage after it is still corrupt
    bad = png_bytes(np.zeros((64, 64, 3), np.uint8))[:40]
    with tarfile.open(tmp_path / "train_64x64.tar", "w") as tar:
        info = tarfile.TarInfo("train_64x64/bad.png")
        info.size = len(bad)
        tar.addfile(info, io.BytesIO(bad))
    with pytest.raises(CorruptInputError, match="bad.png"):
        prepare(_opts(tmp_path / "out", input=str(tmp_path)))
