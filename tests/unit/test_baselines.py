"""orchestrator.evaluation.baselines: PNG and WebP-lossless bits/dim of known images, and the codec names."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from orchestrator.core.errors import FlowppError, UserError
from orchestrator.evaluation.baselines import CODECS, Baseline, encoded_bpd, parse_codecs

pytestmark = pytest.mark.unit

rng = np.random.default_rng(0)
NOISE = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
CONSTANT = np.full((3, 64, 64), 117, dtype=np.uint8)


@pytest.mark.parametrize("codec", ["png", "webp"])
def test_a_constant_image_takes_far_fewer_bits_than_noise(codec):
    flat, noise = encoded_bpd(CONSTANT, codec), encoded_bpd(NOISE, codec)
    assert 0 < flat < 0.2 and noise > 7.5 and noise > 40 * flat


def test_noise_does_not_compress_below_8_bits_with_png():
    # uniform noise holds 8 bits a value; PNG's headers and zlib's framing only add to that
    assert 8.0 <= encoded_bpd(NOISE, "png") < 8.2


def test_the_figure_is_the_file_size_of_the_codec_settings():
    buffer = io.BytesIO()
    Image.fromarray(NOISE.transpose(1, 2, 0)).save(buffer, format="WEBP", lossless=True, quality=100, method=6)
    assert encoded_bpd(NOISE, "webp") == 8 * len(buffer.getvalue()) / NOISE.size
    # and the pixels come back: lossless
    assert (np.asarray(Image.open(io.BytesIO(buffer.getvalue()))) == NOISE.transpose(1, 2, 0)).all()


def test_a_one_channel_image_is_encoded_grey_and_counts_h_w_dims():
    grey = NOISE[:1]
    buffer = io.BytesIO()
    Image.fromarray(grey[0]).save(buffer, format="PNG", optimize=True)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "L"
    assert encoded_bpd(grey, "png") == 8 * len(buffer.getvalue()) / (64 * 64)


def test_codec_names_are_parsed_and_checked():
    assert parse_codecs("png,webp") == ["png", "webp"]
    assert parse_codecs(" WEBP , png,webp") == ["webp", "png"]
    with pytest.raises(UserError, match=r"unknown codec 'gif' \(known: png, webp\)"):
        parse_codecs("png,gif")
    with pytest.raises(UserError, match="no codec in ','"):
        parse_codecs(",")


def test_a_pillow_without_webp_is_named(monkeypatch):
    from PIL import features

    monkeypatch.setattr(features, "check", lambda name: name != "webp")
    with pytest.raises(FlowppError, match="no WebP support"):
        parse_codecs("png,webp")
    assert parse_codecs("png") == ["png"]


def test_the_line_names_the_settings():
    assert set(CODECS) == {"png", "webp"}
    assert Baseline("png", 4.02514, 256).line() == "png: 4.0251 bits/dim on 256 images (lossless, optimize)"
    assert Baseline("webp", 3.219, 256).line() == "webp: 3.2190 bits/dim on 256 images (lossless, method 6)"
