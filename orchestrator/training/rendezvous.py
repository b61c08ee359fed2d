"""How the ranks of a run find each other: torch's store, hosted on the master's own address.

Ray Train's ``TorchConfig`` gives rank 0 a port number, and torch's ``TCPStore`` then listens on
that port on every interface of the node (``[::]``), whatever the master address says: on a cloud
node, the rendezvous of every run is open to the node's whole network. Here rank 0 binds the
listening socket itself, on its node's address (127.0.0.1 on a one-machine cluster), and hands it
to the store (``master_listen_fd``); the other ranks connect to that address, and every rank joins
the process group through that store. Everything else is Ray's: the backend (gloo or NCCL), the
timeout, the worker environment (``RANK``, ``LOCAL_RANK``, ...), the shutdown.

``StoreOnMasterConfig`` is the ``torch_config`` of every trainer the driver makes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

__all__ = ["StoreOnMasterConfig", "join", "open_store"]

_HELD: dict[str, object] = {}
"""Rank 0's listening socket, from ``open_store`` until ``join`` hands it to the store; then each
rank's store, kept for the process group's life."""


def open_store() -> tuple[str, int]:
    """On rank 0: a listening socket on this node's address; returns (address, port)."""
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(1024)
    _HELD["socket"] = sock
    return address, sock.getsockname()[1]


def join(backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: float) -> None:
    """Every rank: the store (rank 0 serves it on the socket ``open_store`` bound), then the group."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        sock = _HELD.pop("socket")
        assert isinstance(sock, socket.socket)
        fd = sock.detach()  # the store owns the descriptor from here on, and closes it
        store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=fd)  # fmt: skip
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    _HELD["store"] = store
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)  # as env:// would have them
    if backend == "nccl":  # fail a hung collective instead of waiting forever, as Ray does
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def _forget() -> None:
    _HELD.clear()


class _StoreOnMasterBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        assert backend_config.backend in ("gloo", "nccl"), backend_config.backend  # launch chooses it
        address, port = worker_group.execute_single(0, open_store)
        if not isinstance(worker_group, V1WorkerGroup):  # V1's get it at the training start (Ray's own rule)
            worker_group.execute(_set_torch_distributed_env_vars)
        futures = [
            worker_group.execute_single_async(
                i,
                join,
                backend=backend_config.backend,
                world_rank=i,
                world_size=len(worker_group),
                address=address,
                port=port,
                timeout_s=backend_config.timeout_s,
            )  # fmt: skip
            for i in range(len(worker_group))
        ]
        ray.get(futures)

    def on_shutdown(self, worker_group, backend_config) -> None:
        super().on_shutdown(worker_group, backend_config)
        worker_group.execute(_forget)


@dataclass
class StoreOnMasterConfig(TorchConfig):
    """Ray Train's ``TorchConfig``, but the store listens on the master address alone."""

    @property
    def backend_cls(self):
        return _StoreOnMasterBackend
