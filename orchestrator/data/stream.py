"""Shards -> uint8 batches for one rank: deterministic, resumable, robust.

``ShardStream(manifest_url, rank=, world_size=, batch_size=, ...)`` iterates one
epoch of batches ``{"images": (B, 3, S, S) uint8, "labels": (B,), "keys": [...]}``
through a DataLoader with workers, and can be checkpointed mid-epoch with
``state_dict()`` / ``load_state_dict()`` (see ``plan.py`` for the layout).

Faults never change the number of batches a rank yields (which would hang DDP):
- a sample that fails to decode is replaced by the worker's previous good image,
  counted, and logged with shard and key;
- a truncated tar: the rest of that shard is treated the same way, with one warning;
- a sha256 mismatch or a sample count other than the manifest's (``verify=True``), a
  missing object or bucket, or a transient storage error that outlasts its retries raises
  an error naming the URL.

Manifests are validated on load (orchestrator/data/manifest.py).
"""

from __future__ import annotations

import gc
import hashlib
import io
import logging
import tarfile
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orchestrator.core import storage
from orchestrator.core.errors import FlowppError
from orchestrator.core.redact import printable
from orchestrator.data.manifest import ManifestError, load_manifest
from orchestrator.data.plan import Plan, job_strands

if TYPE_CHECKING:
    from orchestrator.config import JobSpec

__all__ = ["ManifestError", "ShardIntegrityError", "ShardStream", "load_manifest", "to_device"]

log = logging.getLogger(__name__)

STATS = ("corrupt_samples", "truncated_samples", "truncated_shards", "shards_read")


class ShardIntegrityError(FlowppError, RuntimeError):
    """A shard whose bytes do not match its manifest's sha256."""


class NoDecodableSampleError(FlowppError, RuntimeError):
    """A reader's first batch holds no sample it can decode: nothing to substitute the corrupt ones with."""


def to_device(images: torch.Tensor, device: torch.device | str, num_bits: int = 8) -> torch.Tensor:
    """A stream's uint8 pixels (B, C, H, W) on ``device``, reduced to ``num_bits`` levels.

    They travel as uint8 (an eighth of int64's bytes; asynchronously from pinned memory),
    and stay uint8 on the device: the model takes any integer dtype. A 5-bit model sees
    ``x >> 3`` = floor(x / 8), as the official 5-bit launcher feeds it.
    """
    if not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits must be in 1..8, got {num_bits}")
    x = images.to(device, non_blocking=True)
    return x >> (8 - num_bits) if num_bits < 8 else x


def parse_shard(data: bytes, url: str) -> tuple[list[tuple[str, dict]], bool]:
    """[(key, {ext: bytes})] in tar order, and whether the tar ended early."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    samples: list[tuple[str, dict]] = []
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(io.BytesIO(data)))
        for sample in group_by_keys(files):
            samples.append((sample["__key__"], sample))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        log.warning(
            "%s: truncated or unreadable after %d samples (%s); skipping the rest of the shard",
            printable(url),
            len(samples),
            type(exc).__name__,
        )
        # the last group may be incomplete: drop it
        return samples[:-1] if samples else samples, True
    return samples, False


def raw_payload(sample: dict, size: int) -> bytes:
    """A raw sample's S*S*3 bytes (HWC); raises ValueError on any other length."""
    buf = sample.get("raw")
    if buf is None or len(buf) != 3 * size * size:
        raise ValueError(f"raw payload of {0 if buf is None else len(buf)} bytes")
    return buf


def decode_image(sample: dict, fmt: str, size: int) -> np.ndarray:
    """(3, S, S) uint8; raises ValueError on anything but an 8-bit RGB PNG of exactly the
    manifest's size. The header is checked before any pixel is decoded: a 20 KB PNG that claims
    13000x13000 pixels costs nothing, and no other format (EPS would run Ghostscript) is opened."""
    if fmt == "raw":
        return np.frombuffer(raw_payload(sample, size), np.uint8).reshape(size, size, 3).transpose(2, 0, 1)
    from PIL import Image

    with Image.open(io.BytesIO(sample["png"]), formats=["PNG"]) as im:
        if im.size != (size, size):
            raise ValueError(f"image of {im.size[0]}x{im.size[1]} pixels, not the manifest's {size}x{size}")
        if im.mode != "RGB":
            raise ValueError(f"{im.mode} pixels, not the 8-bit RGB that prepare writes")
        arr = np.asarray(im)
    return arr.transpose(2, 0, 1)


class _WorkerReader:
    """Reads one (rank, worker)'s strands and yields its part of each step's batch, from step
    ``skip`` on (nothing when the rank has fewer strands than loader workers)."""

    def __init__(self, manifest, plan: Plan, rank, worker, skip, verify, options):
        self.manifest, self.plan, self.rank, self.worker = manifest, plan, rank, worker
        self.skip, self.verify, self.options = skip, verify, options
        self.fmt, self.size = manifest["format"], manifest["image_size"]
        self.stats: Counter[str] = Counter()
        self._cache: dict[int, tuple[list, bool]] = {}  # shard -> parsed: one a strand in reading, and the next
        self._strands = len(plan.worker_strands(rank, worker))
        self._last_good: np.ndarray | bytes | None = None  # an image, or a raw payload
        self._next: dict[int, int] = {}  # shard -> the shard this reader needs after it
        self._ahead: tuple[int, Future] | None = None
        self._pool: ThreadPoolExecutor | None = None
        # Local files come from the page cache or the disk in a fraction of the decode time: a
        # prefetch thread would only contend for the GIL (measured by bench/loader.py).
        shards = manifest["shards"]
        self._prefetch = bool(shards) and storage.protocol_of(shards[0]["url"]) != "file"

    def _fetch(self, idx: int) -> bytes:
        entry = self.manifest["shards"][idx]
        data = storage.read_bytes(entry["url"], self.options)
        if self.verify:
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"]:
                raise ShardIntegrityError(
                    f"{printable(entry['url'])}: sha256 {digest[:16]}... does not match the manifest's "
                    f"{entry['sha256'][:16]}...; the shard changed or is corrupt"
                )
        return data

    def _fetch_ahead(self, idx: int) -> bytes:
        """This shard's bytes, and the next shard's fetch started in the background.

        One shard ahead, for remote storage: the object store's latency and the decoding of
        the current shard overlap, for at most one extra shard in memory. A failed prefetch
        raises here, when its shard is needed, with the same error a direct read would give.
        """
        ahead, self._ahead = self._ahead, None
        data = ahead[1].result() if ahead and ahead[0] == idx else self._fetch(idx)
        nxt = self._next.get(idx)
        if nxt is not None and self._prefetch:
            if self._pool is None:  # created lazily: inside the DataLoader worker, after the fork
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
            self._ahead = (nxt, self._pool.submit(self._fetch, nxt))
        return data

    def _shard(self, idx: int):
        if idx not in self._cache:
            entry = self.manifest["shards"][idx]
            data = self._fetch_ahead(idx)
            samples, truncated = parse_shard(data, entry["url"])
            if self.verify and len(samples) != entry["num_samples"]:
                raise ShardIntegrityError(
                    f"{printable(entry['url'])}: holds {len(samples)} samples, but its manifest's "
                    f"shards.{idx}.num_samples is {entry['num_samples']}"
                )
            if not truncated and len(samples) < entry["num_samples"]:
                log.warning(
                    "%s: truncated: %d of %d samples; skipping the rest of the shard",
                    printable(entry["url"]),
                    len(samples),
                    entry["num_samples"],
                )
                truncated = True
            self.stats["shards_read"] += 1
            if truncated:
                self.stats["truncated_shards"] += 1
            if len(self._cache) > self._strands:  # a worker reads its strands side by side
                del self._cache[next(iter(self._cache))]
            self._cache[idx] = (samples, truncated)
        self._cache[idx] = self._cache.pop(idx)  # the most recently used last
        return self._cache[idx]

    def _sample(self, shard_idx: int, offset: int):
        """(key, image or None if unusable, label). Raw images come as their payload bytes,
        decoded a batch at a time by ``_images``."""
        samples, _ = self._shard(shard_idx)
        if offset >= len(samples):
            self.stats["truncated_samples"] += 1
            return f"{self.manifest['shards'][shard_idx]['url']}#{offset}", None, -1
        key, sample = samples[offset]
        try:
            img = raw_payload(sample, self.size) if self.fmt == "raw" else decode_image(sample, self.fmt, self.size)
            label = int(sample["cls"]) if "cls" in sample else -1  # a label that is no integer: corrupt too
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt sample
            url = printable(self.manifest["shards"][shard_idx]["url"])
            log.warning("corrupt sample %s in %s (%s); substituting the previous image", printable(key), url, exc)
            self.stats["corrupt_samples"] += 1
            return key, None, -1
        return key, img, label

    def batches(self):
        b = self._strands * self.plan.strand_batch
        if b == 0:
            return
        order = self.plan.worker_order(self.rank, self.worker, self.skip)
        shards = list(dict.fromkeys(shard for shard, _ in order))
        self._next = dict(zip(shards, shards[1:], strict=False))
        try:
            yield from self._batches(order, b)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool, self._ahead = None, None

    def _images(self, imgs: list) -> torch.Tensor:
        """(B, 3, S, S) uint8 from decoded images, or from raw payloads in one go."""
        if self.fmt != "raw":
            return torch.from_numpy(np.stack(imgs))
        hwc = np.frombuffer(b"".join(imgs), np.uint8).reshape(len(imgs), self.size, self.size, 3)
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))

    def _batches(self, order, b):
        for n in range(0, len(order), b):
            keys, imgs, labels = [], [], []
            for shard_idx, offset in order[n : n + b]:
                key, img, label = self._sample(shard_idx, offset)
                if img is not None:
                    self._last_good = img
                keys.append(key)
                imgs.append(img)
                labels.append(label)
            if self._last_good is None:
                urls = sorted({printable(self.manifest["shards"][shard]["url"]) for shard, _ in order[n : n + b]})
                raise NoDecodableSampleError(
                    f"{', '.join(urls)}: no sample of the first batch of rank {self.rank} (loader worker "
                    f"{self.worker}) decodes, so there is none to stand in for the corrupt ones; the shards are "
                    "damaged: run flowpp prepare again"
                )
            imgs = [self._last_good if im is None else im for im in imgs]
            yield {
                "images": self._images(imgs),
                "labels": labels,  # a list: one shared-memory tensor per batch is cheaper to ship
                "keys": keys,
                "worker": self.worker,
                "index": self.skip + n // b,
                "stats": dict(self.stats),
            }


class _ShardDataset(IterableDataset):
    def __init__(self, manifest, plan_dict, rank, skip, verify, options):
        self.manifest, self.plan_dict, self.rank = manifest, plan_dict, rank
        self.skip, self.verify, self.options = skip, verify, options

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        if info is not None:
            # A forked worker inherits the parent's heap (torch, Ray, MLflow: ~10^5 objects). Out
            # of the collector's sight, a full collection no longer walks them all (tens of ms
            # each, and a copy-on-write fault on every page it touches).
            gc.freeze()
        plan = Plan.from_dict([s["num_samples"] for s in self.manifest["shards"]], self.plan_dict)
        reader = _WorkerReader(self.manifest, plan, self.rank, worker, self.skip, self.verify, self.options)
        yield from reader.batches()


class ShardStream:
    """One rank's view of a sharded split. Iterate it for the rest of the current epoch."""

    def __init__(
        self,
        manifest_url: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        verify: bool = False,
        options: storage.StorageOptions | None = None,
        manifest: dict | None = None,
        pin_memory: bool = False,
        allow_external: bool = False,
        strands: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError("batch_size and shuffle_buffer must be >= 1")
        self.options = options or storage.StorageOptions()
        self.manifest = manifest or load_manifest(manifest_url, self.options, allow_external)
        self.manifest_url = manifest_url
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_workers, self.shuffle_buffer, self.verify = num_workers, shuffle_buffer, verify
        self.pin_memory = pin_memory
        """Batches in page-locked memory, for ``to_device``'s asynchronous copy to a GPU."""
        self.strands = strands
        """The epoch's strands (``plan.py``): the same at every world size the job may run at, so
        that a step holds the same images at each (0: one a loader worker of every rank)."""
        self.counts = [s["num_samples"] for s in self.manifest["shards"]]
        self.plan = self._new_plan(seed, epoch)
        self.consumed = 0
        self.stats: Counter = Counter()
        if self.plan.num_batches == 0:
            raise ValueError(
                f"{manifest_url}: {self.plan.total} samples cannot give {world_size} ranks a batch of {batch_size} each"
            )

    def _new_plan(self, seed, epoch, **kw) -> Plan:
        return Plan(
            self.counts,
            seed,
            epoch,
            self.world_size,
            self.batch_size,
            self.num_workers,
            self.shuffle_buffer,
            strands=self.strands,
            **kw,
        )

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.plan.num_batches - self.consumed

    def _loader_batches(self, skip):
        if self.num_workers == 0:
            reader = _WorkerReader(self.manifest, self.plan, self.rank, 0, skip, self.verify, self.options)
            for batch in reader.batches():
                yield {**batch, "images": batch["images"].pin_memory()} if self.pin_memory else batch
            return
        ds = _ShardDataset(self.manifest, self.plan.to_dict(), self.rank, skip, self.verify, self.options)
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=2,
            multiprocessing_context="fork",
            pin_memory=self.pin_memory,  # in the loader's own thread, off the training step's path
            # Each new iterator draws its workers' base seed from this generator, not from torch's
            # global one: a run resumed mid-epoch starts one more iterator than a run that never
            # stopped, and a draw there would shift every later dequantization noise (the workers
            # draw nothing random: the plan fixes the order)
            generator=torch.Generator().manual_seed(0),
        )
        yield from loader

    def __iter__(self):
        """A step's batch: each reading worker's part of it, in worker order (its strands')."""
        workers = [w for w in range(max(1, self.num_workers)) if self.plan.worker_strands(self.rank, w)]
        waiting: dict[tuple[int, int], dict] = {}
        last_stats: dict[int, dict] = {}
        source = self._loader_batches(self.consumed)
        while self.consumed < self.plan.num_batches:
            parts = []
            for want in ((w, self.consumed) for w in workers):
                while want not in waiting:
                    batch = next(source)
                    waiting[(batch["worker"], batch["index"])] = batch
                parts.append(waiting.pop(want))
                self._account(parts[-1], last_stats)
            self.consumed += 1
            one = len(parts) == 1
            yield {
                "images": parts[0]["images"] if one else torch.cat([p["images"] for p in parts]),
                "labels": torch.tensor([label for p in parts for label in p["labels"]], dtype=torch.int64),
                "keys": [k for p in parts for k in p["keys"]],
            }
        self._next_epoch()

    def _account(self, batch, last_stats) -> None:
        prev = last_stats.get(batch["worker"], {})
        for k, v in batch["stats"].items():
            self.stats[k] += v - prev.get(k, 0)
        last_stats[batch["worker"]] = batch["stats"]

    def _next_epoch(self) -> None:
        self.stats["dropped_samples"] += self.plan.dropped + self.plan.dropped_now
        self.plan = self._new_plan(self.plan.seed, self.plan.epoch + 1)
        self.consumed = 0

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Identical on every rank (ranks move in lockstep): rank 0's copy is enough."""
        return {
            "version": 2,
            "plan": self.plan.to_dict(),
            "consumed": self.consumed,
            "stats": dict(self.stats),
            "num_samples": sum(self.counts),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples") != sum(self.counts):
            raise ValueError(
                f"stream state is for {state.get('num_samples')} samples, "
                f"but {self.manifest_url} has {sum(self.counts)}"
            )
        saved = Plan.from_dict(self.counts, state["plan"])
        here = (self.plan.strands, self.plan.strand_batch, self.shuffle_buffer)
        if isinstance(saved, Plan) and (saved.strands, saved.strand_batch, saved.shuffle_buffer) == here:
            # the same strands and steps on this world size and worker count: the epoch reads on
            self.plan = saved.relaid(world_size=self.world_size, batch_size=self.batch_size,
                                     num_workers=self.num_workers)  # fmt: skip
            self.consumed = state["consumed"]
        else:
            self.plan = saved.replan(
                state["consumed"],
                world_size=self.world_size,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                shuffle_buffer=self.shuffle_buffer,
                strands=self.strands,
            )
            self.consumed = 0
            log.info(
                "re-planned epoch %d for %d ranks: %d samples left, %d dropped (< one global batch)",
                self.plan.epoch,
                self.world_size,
                self.plan.total,
                self.plan.dropped_now,
            )
        self.stats = Counter(state.get("stats", {}))


def _default_batch(spec: JobSpec, train: bool, world: int) -> int:
    """A worker's share of the global batch to train on; a micro-batch to evaluate on (no gradients
    to add up: the memory bound alone)."""
    plan = spec.batching(world)
    return plan.per_worker if train else plan.micro


def for_job(spec: JobSpec, split: Literal["train", "valid"], *, rank: int = 0, world: int = 1,
            batch_size: int | None = None, seed: int | None = None, shuffle_buffer: int | None = None,
            num_workers: int | None = None, pin_memory: bool = False,
            manifest: dict | None = None) -> ShardStream:  # fmt: skip
    """The one place a job's ``ShardStream`` is built: ``split`` of ``spec.data`` for ``rank`` of
    ``world``, with the job's storage options, checksum choice and seed.

    Defaults by split: the training split at a worker's share of the global batch at ``world``
    workers, loader workers and shuffle buffer, in strands that every world size of the job's
    range shares (a step trains on the same images at each); the validation split at the
    micro-batch, in order (no shuffle, no loader workers).
    """
    train = split == "train"
    workers = (spec.data.num_workers if train else 0) if num_workers is None else num_workers
    # the training split's strands are the same at every world size of the job's range (a batch
    # other than a worker's share of the global one has the default layout)
    strands = job_strands(spec) if train and batch_size is None else 0
    return ShardStream(
        spec.data.train if train else spec.data.valid,
        batch_size=_default_batch(spec, train, world) if batch_size is None else batch_size,
        rank=rank,
        world_size=world,
        seed=spec.train.seed if seed is None else seed,
        num_workers=workers,
        shuffle_buffer=(spec.data.shuffle_buffer if train else 1) if shuffle_buffer is None else shuffle_buffer,
        verify=spec.data.verify,
        options=spec.storage.options(),
        manifest=manifest,
        pin_memory=pin_memory,
        allow_external=spec.data.allow_external_shards,
        strands=strands,
    )
