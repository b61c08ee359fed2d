"""Data-dependent init under torch.distributed: 2 gloo processes on CPU, each with its own
seed, only rank 0 reading a batch, must end with identical parameters (rank 0's). And
``all_sum`` over the same group, from a list or from a tensor left where it is."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowpp import FlowPlusPlus
from flowpp.distributed import data_dependent_init
from orchestrator.training.step import all_sum
from tests.helpers import random_images, rendezvous, tiny_config

pytestmark = pytest.mark.unit


def _worker(rank, world, store, out_dir):
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different random init per rank
        model = FlowPlusPlus(tiny_config(image_size=8))
        batch = random_images(4, 8, seed=rank) if rank == 0 else None  # only rank 0 reads data
        data_dependent_init(model, batch)
        torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
        sums = all_sum([1.0, rank]) + all_sum(torch.tensor([rank + 1.0]))
        torch.save(torch.tensor(sums), f"{out_dir}/sums{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_end_identical(tmp_path):
    mp.spawn(_worker, args=(2, rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert all(bool(v) for k, v in s0.items() if k.endswith("initialized"))
    for rank in (0, 1):
        assert torch.load(tmp_path / f"sums{rank}.pt").tolist() == [2.0, 1.0, 3.0]

    # and the result is rank 0's own init, not a default: rebuild rank 0 locally
    torch.manual_seed(100)
    local = FlowPlusPlus(tiny_config(image_size=8))
    data_dependent_init(local, random_images(4, 8, seed=0))
    for k, v in local.state_dict().items():
        torch.testing.assert_close(s0[k], v, msg=k)


def test_the_source_rank_needs_a_batch():
    with pytest.raises(ValueError, match="source rank needs a batch"):
        data_dependent_init(FlowPlusPlus(tiny_config(image_size=8)), None)
