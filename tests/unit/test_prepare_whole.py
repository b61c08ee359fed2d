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
