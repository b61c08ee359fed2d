"""Sources -> WebDataset tar shards + ``manifest.json``, at any fsspec URL.

Shards are deterministic (same input, same bytes: hash-ordered, ``mtime=0``, fixed owner).
Each sample is ``KEY.png`` (or ``KEY.raw``: S*S*3 bytes, HWC uint8) plus ``KEY.cls`` for
labelled sources. Two inputs with the same key in one shard are an error naming both.

A re-run never serves stale or half-written data:

- **What makes a shard current** is its ``content`` id: the sha256 over the options that shape
  its bytes and the digest of every input image in it (key, name, label, bytes). A re-run reads
  and hashes every input (no decoding); where a shard of the previous manifest (or of an
  interrupted run's ``_progress.json``) starts, it checks that the same inputs follow and that
  the object still has its size and sha256. Such a shard is kept; everything else (an added,
  removed or changed image) is encoded into new shards.
- **New shards go beside the old ones**: ``{split}-{index:06d}.tar`` where no object has that
  name yet, else ``{split}-{index:06d}-{content[:12]}.tar``. No object a manifest names is
  overwritten, unless it no longer matches that manifest's sha256 anyway.
- **The manifest is published last, in one step**: one PUT on an object store, a temp file and
  ``os.replace`` on a local disk. A run that fails before that leaves the previous manifest and
  every shard it names intact.
- **Old shards are left in place**: a training run that loaded the previous manifest keeps
  reading them. Objects that no manifest names may be deleted by hand once no run uses them.
- **One prepare at a time on an output**: a prepare holds the output's lock (``_prepare.lock``,
  the project's one lease, kept by conditional writes) while it writes; a second one on the same
  output (two jobs whose ``data.prepare`` writes to one prefix) is refused, naming the holder.
  A new shard is created only where no object has its name (a conditional create; another name
  if one appeared meanwhile), and temp files have names of their own, so a manifest names only
  objects its own run wrote or checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from pydantic import ValidationError

from orchestrator.core import lease, progress, storage
from orchestrator.core.errors import UserError
from orchestrator.data.manifest import VERSION, ManifestError, ShardEntry, parse_manifest
from orchestrator.data.sources import (
    DEMO_GREY,
    HOLDOUT,
    CorruptInputError,
    Item,
    SplitInputs,
    Taken,
    decode,
    demo_count,
    demo_plan,
    demo_summary,
    iter_items,
    split_inputs,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "_progress.json"
FORMATS = ("png", "raw")
LAYOUT = 2
"""Bumped whenever the same inputs and options would make other shard bytes: old shards then
no longer count as current."""
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
    flip: bool = False
    """``demo`` only: mirror half of the training patches left to right (validation never)."""
    grey: bool = False
    """``demo`` only: the training split also draws from the grey photographs (``DEMO_GREY``)."""
    upload_workers: int = 4
    progress: bool = True
    whole: bool = False
    """A split-less input (a folder or tar whose name declares no split) goes whole into ``split``,
    instead of being split by a hash of each image's name."""


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


def publish(url: str, data: bytes, sopts: storage.StorageOptions) -> None:
    """Write ``data`` in one step: a reader sees the old object or the new one, never a part."""
    if storage.protocol_of(url) != "file":
        storage.write_bytes(url, data, sopts)  # one PUT: an object store swaps the whole object
        return
    tmp = f"{url}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(tmp, data, sopts)
    os.replace(storage.filesystem(tmp, sopts)[1], storage.filesystem(url, sopts)[1])


def _options_id(opts: PrepareOptions) -> bytes:
    fields = [LAYOUT, opts.source, opts.split, opts.format, opts.image_size, opts.shard_bytes, opts.on_error]
    return json.dumps(fields).encode()


def content_id(options_id: bytes, digests: Iterable[bytes]) -> str:
    h = hashlib.sha256(options_id)
    for d in digests:
        h.update(d)
    return h.hexdigest()


def _read_entries(url: str, sopts) -> list[dict]:
    """Shard entries recorded at ``url`` (a manifest or a progress file); [] if none or unreadable."""
    if storage.object_size(url, sopts) is None:
        return []
    data = storage.read_bytes(url, sopts)
    if url.endswith(MANIFEST):
        try:
            return [s.model_dump(exclude_none=True) for s in parse_manifest(data, url).shards]
        except ManifestError as exc:
            log.warning("ignoring the previous manifest: %s", exc)
            return []
    try:
        entries = [ShardEntry.model_validate(e) for e in json.loads(data)["shards"]]
    except (ValueError, KeyError, TypeError, ValidationError):
        return []
    return [e.model_dump(exclude_none=True) for e in entries]


def previous_shards(out: str, sopts) -> dict[str, list[dict]]:
    """Content-addressed shards of earlier runs at ``out``, by the digest of their first input."""
    by_head: dict[str, list[dict]] = {}
    seen = set()
    for name in (MANIFEST, PROGRESS):
        for e in _read_entries(storage.join(out, name), sopts):
            plain = "/" not in e["url"] and "://" not in e["url"]
            if plain and "content" in e and "head" in e and "num_inputs" in e and e["url"] not in seen:
                seen.add(e["url"])
                by_head.setdefault(e["head"], []).append(e)
    return by_head


def _verified(url: str, entry: dict, sopts) -> bool:
    if storage.object_size(url, sopts) != entry["bytes"]:
        return False
    return hashlib.sha256(storage.read_bytes(url, sopts)).hexdigest() == entry["sha256"]


class _Lookahead:
    """The item stream with a window: (item, digest) pairs, digested once."""

    def __init__(self, items: Iterator[Item]):
        self._items = items
        self._buf: deque[tuple[Item, bytes]] = deque()

    def peek(self, n: int) -> list[tuple[Item, bytes]]:
        while len(self._buf) < n:
            item = next(self._items, None)
            if item is None:
                break
            self._buf.append((item, item.digest()))
        return list(islice(self._buf, n))

    def pop(self, n: int) -> None:
        for _ in range(n):
            self._buf.popleft()


class _Builder:
    """Walks the inputs once: keeps current shards, encodes the rest into new ones."""

    def __init__(self, opts: PrepareOptions, sopts, previous: dict[str, list[dict]], pool, bar):
        self.opts, self.sopts, self.previous, self.pool, self.bar = opts, sopts, previous, pool, bar
        self.options_id = _options_id(opts)
        self.shards: list[dict] = []
        self.kept = 0
        self.skipped: list[str] = []
        self.uploads: list[tuple[dict, Future]] = []
        self._reset()

    def _reset(self) -> None:
        self.samples: list[tuple[str, bytes, int]] = []
        self.digests: list[bytes] = []
        self.refs: dict[str, str] = {}
        self.size = 0

    def run(self, items: Iterator[Item]) -> None:
        ahead = _Lookahead(items)
        while window := ahead.peek(1):
            item, digest = window[0]
            if self._keep(ahead, digest):
                continue
            ahead.pop(1)
            self._add(item, digest)
        self._flush()

    def _keep(self, ahead: _Lookahead, digest: bytes) -> bool:
        """Keep an earlier shard that starts here, if the same inputs follow and it is intact."""
        for entry in self.previous.get(digest.hex(), ()):
            n = entry["num_inputs"]
            window = ahead.peek(n)
            if len(window) < n or content_id(self.options_id, (d for _, d in window)) != entry["content"]:
                continue
            if not _verified(storage.join(self.opts.output, entry["url"]), entry, self.sopts):
                continue
            self._flush()
            self.shards.append({**entry, "index": len(self.shards)})
            self.kept += 1
            ahead.pop(n)
            self.bar.update(n)
            self._save_progress()
            return True
        return False

    def _add(self, item: Item, digest: bytes) -> None:
        self.bar.update(1)
        try:
            payload = encode(item, self.opts.format, self.opts.image_size)
        except CorruptInputError as exc:
            if self.opts.on_error == "raise":
                raise
            log.warning("skipping %s", exc)
            self.skipped.append(str(exc))
            self.digests.append(digest)
            return
        cost = len(payload) + _MEMBER_OVERHEAD * (2 if item.label >= 0 else 1)
        if self.samples and self.size + cost > self.opts.shard_bytes:
            self._flush()
        if item.key in self.refs:
            raise UserError(f"two inputs have the sample key {item.key!r}: {self.refs[item.key]} and {item.ref}")
        self.samples.append((item.key, payload, item.label))
        self.digests.append(digest)
        self.refs[item.key] = item.ref
        self.size += cost

    def _name(self, index: int, content: str) -> str:
        """A name no object has yet (or one whose object no longer matches what named it)."""
        plain = f"{self.opts.split}-{index:06d}.tar"
        if storage.object_size(storage.join(self.opts.output, plain), self.sopts) is None:
            return plain
        return f"{self.opts.split}-{index:06d}-{content[:12]}.tar"

    def _flush(self) -> None:
        if not self.samples:  # nothing, or only skipped inputs: no shard
            self._reset()
            return
        data = shard_tar(self.samples, self.opts.format)
        content = content_id(self.options_id, self.digests)
        index = len(self.shards)
        name = self._name(index, content)
        entry = {
            "index": index,
            "url": name,
            "num_samples": len(self.samples),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "num_inputs": len(self.digests),
            "content": content,
            "head": self.digests[0].hex(),
        }
        self.shards.append(entry)
        self.uploads.append((entry, self.pool.submit(self._upload, entry, data)))
        self._reset()
        self._save_progress()

    def _upload(self, entry: dict, data: bytes) -> None:
        """Create the shard where no object has its name; if one appeared since the name was
        chosen (a writer without the lock), under its content name instead, which holds these
        very bytes wherever it exists (shards are deterministic)."""
        try:
            storage.create_exclusive(storage.join(self.opts.output, entry["url"]), data, self.sopts)
        except storage.PreconditionFailed:
            entry["url"] = f"{self.opts.split}-{entry['index']:06d}-{entry['content'][:12]}.tar"
            storage.write_bytes(storage.join(self.opts.output, entry["url"]), data, self.sopts)

    def _save_progress(self) -> None:
        """Record the shards that are in place, so that an interrupted run's work is kept."""
        pending = {id(e) for e, f in self.uploads if not f.done() or f.exception() is not None}
        done = [e for e in self.shards if id(e) not in pending]
        doc = json.dumps({"version": VERSION, "shards": done}).encode()
        publish(storage.join(self.opts.output, PROGRESS), doc, self.sopts)


def _build(opts: PrepareOptions, sopts, items: Iterator[Item]) -> _Builder:
    from tqdm import tqdm

    # the CLI's --progress, FLOWPP_PROGRESS and TQDM_DISABLE choose, as for every other bar
    bar = progress.bar(f"prepare {opts.split}") if opts.progress else tqdm(disable=True)
    pool = ThreadPoolExecutor(max_workers=opts.upload_workers)
    builder = _Builder(opts, sopts, previous_shards(opts.output, sopts), pool, bar)
    try:
        builder.run(items)
        for _, f in builder.uploads:
            f.result()
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return builder


def _check_options(opts: PrepareOptions) -> None:
    if opts.format not in FORMATS:
        raise UserError(f"format={opts.format!r}: expected one of {FORMATS}")
    if opts.on_error not in ("raise", "skip"):
        raise UserError(f"on_error={opts.on_error!r}: expected 'raise' or 'skip'")
    if opts.split not in ("train", "valid"):
        raise UserError(f"split={opts.split!r}: expected 'train' or 'valid'")


LOCK = "_prepare.lock"
LOCK_STALE_S = 60.0


class OutputBusyError(UserError):
    """Another prepare holds the output's lock; the message names it."""


@contextmanager
def output_lock(output: str, sopts: storage.StorageOptions) -> Iterator[None]:
    """The output's lock for one prepare (renewed while it runs, taken over 60 s after its holder
    stopped renewing); ``OutputBusyError`` while another prepare holds it."""
    atomic = storage.honours_conditions(output, sopts)
    if not atomic:
        log.warning("%s: the store ignores conditional writes; the prepare lock falls back to write, settle and "
                    "read back", output)  # fmt: skip
    store = lease.JsonStore(storage.join(output, LOCK), sopts, LOCK_STALE_S, atomic=atomic)
    try:
        held = lease.acquire(store, LOCK_STALE_S, beat_s=LOCK_STALE_S / 6)
    except lease.LeaseHeld as busy:
        who = busy.holder.owner if busy.holder else "another prepare"
        raise OutputBusyError(
            f"{output}: another prepare is writing there ({who}, lock {store.where}); wait for it to finish, or "
            f"give this one an output of its own (a lock not renewed for {LOCK_STALE_S:.0f} s is taken over)"
        ) from None
    with held:
        yield


def prepare(opts: PrepareOptions, sopts: storage.StorageOptions | None = None) -> dict:
    """Write one split's shards, then publish its manifest; returns the manifest."""
    _check_options(opts)
    sopts = sopts or storage.StorageOptions()
    storage.check_bucket(opts.output, sopts)
    inputs = SplitInputs([])
    if opts.source != "demo":
        inputs = split_inputs(opts.source, Path(opts.input), opts.split, whole=opts.whole)
    taken = Taken()
    items = iter_items(
        opts.source,
        inputs.paths,
        split=opts.split,
        count=opts.count,
        size=opts.image_size,
        seed=opts.seed,
        holdout=inputs.holdout,
        flip=_demo_flip(opts),
        grey=opts.grey,
        taken=taken,
    )
    started = time.perf_counter()
    with output_lock(opts.output, sopts):
        builder = _build(opts, sopts, items)
        if not builder.shards:
            raise UserError(f"no images found for split {opts.split!r} in {opts.input or opts.source}")
        manifest = _manifest(opts, inputs, builder, taken)
        url = storage.join(opts.output, MANIFEST)
        data = json.dumps(manifest, indent=1).encode()
        parse_manifest(data, url)  # what is published loads
        publish(url, data, sopts)
    log.info(
        "%s: %d samples in %d shards (%d kept from an earlier run) in %.1fs",
        opts.output,
        manifest["num_samples"],
        len(builder.shards),
        builder.kept,
        time.perf_counter() - started,
    )
    manifest["_kept_shards"] = builder.kept
    return manifest


def _manifest(opts: PrepareOptions, inputs: SplitInputs, builder: _Builder, taken: Taken) -> dict:
    shards = builder.shards
    source: dict = {"kind": opts.source, "inputs": [p.name for p in inputs.paths], "dataset": _dataset_name(opts)}
    if inputs.holdout:
        source["holdout"] = HOLDOUT
        source["holdout_taken"] = [taken.taken, taken.seen]
    if opts.source == "demo":
        plan = demo_plan(
            opts.split, demo_count(opts.split, opts.count), opts.image_size, opts.seed, _demo_flip(opts), opts.grey
        )
        source["demo"] = demo_summary(opts.split, plan)
    return {
        "version": VERSION,
        "fingerprint": content_id(builder.options_id, (bytes.fromhex(s["content"]) for s in shards))[:16],
        "split": opts.split,
        "source": source,
        "format": opts.format,
        "image_size": opts.image_size,
        "channels": 3,
        "bits": 8,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "skipped": {"count": len(builder.skipped), "examples": builder.skipped[:20]},
        "shards": shards,
    }


def settings_differ(opts: PrepareOptions, manifest: dict) -> list[str]:
    """How the data set ``manifest`` describes differs from what ``opts`` would prepare (the
    settings a job's ``data.prepare*`` fields give): "count 2048, not 16384", ...; empty when alike."""
    source, diffs = manifest.get("source", {}), []
    if source.get("kind") != opts.source:
        return [f"source {source.get('kind')}, not {opts.source}"]
    if manifest.get("image_size") != opts.image_size:
        diffs.append(f"image size {manifest.get('image_size')}, not {opts.image_size}")
    if opts.source == "demo":
        want = demo_count(opts.split, opts.count)
        if manifest.get("num_samples") != want:
            diffs.append(f"count {manifest.get('num_samples')}, not {want}")
        demo = source.get("demo") or {}
        if bool(demo.get("flipped")) != _demo_flip(opts):
            diffs.append(f"flip {'on' if demo.get('flipped') else 'off'}, not {'on' if _demo_flip(opts) else 'off'}")
        grey = any(p in DEMO_GREY for p in demo.get("photos", {}))
        if grey != (opts.grey and opts.split == "train"):
            diffs.append(f"grey photographs {'in' if grey else 'out'}, not {'out' if grey else 'in'}")
    return diffs


def _demo_flip(opts: PrepareOptions) -> bool:
    return opts.flip and opts.split == "train"


def _dataset_name(opts: PrepareOptions) -> str:
    return {
        "vdo": "imagenet64-vdo (van den Oord et al. 2016)",
        "npz": "imagenet64-chrabaszcz (Chrabaszcz et al. 2017)",
        "folder": "image folder",
        "demo": "scikit-image photograph patches",
    }[opts.source]
