"""flowpp evaluate --baseline png,webp: lossless codecs' bits/dim on real shards written by
``prepare``, equal to Pillow's file sizes of the same images, and the same images as a model's."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from flowpp import FlowPlusPlus
from flowpp.distributed import data_dependent_init
from orchestrator.cli import main, smooth_images
from orchestrator.data.prepare import PrepareOptions, prepare
from orchestrator.data.stream import ShardStream
from orchestrator.evaluation.baselines import score_codecs
from orchestrator.evaluation.evaluate import per_image_bpd
from tests.datafixtures import png_bytes, random_image
from tests.helpers import random_images, tiny_config

pytestmark = pytest.mark.integration

N, SIZE = 24, 8


@pytest.fixture
def split(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    """A valid split of smooth and noisy 8x8 images in several PNG shards, and its source pixels by file name."""
    rng = np.random.default_rng(3)
    smooth = smooth_images(N // 2, SIZE, seed=3).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = {f"{i:08d}": (smooth[i // 2] if i % 2 else random_image(rng, SIZE)) for i in range(N)}
    with tarfile.open(tmp_path / "valid_64x64.tar", "w") as tar:
        for name, arr in pixels.items():
            data = png_bytes(arr)
            info = tarfile.TarInfo(f"valid_64x64/{name}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    options = PrepareOptions(source="vdo", input=str(tmp_path), output=str(tmp_path / "out"), split="valid",
                             image_size=SIZE, shard_bytes=800, progress=False)  # fmt: skip
    manifest = prepare(options)
    assert manifest["num_samples"] == N and manifest["num_shards"] > 2
    return f"file://{tmp_path}/out/manifest.json", pixels


def pillow_bpd(arr: np.ndarray, codec: str) -> float:
    """Bits/dim of an (H, W, 3) image as Pillow writes it with the codec's settings."""
    buffer = io.BytesIO()
    if codec == "png":
        Image.fromarray(arr).save(buffer, format="PNG", optimize=True)
    else:
        Image.fromarray(arr).save(buffer, format="WEBP", lossless=True, quality=100, method=6)
    return 8 * len(buffer.getvalue()) / arr.size


def stream_pixels(url: str) -> dict[str, np.ndarray]:
    """Every image of a split by key, (H, W, 3), read plainly."""
    return {
        key: image.permute(1, 2, 0).numpy()
        for batch in ShardStream(url, batch_size=1)
        for key, image in zip(batch["keys"], batch["images"], strict=True)
    }


def test_evaluate_with_only_baselines_prints_pillow_s_sizes(split, capsys):
    url, pixels = split
    assert main(["--progress", "off", "evaluate", "--data", url, "--baseline", "png,webp"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2, lines
    for line, codec, settings in zip(lines, ("png", "webp"), ("lossless, optimize", "lossless, method 6"), strict=True):
        expected = np.mean([pillow_bpd(arr, codec) for arr in pixels.values()])
        assert line == f"{codec}: {expected:.4f} bits/dim on {N} images ({settings})"
    png, webp = (float(line.split()[1]) for line in lines)
    assert min(png, webp) > 4  # half of them noise (8 bits/dim and headers, a lot on 8x8 images)


def test_max_images_scores_the_images_a_model_is_scored_on(split):
    url, _ = split
    torch.manual_seed(0)
    model = FlowPlusPlus(tiny_config(image_size=SIZE))
    data_dependent_init(model, random_images(8, SIZE, 256, 0))
    for seed in (0, 1):
        keys = per_image_bpd(model, url, seed=seed, max_images=7, batch_size=4).keys
        by_key = stream_pixels(url)
        png, webp = score_codecs(url, ["png", "webp"], seed=seed, max_images=7)
        assert len(keys) == 7 and png.images == webp.images == 7
        assert png.bpd == pytest.approx(np.mean([pillow_bpd(by_key[k], "png") for k in keys]), abs=1e-12)
        assert webp.bpd == pytest.approx(np.mean([pillow_bpd(by_key[k], "webp") for k in keys]), abs=1e-12)
    # the seed picks different first images: the figures depend on which images they are
    assert score_codecs(url, ["png"], seed=0, max_images=7) != score_codecs(url, ["png"], seed=1, max_images=7)


def test_an_unknown_codec_exits_2_naming_it_before_any_model_loads(split, capsys):
    url, _ = split
    code = main(["evaluate", "--model", "models:/not-registered/1", "--data", url, "--baseline", "png,gif"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip() == "flowpp evaluate: --baseline: unknown codec 'gif' (known: png, webp)"


def test_without_model_or_baseline_it_exits_2_saying_what_is_required(split, capsys):
    url, _ = split
    assert main(["evaluate", "--data", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowpp evaluate: the following arguments are required: --model (or --baseline")
