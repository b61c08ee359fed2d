"""What prepare reads from an image file (orchestrator.data.sources.decode): the pixels as the image
shows them, or a refusal naming the file. 16-bit values are scaled (they became white), float
pixels are refused (they became black), a transparent alpha is refused (it was dropped), and the
EXIF orientation is applied (it was ignored)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from orchestrator.data.sources import CorruptInputError, Item, decode

pytestmark = pytest.mark.unit


def item(im: Image.Image, fmt: str, **save) -> Item:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return Item(key="k", ref=f"photo.{fmt.lower()}", data=buf.getvalue())


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped_to_white():
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    got = decode(item(Image.fromarray(ramp), "PNG"), 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], (ramp >> 8).astype(np.uint8))
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 200  # a ramp, not all white


def test_float_pixels_are_refused_by_name():
    with pytest.raises(CorruptInputError, match=r"photo.tiff: floating-point pixels \(F\)"):
        decode(item(Image.fromarray(np.full((64, 64), 0.5, np.float32)), "TIFF"), 64)


def test_a_transparent_alpha_is_refused_and_an_opaque_one_dropped():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    opaque = decode(item(Image.fromarray(rgba, "RGBA"), "PNG"), 64)
    assert (opaque[..., 0] == 200).all() and (opaque[..., 1:] == 0).all()
    rgba[:8, :8, 3] = 0
    with pytest.raises(CorruptInputError, match="photo.png: transparent pixels"):
        decode(item(Image.fromarray(rgba, "RGBA"), "PNG"), 64)


def test_the_exif_orientation_turns_the_image_upright():
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = 255  # left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees, so shown with the right half white
    got = decode(item(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95), 64)
    assert got[:, 40:].mean() > 200 and got[:, :24].mean() < 50
