"""Loader throughput: ``ShardStream`` vs a plain webdataset pipeline, local disk vs S3.

Run from the repository root (``make setup`` installs the package and the ``test`` extras it
needs, moto and boto3; else prefix ``PYTHONPATH=.``). CPU only, about 3 minutes with the defaults::

    python bench/loader.py [--images 16384] [--shard-mb 4] [--batch-size 64] [--repeats 5]

It cuts ``--images`` 64x64 patches from the ``demo`` source (16,384 by default: with fewer,
the fixed cost of starting DataLoader workers and their S3 sessions each epoch weighs on an
epoch of a fraction of a second, which a real epoch of 1.28 M images never sees), writes them
once per shard format (``png``, ``raw``) to a temporary directory and to a bucket on a moto S3
server it starts on a free loopback port (and stops by pid at the end), then measures
images/s for:

- ``ShardStream``: this project's loader (plan, shuffle, resumable state, fault handling);
- ``webdataset``: ``wds.WebDataset(urls, shardshuffle=False)`` + the same decode (PIL to RGB
  uint8 for png, ``np.frombuffer`` for raw) + ``.batched(B)``, through the same DataLoader
  settings; ``register_webdataset_s3`` lets it read ``s3://`` URLs;
- ``bytes``: every shard read whole, one after the other (local ``open().read()``, S3
  ``orchestrator.core.storage.read_bytes``): the storage ceiling, in samples per second;

each with 0 and 2 DataLoader workers (bytes: none). Every configuration runs one warm-up
epoch, then ``--repeats`` timed epochs, and the best is reported; the ShardStream and
webdataset epochs of a pair alternate, so that drift on the shared cores hits both alike.
The two goals printed after the table are computed from it: S3 reaches >= 85% of local
throughput, and the plan and resume machinery costs <= 5% against plain webdataset over the
same shards.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader

from orchestrator.core import storage
from orchestrator.data.prepare import PrepareOptions, prepare
from orchestrator.data.stream import ShardStream, load_manifest

BUCKET = "flowpp-bench"
FORMATS = ("png", "raw")
WORKERS = (0, 2)
S3_GOAL, OVERHEAD_GOAL = 0.85, 0.05


@dataclass
class Row:
    pipeline: str
    storage: str
    fmt: str
    workers: int | None
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


# -- S3 endpoint ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answered
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"moto server on {endpoint} did not start") from None
            time.sleep(0.2)
    return proc, endpoint


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def create_bucket(endpoint: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)


# -- data ----------------------------------------------------------------------------------
def prepare_shards(out: str, fmt: str, args, sopts) -> str:
    opts = PrepareOptions(
        source="demo",
        input="",
        output=out,
        split="train",
        format=fmt,
        count=args.images,
        shard_bytes=int(args.shard_mb * 2**20),
        progress=False,
    )
    prepare(opts, sopts)
    return storage.join(out, "manifest.json")


# -- pipelines: each runs one epoch and returns the number of images it delivered ----------
def run_stream(stream: ShardStream) -> int:
    return sum(batch["images"].shape[0] for batch in stream)


def _wds_decode(sample: dict, fmt: str, size: int) -> tuple[str, np.ndarray]:
    if fmt == "raw":
        arr = np.frombuffer(sample["raw"], np.uint8).reshape(size, size, 3)
    else:
        from PIL import Image

        with Image.open(io.BytesIO(sample["png"])) as im:
            arr = np.asarray(im.convert("RGB"))
    return sample["__key__"], arr.transpose(2, 0, 1)


def _wds_collate(samples: list) -> dict:
    keys, imgs = zip(*samples, strict=True)
    return {"images": torch.from_numpy(np.stack(imgs)), "keys": list(keys)}


def wds_loader(urls: list[str], fmt: str, size: int, batch_size: int, workers: int):
    import webdataset as wds

    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .map(partial(_wds_decode, fmt=fmt, size=size))
        .batched(batch_size, collation_fn=_wds_collate)
    )
    if workers == 0:
        return ds
    # the same DataLoader settings ShardStream uses
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=2,
        multiprocessing_context="fork",
    )


def run_loader(loader) -> int:
    return sum(batch["images"].shape[0] for batch in loader)


def run_bytes(urls: list[str], samples: int, local: bool, sopts) -> int:
    for url in urls:
        if local:
            with open(url, "rb") as f:
                f.read()
        else:
            storage.read_bytes(url, sopts)
    return samples


# -- measuring -----------------------------------------------------------------------------
def best_time(fn, repeats: int) -> tuple[int, float]:
    """(images, best seconds) over ``repeats`` timed runs after one warm-up run."""
    fn()
    times, images = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        images = fn()
        times.append(time.perf_counter() - t0)
    return images, min(times)


def best_times_interleaved(fns: dict, repeats: int) -> dict[str, tuple[int, float]]:
    """Like ``best_time`` for several pipelines, their timed runs alternating (A B A B ...).

    The two pipelines of a pair are compared with each other: alternating them spreads any
    drift of this shared machine (other processes, the S3 server's own work) over both.
    """
    for fn in fns.values():
        fn()
    best: dict[str, tuple[int, float]] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            images = fn()
            seconds = time.perf_counter() - t0
            if name not in best or seconds < best[name][1]:
                best[name] = (images, seconds)
    return best


def measure_split(name: str, manifest_url: str, fmt: str, args, sopts) -> list[Row]:
    manifest = load_manifest(manifest_url, sopts)
    urls = [s["url"] for s in manifest["shards"]]
    size, total = manifest["image_size"], manifest["num_samples"]
    mib = manifest["total_bytes"] / 2**20
    print(f"measuring {name} {fmt}: {total} images in {len(urls)} shards, {mib:.1f} MiB", flush=True)
    local = name == "local"
    bytes_fn = lambda: run_bytes(urls, total, local, sopts)
    rows = [Row("bytes", name, fmt, None, *best_time(bytes_fn, args.repeats))]
    for workers in WORKERS:
        stream = ShardStream(
            manifest_url,
            batch_size=args.batch_size,
            num_workers=workers,
            shuffle_buffer=1000,
            options=sopts,
            manifest=load_manifest(manifest_url, sopts),
        )
        loader = wds_loader(urls, fmt, size, args.batch_size, workers)
        pipelines = {
            "ShardStream": lambda s=stream: run_stream(s),
            "webdataset": lambda ld=loader: run_loader(ld),
        }
        for pipeline, (images, seconds) in best_times_interleaved(pipelines, args.repeats).items():
            rows.append(Row(pipeline, name, fmt, workers, images, seconds))
            print(f"  {pipeline:12s} {name:5s} {fmt} w={workers}: {rows[-1].rate:8.0f} img/s")
    return rows


# -- reporting -----------------------------------------------------------------------------
def print_table(rows: list[Row]) -> None:
    print("| pipeline | storage | format | workers | images | best ms | images/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        w = "-" if r.workers is None else r.workers
        ms = r.seconds * 1e3
        print(f"| {r.pipeline} | {r.storage} | {r.fmt} | {w} | {r.images} | {ms:.1f} | {r.rate:,.0f} |")


def _rate(rows: list[Row], pipeline: str, where: str, fmt: str, workers: int) -> float:
    (row,) = [r for r in rows if (r.pipeline, r.storage, r.fmt, r.workers) == (pipeline, where, fmt, workers)]
    return row.rate


def print_goals(rows: list[Row]) -> None:
    pairs = [(f, w) for f in FORMATS for w in WORKERS]
    print(f"\nGoal 1: ShardStream from S3 reaches >= {S3_GOAL:.0%} of local-disk throughput")
    ok1 = True
    for f, w in pairs:
        ratio = _rate(rows, "ShardStream", "s3", f, w) / _rate(rows, "ShardStream", "local", f, w)
        ok1 &= ratio >= S3_GOAL
        print(f"- {f}, {w} workers: s3/local = {ratio:.1%} {'met' if ratio >= S3_GOAL else 'NOT met'}")
    print(f"Goal 1: {'MET' if ok1 else 'NOT MET'}")

    print(f"\nGoal 2: ShardStream's plan and resume machinery costs <= {OVERHEAD_GOAL:.0%} vs webdataset")
    ok2 = True
    for where in ("local", "s3"):
        for f, w in pairs:
            # extra time per image relative to plain webdataset
            cost = _rate(rows, "webdataset", where, f, w) / _rate(rows, "ShardStream", where, f, w) - 1
            ok2 &= cost <= OVERHEAD_GOAL
            verdict = "met" if cost <= OVERHEAD_GOAL else "NOT met"
            print(f"- {where}, {f}, {w} workers: overhead = {cost:+.1%} {verdict}")
    print(f"Goal 2: {'MET' if ok2 else 'NOT MET'}")


# -- main ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--images", type=int, default=16384, help="demo train images per format")
    p.add_argument("--shard-mb", type=float, default=4.0, help="target shard size in MiB")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per configuration (best kept)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    started = time.perf_counter()
    proc, endpoint = start_moto()
    rows: list[Row] = []
    try:
        create_bucket(endpoint)
        s3_opts = storage.StorageOptions(endpoint_url=endpoint)
        storage.register_webdataset_s3(s3_opts)
        with tempfile.TemporaryDirectory(prefix="flowpp-bench-") as tmp:
            for fmt in FORMATS:
                for name, base, sopts in (
                    ("local", os.path.join(tmp, fmt), storage.StorageOptions()),
                    ("s3", f"s3://{BUCKET}/{fmt}", s3_opts),
                ):
                    manifest_url = prepare_shards(base, fmt, args, sopts)
                    rows += measure_split(name, manifest_url, fmt, args, sopts)
    finally:
        with contextlib.suppress(Exception):
            stop(proc)
    print(
        f"\n{args.images} demo images, batch {args.batch_size}, shards of ~{args.shard_mb:g} MiB, "
        f"best of {args.repeats} after a warm-up; torch {torch.__version__}, {os.cpu_count()} CPUs\n"
    )
    print_table(rows)
    print_goals(rows)
    print(f"\ntotal wall time {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
