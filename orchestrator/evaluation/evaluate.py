"""Held-out evaluation: the training loop's all-reduced bits/dim, and per-image bits/dim
over a manifest's shards for ``flowpp evaluate`` and promotion. Each shows a progress bar
with images/s on stderr (orchestrator.core.progress: rank 0 only, quiet in a log).

Deterministic for a given (manifest, seed, samples): the shard order comes from the
seed, and the dequantization noise is drawn from a generator seeded the same way for
every model, so two models are scored on the same images with the same noise and
their per-image figures can be paired.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from flowpp.distributed import all_sum
from orchestrator.core import storage
from orchestrator.core.progress import bar
from orchestrator.data.stream import ShardStream, to_device

if TYPE_CHECKING:
    from flowpp import FlowPlusPlus


@dataclass
class Scores:
    keys: list[str]
    bpd: np.ndarray
    """Per image: the dequantization bound (samples=1) or the importance-weighted bound, in bits/dim."""

    @property
    def mean(self) -> float:
        return float(self.bpd.mean())


@torch.no_grad()
def evaluate(
    model: FlowPlusPlus,
    batches: Iterable[torch.Tensor],
    *,
    samples: int,
    seed: int,
    desc: str = "evaluate",
    total: int | None = None,
) -> tuple[float, int]:
    """Bits/dim over every rank's ``batches`` of uint8 pixels, and the number of images scored.

    With whatever weights ``model`` holds, on its device; ``samples`` > 1 gives the
    importance-weighted bound. The same dequantization noise at every evaluation (seeded),
    the caller's RNG (CPU, and the model's GPU) untouched. Every rank must call it (the
    totals are all-reduced). ``desc`` and ``total`` (this rank's images, if known) label its
    progress bar.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync a batch
    count = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bar(desc, total) as progress:
        torch.manual_seed(seed)
        for images in batches:
            x = to_device(images, device, model.config.num_bits)
            lp = model.importance_weighted_log_prob(x, samples) if samples > 1 else model.log_prob(x)
            nats -= lp.double().sum()
            count += x.shape[0]
            progress.update(x.shape[0])
    model.train(was_training)
    total_sum, count_sum = all_sum(torch.stack([nats, nats.new_tensor(float(count))]))
    return total_sum / (max(count_sum, 1.0) * model.num_dims * math.log(2)), int(count_sum)


def periodic_batches(valid: ShardStream, max_batches: int) -> Iterator[torch.Tensor]:
    """This rank's validation share from its start: the first ``max_batches`` (0: all)."""
    valid.load_state_dict({**valid.state_dict(), "consumed": 0})
    for i, batch in enumerate(valid):
        yield batch["images"]
        if max_batches and i + 1 >= max_batches:
            return


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
    desc: str = "evaluate",
) -> Scores:
    """Score ``model`` (eval mode, whatever weights it holds, on its device) on a split, image by
    image; ``desc`` labels the progress bar."""
    model.eval()
    total, split = split_images(manifest_url, options, seed=seed, max_images=max_images)
    keys: list[str] = []
    images: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    devices = {p.device for p in model.parameters()}
    device = devices.pop() if devices else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bar(desc, total) as progress:
        torch.manual_seed(seed)  # the same dequantization noise for every model scored this way
        for batch in split:
            keys += list(batch["keys"])
            images.append(batch["images"])
            if sum(len(x) for x in images) >= batch_size:
                scores.append(_score(model, torch.cat(images), samples, device))
                progress.update(min(len(keys), total) - progress.n)
                images = []
        if images:
            scores.append(_score(model, torch.cat(images), samples, device))
            progress.update(min(len(keys), total) - progress.n)
    bpd = torch.cat(scores).double().cpu().numpy()
    n = max_images or len(keys)
    return Scores(keys[:n], bpd[:n])


def split_images(
    manifest_url: str, options: storage.StorageOptions | None = None, *, seed: int = 0, max_images: int = 0
) -> tuple[int, Iterator[dict]]:
    """The images ``per_image_bpd`` scores, in its order: the number of them, and the stream's
    batches of one image each (``{"images": (1, C, H, W) uint8, "keys": [...], ...}``), the
    shard order from ``seed``, stopping after the first ``max_images`` (0: all)."""
    # batch 1 at the stream level: a plan never drops a remainder; callers re-form batches
    stream = ShardStream(manifest_url, batch_size=1, seed=seed, options=options, shuffle_buffer=1)
    available = sum(stream.counts)
    total = min(max_images, available) if max_images else available

    def batches() -> Iterator[dict]:
        seen = 0
        for batch in stream:
            yield batch
            seen += len(batch["keys"])
            if max_images and seen >= max_images:
                return

    return total, batches()


def _score(model, images: torch.Tensor, samples: int, device) -> torch.Tensor:
    """(B,) bits/dim, left on the device: one copy back at the end, not a sync a batch."""
    x = to_device(images, device, model.config.num_bits)
    log_prob = model.importance_weighted_log_prob(x, samples) if samples > 1 else model.log_prob(x)
    return -log_prob.double() / (model.num_dims * math.log(2))
