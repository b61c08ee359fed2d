"""The process group's store listens on the master address alone (orchestrator/training/rendezvous.py).

Rank 0 of a one-rank gloo group, in this process: its listening sockets are read from /proc. The
stock store, started from a port number as Ray Train's TorchConfig starts it, is read the same way:
it listens on every interface, which is why the module exists. Every Ray Train run of the suite goes
through the same code, and the session's loopback watch (tests/conftest.py) fails on any Ray worker
that listens off loopback.
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest

from tests import sockets

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def own_listeners() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of this process."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            mine.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the directory's own descriptor, closed since
            continue
    return {addr for inode, addr in sockets.listening().items() if f"socket:[{inode}]" in mine}


def test_rank_zero_serves_the_store_on_the_master_address_alone(monkeypatch):
    import ray
    import torch
    import torch.distributed as dist

    from orchestrator.training import rendezvous

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")  # a one-machine cluster's
    before = own_listeners()
    address, port = rendezvous.open_store()
    try:
        rendezvous.join("gloo", world_rank=0, world_size=1, address=address, port=port, timeout_s=30)
        assert dist.get_world_size() == 1 and os.environ["MASTER_ADDR"] == "127.0.0.1"
        x = torch.ones(3)
        dist.all_reduce(x)
        assert x.tolist() == [1.0, 1.0, 1.0]
        new = own_listeners() - before
        assert ("127.0.0.1", port) in new
        assert all(sockets.is_loopback(a) for a, _ in new), new  # gloo's own sockets too
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        rendezvous._forget()


def test_the_stock_store_listens_on_every_interface():
    """Why the module exists: from a port number alone, torch's store binds the unspecified address."""
    import torch.distributed as dist

    from tests.s3fixtures import free_port

    before, port = own_listeners(), free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=30))
    try:
        assert {a for a, p in own_listeners() - before if p == port} & {"::", "0.0.0.0"}
    finally:
        del store
