"""Per-step overhead of Ray Train against the same loop in a plain process.

    python bench/ray_overhead.py [--steps 30] [--warmup 5] [--batch 8] [--image-size 64]

Both sides run the identical step (the demo model: debug preset at 64x64 with the
demo job's stages, a ShardStream over local demo shards, Adam, grad clipping):
once in a fresh plain Python process, once as a 1-worker TorchTrainer (DDP
wrapping included). It prints median step times, the overhead, and the time from
``trainer.fit()`` (and from ``ray.init()``) to the end of the first step.
Goal: at most 5% overhead per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("s2d", "stripe:2", "s2d", "channel:2", "stripe:2")


def run_loop(cfg: dict, in_ray: bool) -> dict:
    """The measured loop; returns step times and the wall-clock time the first step ended."""
    import torch

    from flowpp import build_model, get_preset
    from flowpp.distributed import data_dependent_init
    from orchestrator.data.stream import ShardStream
    from orchestrator.training.step import train_step

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = build_model(get_preset("debug", image_size=cfg["image_size"], stages=STAGES))
    stream = ShardStream(cfg["manifest"], batch_size=cfg["batch"], num_workers=1, shuffle_buffer=256)
    data_dependent_init(model, next(iter(ShardStream(cfg["manifest"], batch_size=cfg["batch"])))["images"].long())
    if in_ray:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times, first_done = [], None
    total = cfg["warmup"] + cfg["steps"]
    while len(times) < total:
        for batch in stream:
            t = time.perf_counter()
            train_step(model, opt, batch["images"].long(), lr=1e-3, grad_clip=1.0)
            times.append(time.perf_counter() - t)
            if first_done is None:
                first_done = time.time()
            if len(times) >= total:
                break
    return {"step_s": times[cfg["warmup"] :], "first_step_done": first_done}


def ray_worker(cfg: dict) -> None:
    import ray.train

    out = run_loop(cfg, in_ray=True)
    if ray.train.get_context().get_world_rank() == 0:
        Path(cfg["out"]).write_text(json.dumps(out))
    ray.train.report({"done": 1})


def measure_plain(cfg: dict) -> dict:
    code = (
        f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); from bench.ray_overhead import run_loop; "
        "print(json.dumps(run_loop(json.loads(sys.argv[1]), in_ray=False)))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_ray(cfg: dict, tmp: Path) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.driver import rayauth

    rayauth.ensure_for_embedded()  # token auth with a token of this process's own (a 0600 file)
    t_init = time.time()
    ray.init(
        num_cpus=cfg["threads"] + 1,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    t_fit = time.time()
    cfg = {**cfg, "out": str(tmp / "ray.json")}
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg["threads"]}),
        run_config=RunConfig(name="overhead", storage_path=str(tmp / "runs")),
    )
    trainer.fit()
    ray.shutdown()
    out = json.loads(Path(cfg["out"]).read_text())
    out.update(init_to_first=out["first_step_done"] - t_init, fit_to_first=out["first_step_done"] - t_fit)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from orchestrator.data.prepare import PrepareOptions, prepare

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prepare(
            PrepareOptions(
                source="demo",
                input="",
                output=str(tmp / "data"),
                count=1024,
                image_size=args.image_size,
                progress=False,
            )
        )
        cfg = {
            "manifest": str(tmp / "data" / "manifest.json"),
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "image_size": args.image_size,
            "threads": args.threads,
        }
        plain = measure_plain(cfg)
        ray_out = measure_ray(cfg, tmp)
    p, r = statistics.median(plain["step_s"]), statistics.median(ray_out["step_s"])
    print(
        f"\nmodel: debug preset at {args.image_size}x{args.image_size}, stages {list(STAGES)}, batch {args.batch}, "
        f"{args.threads} threads, {args.steps} timed steps after {args.warmup} warm-up\n"
    )
    print("| where | median step (ms) | mean step (ms) | images/s |")
    print("|---|---|---|---|")
    for name, out in (("plain process", plain), ("Ray Train, 1 worker (DDP)", ray_out)):
        med, mean = statistics.median(out["step_s"]), statistics.mean(out["step_s"])
        print(f"| {name} | {med * 1e3:.1f} | {mean * 1e3:.1f} | {args.batch / med:.1f} |")
    verdict = "met" if r <= 1.05 * p else "NOT met"
    print(f"\noverhead per step (median): {100 * (r / p - 1):+.1f}%  (goal: <= 5%: {verdict})")
    print(
        f"trainer.fit() to end of first step: {ray_out['fit_to_first']:.1f} s; "
        f"ray.init() to end of first step: {ray_out['init_to_first']:.1f} s"
    )


if __name__ == "__main__":
    main()
