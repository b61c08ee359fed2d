"""Lossless codecs' bits/dim on a split, for ``flowpp evaluate --baseline png,webp``: what a
model's bits/dim should be compared against.

Every image of the split is read exactly as ``orchestrator.evaluation.evaluate.per_image_bpd`` reads it
(``split_images``: the same images, in the same order, the same ``seed`` and ``max_images``)
and encoded alone with Pillow:

- ``png``: PNG with ``optimize=True`` (zlib's ``compress_level`` 9, whatever else is given,
  and extra work to find the encoder settings that give the smallest file);
- ``webp``: WebP in lossless mode, ``lossless=True, quality=100, method=6`` (in lossless mode
  ``quality`` is the compression effort, 100 the most, and ``method`` 6 the slowest, smallest).

An image's bits/dim is 8 x its encoded bytes / (H x W x C): the size of the file alone, with no
container overhead beyond the format's own headers (PNG's signature and chunks, WebP's RIFF
header), and no metadata. The figure for a split is the mean over its images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from orchestrator.core import storage
from orchestrator.core.errors import FlowppError, UserError
from orchestrator.core.progress import bar
from orchestrator.evaluation.evaluate import split_images

CODECS = {
    "png": ("PNG", {"optimize": True, "compress_level": 9}, "lossless, optimize"),
    "webp": ("WEBP", {"lossless": True, "quality": 100, "method": 6}, "lossless, method 6"),
}
"""name: (Pillow format, save options, what the output line says of the settings)."""


@dataclass
class Baseline:
    codec: str
    bpd: float
    """Mean bits/dim over the images."""
    images: int

    def line(self) -> str:
        return f"{self.codec}: {self.bpd:.4f} bits/dim on {self.images} images ({CODECS[self.codec][2]})"


def parse_codecs(text: str) -> list[str]:
    """Codec names from a comma-separated list (``"png,webp"``), each checked, duplicates dropped."""
    names = list(dict.fromkeys(name.strip().lower() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in CODECS]
    if unknown or not names:
        what = f"unknown codec {', '.join(map(repr, unknown))}" if unknown else f"no codec in {text!r}"
        raise UserError(f"--baseline: {what} (known: {', '.join(CODECS)})")
    if "webp" in names:
        from PIL import features

        if not features.check("webp"):
            raise FlowppError("--baseline webp: this Pillow has no WebP support (PIL.features.check('webp') is False)")
    return names


def encoded_bpd(image: np.ndarray, codec: str) -> float:
    """Bits/dim of one (C, H, W) uint8 image (C: 1 or 3) encoded with ``codec``."""
    from PIL import Image

    fmt, options, _ = CODECS[codec]
    channels, height, width = image.shape
    pixels = image[0] if channels == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return 8 * buffer.getbuffer().nbytes / (channels * height * width)


def score_codecs(
    manifest_url: str,
    codecs: list[str],
    options: storage.StorageOptions | None = None,
    *,
    seed: int = 0,
    max_images: int = 0,
    desc: str = "baselines",
) -> list[Baseline]:
    """Each codec's mean bits/dim over the split's images (read once for all codecs)."""
    total, split = split_images(manifest_url, options, seed=seed, max_images=max_images)
    sums = dict.fromkeys(codecs, 0.0)
    count = 0
    with bar(desc, total) as progress:
        for batch in split:
            for image in batch["images"].numpy():
                for codec in codecs:
                    sums[codec] += encoded_bpd(image, codec)
                count += 1
            progress.update(len(batch["images"]))
    return [Baseline(codec, sums[codec] / max(count, 1), count) for codec in codecs]
