"""The local stack's S3 endpoint: moto's server on loopback, with its objects kept on disk.

moto holds objects in memory only, so a stopped stack used to lose its bucket while MLflow's
sqlite store kept pointing into it. This wrapper restores ``DIR`` into moto before the port
opens, writes every object back to ``DIR`` every ``--snapshot-s`` seconds (so a crash or a SIGKILL
loses at most that much), and once more when it gets SIGTERM or SIGINT (``infra/local/down`` sends
SIGTERM), then exits.

Layout of ``DIR``: ``<bucket>/index.json`` ({key: {"file", "etag", "content_type"}}) and one
``<bucket>/<sha256(key)>.obj`` per object. A dump goes to ``DIR.new`` and replaces ``DIR`` by
rename; unchanged objects (same ETag) are hard-linked from the previous dump, not copied.

    python infra/local/s3server.py --port 9310 --dir runs/local/s3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

HOST = "127.0.0.1"


def _client(port: int):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=f"http://{HOST}:{port}",
        region_name="us-east-1",
        aws_access_key_id="flowpp-local",
        aws_secret_access_key="flowpp-local-secret",
    )


def _index(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def restore(root: Path, port: int) -> int:
    """Every bucket and object under ``root`` into the server at ``port``; returns the object count."""
    s3, count = _client(port), 0
    old = root.with_name(root.name + ".old")
    if not root.is_dir() and old.is_dir():  # killed between a dump's two renames
        old.rename(root)
    if not root.is_dir():
        return 0
    for bucket_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        s3.create_bucket(Bucket=bucket_dir.name)
        for key, entry in _index(bucket_dir / "index.json").items():
            body = (bucket_dir / entry["file"]).read_bytes()
            s3.put_object(Bucket=bucket_dir.name, Key=key, Body=body, ContentType=entry["content_type"])
            count += 1
    return count


def dump(root: Path, port: int) -> int:
    """Every bucket and object of the server at ``port`` into ``root``; returns the object count."""
    s3, count = _client(port), 0
    new = root.with_name(root.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    for bucket in s3.list_buckets().get("Buckets", []):
        name = bucket["Name"]
        old_dir, new_dir = root / name, new / name
        new_dir.mkdir()
        old_index, index = _index(old_dir / "index.json"), {}
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=name)
        for obj in (o for page in pages for o in page.get("Contents", [])):
            key, etag = obj["Key"], obj["ETag"]
            file = hashlib.sha256(key.encode()).hexdigest() + ".obj"
            previous = old_index.get(key)
            if previous and previous["etag"] == etag and (old_dir / previous["file"]).is_file():
                os.link(old_dir / previous["file"], new_dir / file)
                content_type = previous["content_type"]
            else:
                got = s3.get_object(Bucket=name, Key=key)
                (new_dir / file).write_bytes(got["Body"].read())
                content_type = got.get("ContentType", "binary/octet-stream")
            index[key] = {"file": file, "etag": etag, "content_type": content_type}
            count += 1
        (new_dir / "index.json").write_text(json.dumps(index))
    old = root.with_name(root.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if root.exists():
        root.rename(old)
    new.rename(root)
    shutil.rmtree(old, ignore_errors=True)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="where the objects are kept between runs")
    parser.add_argument("--snapshot-s", type=float, default=120.0, help="seconds between dumps (default 120)")
    args = parser.parse_args(argv)
    from moto.server import ThreadedMotoServer

    # Restore through a server on a port of its own: moto's backends are this process's, so the
    # real port opens with the data already in place (infra/local/up waits for that port). The real
    # port is held (bound, not listening) meanwhile: else the kernel may hand that very port to the
    # loader, and a client waiting for it would talk to a half-restored store.
    with socket.socket() as hold:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself will
        hold.bind((HOST, args.port))
        loader = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
        loader.start()
        restored = restore(args.dir, loader.get_host_and_port()[1])
        loader.stop()
    server = ThreadedMotoServer(ip_address=HOST, port=args.port, verbose=False)
    server.start()
    print(f"s3: http://{HOST}:{args.port}, {restored} objects restored from {args.dir}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(args.snapshot_s):
        try:
            dump(args.dir, args.port)
        except Exception as exc:  # a snapshot that failed is retried at the next; the last one stays
            print(f"s3: snapshot failed ({type(exc).__name__}: {exc}); keeping the previous one", flush=True)
    kept = dump(args.dir, args.port)
    server.stop()
    print(f"s3: {kept} objects kept in {args.dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
