"""What the workers' preemption question costs a step: ``ray.train.get_preemption_info()``.

    python bench/preemption_check.py [--workers 2] [--calls 200] [--steps 20]

The question is a barrier over the workers (every rank asks, Ray Train agrees on one answer), so
the training loop asks it every ``scaling.preemption.check_every_steps`` steps. This runs a real
Ray Train group (token auth, loopback) of ``--workers`` CPU workers and times, on rank 0:

- the question alone, ``--calls`` times in a row (its cost, median and 90th percentile);
- the tiny job's training step (the debug preset, as the tests train it), ``--steps`` times, to
  put that cost against a step.

It prints a table; docs/performance.md quotes it. On a GPU step of hundreds of milliseconds the
share is smaller still.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(cfg: dict) -> None:
    import ray.train
    import torch

    from flowpp import build_model, get_preset
    from flowpp.distributed import data_dependent_init
    from orchestrator.cli import smooth_images
    from orchestrator.training.step import train_step

    torch.set_num_threads(1)
    asks = []
    for _ in range(cfg["calls"]):
        started = time.perf_counter()
        ray.train.get_preemption_info()
        asks.append(time.perf_counter() - started)
    torch.manual_seed(0)
    model = build_model(get_preset("debug", image_size=32))
    data_dependent_init(model, smooth_images(4, 32, seed=0) if ray.train.get_context().get_world_rank() == 0 else None)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = []
    for i in range(cfg["steps"] + 2):  # two warm-up steps
        x = smooth_images(4, 32, seed=i)
        started = time.perf_counter()
        train_step(model, opt, x, lr=1e-3, grad_clip=1.0)
        steps.append(time.perf_counter() - started)
    if ray.train.get_context().get_world_rank() == 0:
        Path(cfg["out"]).write_text(json.dumps({"asks": asks, "steps": steps[2:]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import ray
    from ray.train.v2.api.config import RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from orchestrator.driver import rayauth
    from orchestrator.driver.launch import own_address

    rayauth.ensure_for_embedded()  # token auth with a token of this process's own (a 0600 file)
    with tempfile.TemporaryDirectory() as tmp, own_address("127.0.0.1") as runtime_env:
        env = {**runtime_env.get("env_vars", {}), "PYTHONPATH": str(ROOT)}
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=args.workers + 1,
                 include_dashboard=False, runtime_env={"env_vars": env})  # fmt: skip
        out = Path(tmp) / "times.json"
        cfg = {"calls": args.calls, "steps": args.steps, "out": str(out)}
        TorchTrainer(
            worker,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(num_workers=args.workers),
            run_config=RunConfig(storage_path=tmp, name="preemption-check"),
        ).fit()
        ray.shutdown()
        times = json.loads(out.read_text())
    asks, steps = sorted(times["asks"]), sorted(times["steps"])
    ask_ms, step_ms = 1000 * statistics.median(asks), 1000 * statistics.median(steps)
    ask_p90, step_p90 = 1000 * asks[int(0.9 * len(asks))], 1000 * steps[int(0.9 * len(steps))]
    print(f"get_preemption_info() on rank 0 of {args.workers} CPU workers ({args.calls} calls), against a step")
    print("| what | median (ms) | p90 (ms) |")
    print("|---|---:|---:|")
    print(f"| ask (a barrier over the workers) | {ask_ms:.2f} | {ask_p90:.2f} |")
    print(f"| training step (debug preset, 32x32, batch 4) | {step_ms:.1f} | {step_p90:.1f} |")
    print(f"| ask every step, as a share of the step | {100 * ask_ms / step_ms:.1f}% | |")


if __name__ == "__main__":
    main()
