"""Sample grids: n images from a model, tiled into one PNG, with a progress bar over the
flow's inverse (orchestrator.core.progress)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from orchestrator.core.progress import bar

SAMPLE_CHUNK = 16
"""Images inverted at a time: the progress bar's step, and a bound on the inverse's memory."""


def tile(images: np.ndarray) -> np.ndarray:
    """(n, C, H, W) uint8 -> (rows * H, cols * W, C) on a near-square grid, empty cells black."""
    n, c, h, w = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img.transpose(1, 2, 0)
    return grid


@torch.no_grad()
def sample_images(model, n: int, seed: int, temperature: float = 1.0, desc: str = "sample") -> np.ndarray:
    """(n, C, H, W) uint8: ``model.sample(n)`` drawn with ``seed``, inverted ``SAMPLE_CHUNK`` at a time.

    The latents are drawn at once, as ``model.sample`` draws them, so the images are the same
    however many are inverted at a time (the inverse acts image by image).
    """
    param = next(model.parameters())
    gen = torch.Generator(device=param.device).manual_seed(seed)  # on the model's device, where randn draws
    z = torch.randn((n, *model.latent_shape), generator=gen, device=param.device, dtype=param.dtype)
    chunks = []
    with bar(desc, n) as progress:
        for part in z.split(SAMPLE_CHUNK):
            y = model.flow.inverse(part * temperature)
            chunks.append(y.floor().clamp(0, model.num_levels - 1).to(torch.uint8).cpu())
            progress.update(len(part))
    return torch.cat(chunks).numpy()


def sample_grid(model, n: int, path: Path, seed: int, temperature: float = 1.0, desc: str = "sample") -> Path:
    """Write a PNG of ``model.sample(n)`` drawn with ``seed``; returns ``path``."""
    from PIL import Image

    grid = tile(sample_images(model, n, seed, temperature, desc))
    Image.fromarray(grid.squeeze() if grid.shape[2] == 1 else grid).save(path)
    return path
