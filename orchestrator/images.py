"""Sample grids: n images from a model, tiled into one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


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


def sample_grid(model, n: int, path: Path, seed: int, temperature: float = 1.0) -> Path:
    """Write a PNG of ``model.sample(n)`` drawn with ``seed``; returns ``path``."""
    from PIL import Image

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)  # on the model's device, where randn draws
    images = model.sample(n, temperature=temperature, generator=gen).cpu().numpy()  # (n, C, H, W)
    grid = tile(images)
    Image.fromarray(grid.squeeze() if grid.shape[2] == 1 else grid).save(path)
    return path
