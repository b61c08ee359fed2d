"""Volume-preserving rearrangements: space-to-depth, half splits and the flip.

Tensors are NCHW. The stripe split takes even and odd columns, the channel
split the first and second half of the channels, both as the official code's
CheckerboardSplit / ChannelSplit do.
"""

from __future__ import annotations

import torch
from torch import nn

SPLITS = ("stripe", "channel")


def split_halves(x: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split == "stripe":  # (B, C, H, W) -> 2 x (B, C, H, W/2)
        return x[..., 0::2], x[..., 1::2]
    if split == "channel":  # (B, C, H, W) -> 2 x (B, C/2, H, W)
        a, b = x.chunk(2, dim=1)
        return a, b
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def merge_halves(a: torch.Tensor, b: torch.Tensor, split: str) -> torch.Tensor:
    if split == "stripe":
        # (B, C, H, W/2, 2) interleaves columns back: even from a, odd from b.
        return torch.stack([a, b], dim=-1).flatten(-2)
    if split == "channel":
        return torch.cat([a, b], dim=1)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def half_shape(shape: tuple[int, int, int], split: str) -> tuple[int, int, int]:
    """(C, H, W) of one half of a (C, H, W) tensor."""
    c, h, w = shape
    return (c, h, w // 2) if split == "stripe" else (c // 2, h, w)


class SpaceToDepth(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channels ordered (dy, dx, c) as TF's space_to_depth."""

    def __init__(self, block_size: int = 2):
        super().__init__()
        self.block_size = block_size

    def forward(self, x, cond=None):
        b, c, h, w = x.shape
        k = self.block_size
        y = x.reshape(b, c, h // k, k, w // k, k).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(b, k * k * c, h // k, w // k), x.new_zeros(b)

    def inverse(self, y, cond=None):
        b, ck, h, w = y.shape
        k = self.block_size
        x = y.reshape(b, k, k, ck // (k * k), h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, ck // (k * k), h * k, w * k)


class Flip(nn.Module):
    """Swaps the two halves of a split, so the next coupling transforms the other one."""

    def __init__(self, split: str):
        super().__init__()
        self.split = split

    def forward(self, x, cond=None):
        a, b = split_halves(x, self.split)
        return merge_halves(b, a, self.split), x.new_zeros(x.shape[0])

    def inverse(self, y, cond=None):
        return self.forward(y)[0]
