"""``flowpp prepare folder`` on a folder that names no split: split by a hash of each name, and the
summary says how much of the folder a split took and why; ``--whole`` takes the whole folder as the
one split asked for (to score one's own photographs, say)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main

pytestmark = pytest.mark.unit
IMAGES = 60


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "my-photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"photo{i:03d}.png")
    return folder


def _prepare(photos, out, *flags) -> int:
    argv = ["prepare", "folder", "--input", str(photos), "--output", out.as_uri(), "--image-size", "8", *flags]
    return main([*argv, "--progress", "off"])


def test_one_split_of_a_split_less_folder_says_how_much_it_took_and_why(photos, tmp_path, capsys):
    assert _prepare(photos, tmp_path / "out", "--split", "valid") == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "valid" / "manifest.json").read_text())
    taken = manifest["num_samples"]
    assert 0 < taken < IMAGES // 2
    assert manifest["source"]["holdout_taken"] == [taken, IMAGES]
    assert f"  {taken} of {IMAGES} images: an input that names no split is split by a hash of each name" in out
    assert "--whole takes all of it" in out


def test_whole_takes_the_whole_folder_as_the_split_asked_for(photos, tmp_path, capsys):
    assert _prepare(photos, tmp_path / "out", "--split", "valid", "--whole") == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "valid" / "manifest.json").read_text())
    assert manifest["num_samples"] == IMAGES and "holdout" not in manifest["source"]
    assert f"valid: {IMAGES} samples" in out and "of 60 images" not in out
    assert not (tmp_path / "out" / "train").exists()


def test_whole_needs_one_split(photos, tmp_path, capsys):
    assert _prepare(photos, tmp_path / "out", "--whole") == 2
    assert "--whole takes the whole input as one split: give --split train or --split valid" in capsys.readouterr().err


def test_a_file_name_with_a_newline_cannot_forge_a_log_line(photos, tmp_path, caplog):
    """A corrupt image named ``x\\nINFO forged line.png``, skipped: its name is logged quoted, on one line."""
    (photos / "x\nINFO forged line.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with caplog.at_level("WARNING"):
        assert _prepare(photos, tmp_path / "out", "--whole", "--split", "train", "--on-error", "skip") == 0
    lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "x\\nINFO forged line.png" in lines[0], lines


def test_an_image_claiming_a_huge_size_is_refused_from_its_header(photos, tmp_path, capsys):
    """A 20 KB PNG claiming 13000x13000 pixels (0.5 GB decoded) is refused before decoding, naming it."""
    import tracemalloc

    from tests.datafixtures import png_claiming

    (photos / "bomb.png").write_bytes(png_claiming(13000, 13000))
    tracemalloc.start()
    assert _prepare(photos, tmp_path / "out", "--whole", "--split", "train") == 2
    assert tracemalloc.get_traced_memory()[1] < 200 * 2**20
    tracemalloc.stop()
    err = capsys.readouterr().err
    assert "bomb.png: 13000x13000 pixels, more than prepare reads (67,108,864)" in err, err


def test_what_only_looks_like_an_image_is_skipped_and_a_link_out_of_the_folder_refused(photos, tmp_path, caplog):
    import os

    (photos / "folder.png").mkdir()
    os.mkfifo(photos / "fifo.png")  # opened, it would block prepare forever
    (photos / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((photos / "photo000.png").read_bytes())
    (photos / "out.png").symlink_to(outside)
    assert _prepare(photos, tmp_path / "out", "--whole", "--split", "train") == 2
    (photos / "out.png").unlink()
    with caplog.at_level("WARNING"):
        assert _prepare(photos, tmp_path / "out", "--whole", "--split", "train") == 0
    said = caplog.text
    assert "folder.png: not a regular file" in said and "fifo.png: not a regular file" in said
    assert "dangling.png: a link to nothing" in said
    manifest = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == IMAGES


def test_a_link_out_of_the_folder_is_named(photos, tmp_path, capsys):
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((photos / "photo000.png").read_bytes())
    (photos / "out.png").symlink_to(outside)
    assert _prepare(photos, tmp_path / "out", "--whole", "--split", "train") == 2
    assert f"out.png: a link out of the input folder (to {outside})" in capsys.readouterr().err


def test_a_sparse_or_oversized_tar_member_is_refused_before_it_is_read(tmp_path, capsys):
    import io
    import tarfile

    def tar_with(member: tarfile.TarInfo, data: bytes) -> None:
        (tmp_path / "in").mkdir(exist_ok=True)
        with tarfile.open(tmp_path / "in" / "train_64x64.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            tar.addfile(member, io.BytesIO(data))

    sparse = tarfile.TarInfo("train_64x64/00000001.png")
    sparse.type = tarfile.GNUTYPE_SPARSE  # a 10 KiB tar of these unpacked to 16 GiB
    tar_with(sparse, b"")
    out = (tmp_path / "o").as_uri()
    argv = ["prepare", "vdo", "--input", str(tmp_path / "in"), "--output", out, "--progress", "off"]
    assert main(argv) == 2
    assert "member train_64x64/00000001.png is sparse" in capsys.readouterr().err
    big = tarfile.TarInfo("train_64x64/00000002.png")
    big.size = 2 << 20
    tar_with(big, b"\0" * big.size)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "member train_64x64/00000002.png is 2,097,152 bytes, more than a 64x64 image can be" in err


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (lambda tar: b"this is no tar at all" * 100, "not a readable tar"),
        (lambda tar: tar[: len(tar) // 2], "not a readable tar"),
        (lambda tar: __import__("gzip").compress(tar), "a compressed tar; decompress it first"),
    ],
    ids=["not a tar", "truncated", "gzip"],
)
def test_a_bad_train_tar_is_one_line_naming_it(tmp_path, capsys, content, says):
    from tests.datafixtures import make_vdo_tar

    (tmp_path / "good").mkdir()
    good = make_vdo_tar(tmp_path / "good" / "train_64x64.tar", 40)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train_64x64.tar").write_bytes(content(good.read_bytes()))
    argv = ["prepare", "vdo", "--input", str(tmp_path / "in"), "--output", (tmp_path / "o").as_uri()]
    assert main([*argv, "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'in' / 'train_64x64.tar'}: {says}" in err and "Traceback" not in err, err
