"""Sources -> WebDataset tar shards + ``manifest.json``, at any fsspec URL.

Shards are deterministic (same input, same bytes: sorted/seeded order, ``mtime=0``,
fixed owner) and named ``{split}-000000.tar``. Each sample is ``KEY.png`` (or
``KEY.raw``: 12,288 bytes, HWC uint8) plus ``KEY.cls`` for labelled sources.

Re-running with the same inputs and options is idempotent: a shard already at
the destination with the size and sha256 the manifest (or the progress file of
an interrupted run) records is kept, and its images are not re-encoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator import storage
from orchestrator.data.sources import CorruptInputError, Item, decode, iter_items, split_inputs
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "_progress.json"
FORMATS = ("png", "raw")
_MEMBER_OVERHEAD = 1024  # two 512-byte tar headers per member, roughly


@dataclass(frozen=True)
class PrepareOptions:
    source: str
    input: str
    output: str
    split: str = "train"
    format: str = "png"
    image_size: int = 64
    shard_bytes: int = 64 * 2**20
    on_error: str = "raise"
    """``raise``: an unreadable image stops the run, naming the file. ``skip``: counted in the manifest."""
    seed: int = 0
    count: int = 0
    """Images to cut for the ``demo`` source (0: 4096 train / 512 valid)."""
    upload_workers: int = 4
    progress: bool = True


def encode(item: Item, fmt: str, size: int) -> bytes:
    arr = decode(item, size)
    if fmt == "raw":
        return arr.tobytes()
    if item.data is not None and item.data[:8] == b"\x89PNG\r\n\x1a\n" and item.array is None:
        from PIL import Image

        with Image.open(io.BytesIO(item.data)) as im:
            if im.size == (size, size) and im.mode == "RGB":
                return item.data  # already a 64x64 RGB PNG: keep its exact bytes
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def shard_tar(samples: list[tuple[str, bytes, int]], fmt: str) -> bytes:
    """Tar bytes for (key, payload, label) samples; mtime 0 keeps it byte-reproducible."""
    from webdataset import TarWriter

    buf = io.BytesIO()
    with TarWriter(buf, mtime=0, user="flowpp", group="flowpp", encoder=False) as writer:
        for key, payload, label in samples:
            sample = {"__key__": key, fmt: payload}
            if label >= 0:
                sample["cls"] = str(label).encode()
            writer.write(sample)
    return buf.getvalue()


def _fingerprint(opts: PrepareOptions, inputs: list[Path]) -> str:
    parts = [
        opts.source,
        opts.split,
        opts.format,
        opts.image_size,
        opts.shard_bytes,
        opts.on_error,
        opts.seed,
        opts.count,
        [(p.name, p.stat().st_size if p.is_file() else 0) for p in inputs],
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _previous_shards(out: str, fingerprint: str, sopts) -> dict[int, dict]:
    """Shards recorded by an earlier run with identical inputs and options."""
    for name in (MANIFEST, PROGRESS):
        url = storage.join(out, name)
        if storage.object_size(url, sopts) is None:
            continue
        try:
            doc = json.loads(storage.read_bytes(url, sopts))
        except (ValueError, storage.StorageError):
            continue
        if doc.get("fingerprint") == fingerprint:
            return {s["index"]: s for s in doc["shards"]}
    return {}


def _verified(url: str, entry: dict, sopts) -> bool:
    if storage.object_size(url, sopts) != entry["bytes"]:
        return False
    return hashlib.sha256(storage.read_bytes(url, sopts)).hexdigest() == entry["sha256"]


class _Sharder:
    """Groups encoded samples into shards of about ``shard_bytes``."""

    def __init__(self, opts: PrepareOptions):
        self.opts = opts
        self.skipped: list[str] = []
        self.items_seen = 0

    def encoded(self, items: Iterator[Item], skip_until: int) -> Iterator[tuple[int, tuple | None]]:
        for i, item in enumerate(items):
            self.items_seen = i + 1
            if i < skip_until:
                yield i, None  # inside a kept shard: not decoded again
                continue
            try:
                yield i, (item.key, encode(item, self.opts.format, self.opts.image_size), item.label)
            except CorruptInputError as exc:
                if self.opts.on_error == "raise":
                    raise
                log.warning("skipping %s", exc)
                self.skipped.append(str(exc))


def prepare(opts: PrepareOptions, sopts: storage.StorageOptions | None = None) -> dict:
    """Write one split's shards and manifest; returns the manifest."""
    if opts.format not in FORMATS:
        raise UserError(f"format={opts.format!r}: expected one of {FORMATS}")
    if opts.on_error not in ("raise", "skip"):
        raise UserError(f"on_error={opts.on_error!r}: expected 'raise' or 'skip'")
    sopts = sopts or storage.StorageOptions()
    storage.check_bucket(opts.output, sopts)
    inputs = split_inputs(opts.source, Path(opts.input), opts.split) if opts.source != "demo" else []
    fingerprint = _fingerprint(opts, inputs)
    previous = _previous_shards(opts.output, fingerprint, sopts)
    items = iter_items(opts.source, inputs, split=opts.split, count=opts.count, size=opts.image_size, seed=opts.seed)
    started = time.perf_counter()
    shards, kept = _write_shards(opts, sopts, items, previous, fingerprint)
    manifest = {
        "version": 1,
        "fingerprint": fingerprint,
        "split": opts.split,
        "source": {
            "kind": opts.source,
            "inputs": [p.name for p in inputs],
            "dataset": _dataset_name(opts.source),
        },
        "format": opts.format,
        "image_size": opts.image_size,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "skipped": {"count": len(kept["skipped"]), "examples": kept["skipped"][:20]},
        "shards": shards,
    }
    storage.write_bytes(storage.join(opts.output, MANIFEST), json.dumps(manifest, indent=1).encode(), sopts)
    log.info(
        "%s: %d samples in %d shards (%d kept from an earlier run) in %.1fs",
        opts.output,
        manifest["num_samples"],
        len(shards),
        kept["count"],
        time.perf_counter() - started,
    )
    manifest["_kept_shards"] = kept["count"]
    return manifest


def _dataset_name(source: str) -> str:
    return {
        "vdo": "imagenet64-vdo (van den Oord et al. 2016)",
        "npz": "imagenet64-chrabaszcz (Chrabaszcz et al. 2017)",
        "folder": "image folder",
        "demo": "scikit-image photograph patches",
    }[source]


def _write_shards(opts, sopts, items, previous, fingerprint):
    from tqdm import tqdm

    sharder = _Sharder(opts)
    shards: list[dict] = []
    kept = {"count": 0, "skipped": sharder.skipped}
    pending, size, first_item = [], 0, 0
    bar = tqdm(desc=f"prepare {opts.split}", unit="img", disable=not opts.progress)
    pool = ThreadPoolExecutor(max_workers=opts.upload_workers)
    uploads = []

    # Shards kept from an earlier run: verify them up front, then skip their items.
    skip_until, reuse = 0, []
    for idx in sorted(previous):
        entry = previous[idx]
        url = storage.join(opts.output, entry["url"])
        if idx != len(reuse) or not _verified(url, entry, sopts):
            break
        reuse.append(entry)
        skip_until = entry["last_item"] + 1
    shards.extend(reuse)
    kept["count"] = len(reuse)
    first_item = skip_until

    def flush(last_item: int):
        nonlocal pending, size, first_item
        if not pending:
            return
        index = len(shards)
        name = f"{opts.split}-{index:06d}.tar"
        data = shard_tar(pending, opts.format)
        entry = {
            "index": index,
            "url": name,
            "num_samples": len(pending),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "first_item": first_item,
            "last_item": last_item,
        }
        shards.append(entry)
        uploads.append((entry, pool.submit(storage.write_bytes, storage.join(opts.output, name), data, sopts)))
        pending, size, first_item = [], 0, last_item + 1

    try:
        last = skip_until - 1
        for i, sample in sharder.encoded(items, skip_until):
            bar.update(1)
            last = i
            if sample is None:
                continue
            cost = len(sample[1]) + _MEMBER_OVERHEAD * (2 if sample[2] >= 0 else 1)
            if pending and size + cost > opts.shard_bytes:
                flush(i - 1)
                first_item = i
                _save_progress(opts, sopts, reuse, uploads, fingerprint)
            pending.append(sample)
            size += cost
        flush(last)
        for _, f in uploads:
            f.result()
    finally:
        pool.shutdown(wait=True)
        bar.close()
    if not shards:
        raise UserError(f"no images found for split {opts.split!r} in {opts.input or opts.source}")
    return shards, kept


def _save_progress(opts, sopts, reused, uploads, fingerprint) -> None:
    """Record shards whose uploads finished, so an interrupted run can be resumed."""
    done = [entry for entry, f in uploads if f.done() and f.exception() is None]
    doc = {"fingerprint": fingerprint, "shards": sorted(reused + done, key=lambda s: s["index"])}
    storage.write_bytes(storage.join(opts.output, PROGRESS), json.dumps(doc).encode(), sopts)
