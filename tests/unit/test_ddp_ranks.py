"""The trainer's DDP setup across 2 gloo ranks on the CPU: with gradients as bucket views and no
buffer sync per forward (``orchestrator.training.step.ddp_options``), parameters, buffers and EMA stay
equal on both ranks through training steps and a resume from a checkpoint; and every rank marks
its data-init layers ready after the init broadcast, so a compiled model traces no graph break and
compiles no extra graph on the ranks that did not run the init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from flowpp import FlowPlusPlus
from flowpp.compile import compile_model
from flowpp.datainit import DataInit
from flowpp.distributed import data_dependent_init
from flowpp.ema import EMA
from orchestrator.training import checkpoint
from orchestrator.training.state import TrainState
from orchestrator.training.step import ddp_options, step_noise, train_step
from tests.helpers import random_images, rendezvous, tiny_config

pytestmark = pytest.mark.unit
STEPS = 3


class _Position:
    """The train stream's part of a checkpoint (its own tests are in test_stream.py)."""

    def state_dict(self) -> dict:
        return {"epoch": 0}

    def load_state_dict(self, state: dict) -> None:
        assert state == {"epoch": 0}


def _state(rank: int, seed: int) -> TrainState:
    torch.manual_seed(seed)  # a different random init per rank and per build
    model = FlowPlusPlus(tiny_config(image_size=8))
    ddp = DistributedDataParallel(model, **ddp_options())
    assert ddp.gradient_as_bucket_view
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    return TrainState(model, ddp, EMA(model, 0.9), opt, _Position())  # type: ignore[arg-type]


def _train(state: TrainState, rank: int) -> None:
    for _ in range(STEPS):
        x = random_images(4, 8, seed=10 * rank + state.step)  # each rank its own batch
        assert not train_step(state.ddp_model, state.opt, x, lr=1e-3, grad_clip=1.0).skipped
        state.ema.update(state.model)
        state.step += 1


def _steps_and_resume(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        model = FlowPlusPlus(tiny_config(image_size=8))
        data_dependent_init(model, random_images(4, 8) if rank == 0 else None)
        first = TrainState(model, DistributedDataParallel(model, **ddp_options()), EMA(model, 0.9),
                           torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), _Position())  # fmt: skip
        _train(first, rank)
        torch.save(first.model.state_dict(), f"{out}/before-rank{rank}.pt")
        checkpoint.save(Path(out, "ckpt"), first, rank)
        dist.barrier()  # rank 0's state.pt is written
        resumed = _state(rank, seed=1000 + rank)
        checkpoint.load(Path(out, "ckpt"), resumed, rank)
        assert not any(m.needs_init() for m in resumed.model.modules() if isinstance(m, DataInit))
        _train(resumed, rank)
        torch.save({**resumed.model.state_dict(), **{f"ema.{k}": v for k, v in resumed.ema.shadow.items()}},
                   f"{out}/after-rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_parameters_buffers_and_ema_stay_equal_across_steps_and_a_resume(tmp_path):
    mp.spawn(_steps_and_resume, args=(2, rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    load = lambda name: torch.load(tmp_path / name, weights_only=True)  # noqa: E731
    for stage in ("before", "after"):
        r0, r1 = load(f"{stage}-rank0.pt"), load(f"{stage}-rank1.pt")
        assert r0.keys() == r1.keys()
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (stage, k)
    before, after = load("before-rank0.pt"), load("after-rank0.pt")
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2  # the resumed steps trained
    assert all(bool(v) for k, v in after.items() if k.endswith("initialized"))


def _accumulated_steps(rank: int, world: int, store: str, out: str) -> None:
    """Steps of 6 images a rank, whole and as micro-batches of 2: DDP's all-reduce hook runs as often
    either way (on the last micro-batch only), and the ranks end equal."""
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        calls = {}
        for micro in (0, 2):
            torch.manual_seed(0)
            model = FlowPlusPlus(tiny_config(image_size=8))
            data_dependent_init(model, random_images(4, 8) if rank == 0 else None)
            ddp = DistributedDataParallel(model, **ddp_options())
            count = [0]

            def hook(state, bucket, count=count):
                count[0] += 1
                return default_hooks.allreduce_hook(dist.group.WORLD, bucket)

            ddp.register_comm_hook(None, hook)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            for step in range(STEPS):
                x = random_images(6, 8, seed=10 * rank + step)
                assert not train_step(ddp, opt, x, lr=1e-3, grad_clip=1.0, micro=micro).skipped
            calls[micro] = count[0]
            torch.save(model.state_dict(), f"{out}/micro{micro}-rank{rank}.pt")
        torch.save(calls, f"{out}/calls-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_accumulated_micro_batches_all_reduce_once_a_step_and_ranks_stay_equal(tmp_path):
    mp.spawn(_accumulated_steps, args=(2, rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    load = lambda name: torch.load(tmp_path / name, weights_only=True)  # noqa: E731
    calls = load("calls-rank0.pt")
    assert calls[0] > 0 and calls[2] == calls[0], calls  # 3 micro-batches a step, one all-reduce round
    for micro in (0, 2):
        r0, r1 = load(f"micro{micro}-rank0.pt"), load(f"micro{micro}-rank1.pt")
        assert all(torch.equal(r0[k], r1[k]) for k in r0), micro
    whole, parts = load("micro0-rank0.pt"), load("micro2-rank0.pt")
    for k in whole:
        if whole[k].is_floating_point():
            torch.testing.assert_close(parts[k], whole[k], rtol=0, atol=1e-4, msg=k)


def _compiled_steps(rank: int, world: int, store: str, out: str) -> None:
    from torch._dynamo.utils import counters

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        model = FlowPlusPlus(tiny_config(image_size=8))
        compile_model(model, backend="aot_eager")  # dynamo traces as inductor would, without kernels
        data_dependent_init(model, random_images(4, 8) if rank == 0 else None)
        ddp = DistributedDataParallel(model, **ddp_options())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch._dynamo.reset()
        counters.clear()
        for step in range(3):
            train_step(ddp, opt, random_images(4, 8, seed=step), lr=1e-3, grad_clip=1.0)
        seen = {"graph_break": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}
        torch.save(seen, f"{out}/compiled-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_compiled_model_traces_alike_on_every_rank(tmp_path):
    mp.spawn(_compiled_steps, args=(2, rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"compiled-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["graph_break"] == 0 and r1["graph_break"] == 0, (r0, r1)
    assert r0["graphs"] > 0 and r1["graphs"] == r0["graphs"], (r0, r1)  # no recompile on rank 1


def _global_batch_steps(rank: int, world: int, store: str, out: str) -> None:
    """STEPS steps of the same global batches of 8 images: each rank its place's share, the
    dequantization noise from ``step_noise`` (and, for the control, from each rank's own generator)."""
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        for fixed in (True, False):
            torch.manual_seed(0)
            model = FlowPlusPlus(tiny_config(image_size=8))
            data_dependent_init(model, random_images(4, 8) if rank == 0 else None)
            ddp = DistributedDataParallel(model, **ddp_options())
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            generator, share = torch.Generator(), 8 // world
            torch.manual_seed(100 + rank)
            for step in range(STEPS):
                x = random_images(8, 8, seed=step)[rank * share : (rank + 1) * share]
                eps = step_noise(model, x, seed=5, step=step, rank=rank, world=world, generator=generator)
                out_ = train_step(ddp, opt, x, lr=1e-3, grad_clip=1.0, micro=4, noise=eps if fixed else None)
                assert not out_.skipped
            if rank == 0:
                torch.save(model.state_dict(), f"{out}/world{world}-{'fixed' if fixed else 'own'}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_as_one_rank_does_on_the_same_global_batches_with_the_step_noise(tmp_path):
    """What a resume on another world size rests on: the same images at a step (the data plan's
    strands) and the same noise for each (``step_noise``) give the same weights on 2 ranks as on 1
    rank that accumulates 2 micro-batches, within the order of float sums; noise drawn by each rank
    from its own generator does not."""
    for world in (2, 1):
        mp.spawn(_global_batch_steps, args=(world, rendezvous(tmp_path), str(tmp_path)), nprocs=world, join=True)
    load = lambda name: torch.load(tmp_path / name, weights_only=True)  # noqa: E731
    two, one = load("world2-fixed.pt"), load("world1-fixed.pt")
    for k in two:
        if two[k].is_floating_point():
            torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)
    own2, own1 = load("world2-own.pt"), load("world1-own.pt")
    gap = max((own2[k] - own1[k]).abs().max().item() for k in own2 if own2[k].is_floating_point())
    assert gap > 1e-4, gap  # the control: without the step's noise the sizes part
