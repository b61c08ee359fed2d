"""Held-out evaluation of a model: per-image bits/dim over a manifest's shards.

Deterministic for a given (manifest, seed, samples): the shard order comes from the
seed, and the dequantization noise is drawn from a generator seeded the same way for
every model, so two models are scored on the same images with the same noise and
their per-image figures can be paired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator import storage
from orchestrator.data.stream import ShardStream


@dataclass
class Scores:
    keys: list[str]
    bpd: np.ndarray
    """Per image: the dequantization bound (samples=1) or the importance-weighted bound, in bits/dim."""

    @property
    def mean(self) -> float:
        return float(self.bpd.mean())


@torch.no_grad()
def per_image_bpd(
    model,
    manifest_url: str,
    options: storage.StorageOptions | None = None,
    *,
    seed: int = 0,
    samples: int = 1,
    max_images: int = 0,
    batch_size: int = 32,
) -> Scores:
    """Score ``model`` (eval mode, whatever weights it holds) on a split, image by image."""
    model.eval()
    # batch 1 at the stream level: a plan never drops a remainder; batches are re-formed below
    stream = ShardStream(manifest_url, batch_size=1, seed=seed, options=options, shuffle_buffer=1)
    keys: list[str] = []
    images: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    devices = {p.device for p in model.parameters()}
    device = devices.pop() if devices else torch.device("cpu")
    state = torch.get_rng_state()
    torch.manual_seed(seed)  # the same dequantization noise for every model scored this way
    try:
        for batch in stream:
            keys += list(batch["keys"])
            images.append(batch["images"])
            if sum(len(x) for x in images) >= batch_size:
                scores.append(_score(model, torch.cat(images), samples, device))
                images = []
            if max_images and len(keys) >= max_images:
                break
        if images:
            scores.append(_score(model, torch.cat(images), samples, device))
    finally:
        torch.set_rng_state(state)
    bpd = torch.cat(scores).double().numpy()
    n = max_images or len(keys)
    return Scores(keys[:n], bpd[:n])


def _score(model, x: torch.Tensor, samples: int, device) -> torch.Tensor:
    x = x.to(device).long()
    log_prob = model.importance_weighted_log_prob(x, samples) if samples > 1 else model.log_prob(x)
    return (-log_prob / (model.num_dims * math.log(2))).cpu()
