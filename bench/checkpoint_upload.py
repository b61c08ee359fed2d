"""What a slow object store costs the training step, with checkpoints uploaded synchronously and in
the background (``train.async_uploads``).

    python bench/checkpoint_upload.py [--delay-s 0.3] [--steps 80] [--every 40] [--rounds 2]

A moto S3 server and, in front of it, a proxy that holds every write (PUT, POST) of a checkpoint's
files for ``--delay-s`` (a distant or loaded endpoint: each file is three requests, a multipart
upload); a one-node Ray (token auth, loopback) training the tests' tiny job
(the debug preset on 16x16 demo patches, 2 CPU workers) with its checkpoints in that bucket, every
``--every`` steps. The two modes alternate, ``--rounds`` runs each. From rank 0's per-step trace:
the median step, the median step that carries a checkpoint's report, the longest step, and what the
steps waited for room among the uploads in flight (``upload_wait_s``, background mode), per mode;
then the checkpoint steps of the synchronous mode against the background one. Uploads that take
longer than ``--every`` steps fall behind, and the background mode then waits at the bound. It prints a table;
docs/performance.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _moto(port: int) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)


def _gaps(trace: Path, every: int) -> tuple[list[float], list[float]]:
    """(seconds of the steps that follow a checkpoint's report, of every other step) on rank 0."""
    records = [json.loads(line) for line in (trace / "rank0.jsonl").read_text().splitlines()]
    at = {r["step"]: r["time"] for r in records if "step" in r}
    ckpt, plain = [], []
    for step in sorted(at):
        if step - 1 in at:
            (ckpt if step % every == 0 else plain).append(at[step] - at[step - 1])
    return ckpt, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-s", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import boto3

    from orchestrator.config import validate
    from orchestrator.driver.launch import run_training
    from tests.jobs import tiny_job
    from tests.rayauth import token_auth
    from tests.rayfixtures import local_ray
    from tests.s3fixtures import ACCESS_KEY, SECRET, FaultProxy, free_port

    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    port = free_port()
    moto = _moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    # a checkpoint's folder is checkpoint_<date>: its files, not Ray Train's snapshot or the job's lock
    proxy = FaultProxy(endpoint, "/checkpoint_2", failures=-1, mode="slow", methods=("PUT", "POST"),
                       delay_s=args.delay_s)  # fmt: skip
    times: dict[str, tuple[list[float], list[float]]] = {"sync": ([], []), "async": ([], [])}
    waited = 0.0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            auth = token_auth(root)
            with local_ray(num_cpus=3):
                for i in range(args.rounds):
                    for mode in ("sync", "async"):
                        run = root / f"{mode}{i}"
                        run.mkdir()
                        tree = tiny_job(run, name=f"bench-{mode}{i}", train__max_steps=args.steps,
                                        train__checkpoint_every=args.every, train__log_every=args.every,
                                        train__eval_every=args.steps, train__keep_checkpoints=1,
                                        train__final_eval_samples=0, train__sample_grid=0,
                                        train__async_uploads=mode == "async", mlflow__enabled=False)  # fmt: skip
                        tree["data"].update(train=f"file://{root}/data/train/manifest.json",
                                            valid=f"file://{root}/data/valid/manifest.json")  # fmt: skip
                        tree["storage"] = {"path": f"s3://bench/{mode}{i}", "endpoint_url": proxy.endpoint}
                        result = run_training(validate(tree))
                        assert result.error is None, result.error
                        waited += result.metrics.get("upload_wait_s", 0.0)
                        ckpt, plain = _gaps(run / "trace", args.every)
                        times[mode][0].extend(ckpt)
                        times[mode][1].extend(plain)
            auth.restore()
    finally:
        proxy.close()
        moto.terminate()
        moto.wait(timeout=10)
    print(f"training step (s) with checkpoints every {args.every} steps to a store that holds each write of a "
          f"checkpoint {args.delay_s:g} s; tiny job, 2 CPU workers, {args.rounds} runs of {args.steps} steps a mode, "
          "alternating")  # fmt: skip
    print("| uploads | median step | median checkpoint step | longest step | waited for room (s, all runs) |")
    print("|---|---:|---:|---:|---:|")
    for mode, (ckpt, plain) in times.items():
        label = "synchronous" if mode == "sync" else "in the background (async_uploads)"
        wait = "" if mode == "sync" else f"{waited:.2f}"
        print(f"| {label} | {statistics.median(plain):.3f} | {statistics.median(ckpt):.3f} "
              f"| {max(ckpt + plain):.3f} | {wait} |")  # fmt: skip
    sync_c, async_c = statistics.median(times["sync"][0]), statistics.median(times["async"][0])
    async_p = statistics.median(times["async"][1])
    print(f"| checkpoint step, synchronous / background | {sync_c / async_c:.1f}x | | | |")
    print(f"| background: checkpoint step / plain step | {async_c / async_p:.2f}x | | | |")


if __name__ == "__main__":
    main()
