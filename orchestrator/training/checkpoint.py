"""The training checkpoint: one format, written and read here only.

A checkpoint is a folder that Ray Train copies to ``storage.path``:

    meta.json       {"format_version", "step", "stats", and each of ``TrainState.json_states()``:
                    "stream", the train stream's position}                                  rank 0
    state.pt        {each of ``TrainState.tensor_states()``: "model", "ema", "optimizer";
                    "step"}: tensors in plain containers                                    rank 0
    rng-rank{r}.pt  rank r's torch (CPU, and its GPU's where it has one), numpy and python RNG every rank

Every ``.pt`` file holds only tensors, numbers, strings and containers, so it loads with
``torch.load(weights_only=True)``: nothing here unpickles arbitrary objects. A checkpoint
whose ``format_version`` this code does not know is refused with a message naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from orchestrator.core import storage
from orchestrator.core.errors import FlowppError

if TYPE_CHECKING:
    from flowpp import FlowConfig, FlowPlusPlus
    from orchestrator.training.state import TrainState

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump on any change to the layout above, and say in ``_check_version`` what older ones need."""
_OLDEST_READABLE = 0  # version 0: the same layout before it carried a version


class CheckpointError(FlowppError):
    """A checkpoint that cannot be read: unknown format version or damaged files; names the folder."""


# -- writing ------------------------------------------------------------------------------
def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state())
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device: the dequantization noise
    return state


def save(directory: Path, state: TrainState, rank: int) -> None:
    """Every rank writes its own RNG state; rank 0 writes the rest."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / f"rng-rank{rank}.pt")
    if rank != 0:
        return
    tensors = {name: obj.state_dict() for name, obj in state.tensor_states().items()}
    torch.save({**tensors, "step": state.step}, directory / "state.pt")
    meta = {"format_version": FORMAT_VERSION, "step": state.step, "stats": state.stats}
    meta.update({name: obj.state_dict() for name, obj in state.json_states().items()})
    (directory / "meta.json").write_text(json.dumps(meta))


@contextlib.contextmanager
def staged(state: TrainState, rank: int) -> Iterator[str]:
    """A temporary folder holding this rank's part of a checkpoint, for ``ray.train.report``."""
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp), state, rank)
        yield tmp


class Staging:
    """Where a rank stages its parts of checkpoints for Ray Train's asynchronous upload: a folder a
    checkpoint under a private root, which Ray Train deletes once that checkpoint is in storage.
    ``stage`` waits while ``limit`` staged checkpoints are still waiting for their upload, so local
    disk holds at most ``limit`` and the uploads never fall further behind than that."""

    POLL_S = 0.02
    WARN_EVERY_S = 60.0

    def __init__(self, limit: int, root: Path | None = None):
        self.limit = limit
        self.root = Path(tempfile.mkdtemp(prefix="flowpp-staging-")) if root is None else root
        if self.root.exists():
            # a previous attempt's parts that never reached storage (its upload failed, or the worker
            # died first): the restart resumes from storage's latest, so they are only disk held
            # (1.16 GB a part for rank 0 of imagenet64)
            left = [p for p in self.root.iterdir() if p.is_dir()]
            if left:
                log.warning("%s: removing %d checkpoint part(s) a previous attempt never uploaded (%s)", self.root,
                            len(left), ", ".join(p.name for p in left))  # fmt: skip
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.count = 0

    @classmethod
    def for_rank(cls, limit: int, job: str, storage_path: str, rank: int) -> Staging:
        """The staging area of ``rank`` of job ``job`` (writing to ``storage_path``) on this node: the
        same folder at every attempt, so that a restart clears what the one before it left. The
        workers of a node share its temporary directory; a job's rank is one worker at a time (the
        job's lock keeps a second driver of the same job and storage out)."""
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in job)
        where = hashlib.sha256(storage_path.encode()).hexdigest()[:8]
        return cls(limit, Path(tempfile.gettempdir()) / f"flowpp-staging-{name}-{where}-rank{rank}")

    def in_flight(self) -> list[Path]:
        """The staged checkpoints not uploaded yet, oldest first."""
        return sorted(p for p in self.root.iterdir() if p.is_dir())

    def wait_for_room(self) -> float:
        """Block until fewer than ``limit`` are in flight; the seconds waited."""
        started = warned = time.monotonic()
        while len(self.in_flight()) >= self.limit:
            if time.monotonic() - warned > self.WARN_EVERY_S:
                warned = time.monotonic()
                log.warning("still waiting for %d checkpoint uploads after %.0f s (%s)", len(self.in_flight()),
                            warned - started, ", ".join(p.name for p in self.in_flight()))  # fmt: skip
            time.sleep(self.POLL_S)
        return time.monotonic() - started

    def stage(self, state: TrainState, rank: int) -> tuple[Path, float]:
        """This rank's part of a checkpoint of ``state``, in a new folder once there is room; and
        the seconds it waited for that room."""
        waited = self.wait_for_room()
        self.count += 1
        directory = self.root / f"step-{state.step:010d}-{self.count:04d}"
        save(directory, state, rank)
        return directory, waited

    def close(self) -> None:
        """Remove the root and whatever an upload left there (a failed one)."""
        shutil.rmtree(self.root, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------
def _check_version(meta: dict, where: str) -> None:
    version = meta.get("format_version", 0)
    if not _OLDEST_READABLE <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format version {version}, this code reads versions "
            f"{_OLDEST_READABLE}..{FORMAT_VERSION}; resume it with the release that wrote it, or start a new run "
            "(a new `name`)"
        )


def _torch_load(data: bytes | Path, where: str):
    try:
        return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{where}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def load(directory: Path, state: TrainState, rank: int) -> None:
    """Restore ``state`` in place (model, EMA, optimizer, step, stats, stream position, RNG)."""
    meta = json.loads((directory / "meta.json").read_text())
    _check_version(meta, str(directory))
    saved = _torch_load(directory / "state.pt", str(directory / "state.pt"))
    for name, obj in state.tensor_states().items():
        obj.load_state_dict(_entry(saved, name, directory / "state.pt"))
    for name, obj in state.json_states().items():
        obj.load_state_dict(_entry(meta, name, directory / "meta.json"))
    state.step, state.stats = saved["step"], meta.get("stats", {})
    rng_file = directory / f"rng-rank{rank}.pt"
    if rng_file.exists():  # absent when the world size grew
        _restore_rng(rng_file)


def _entry(saved: dict, name: str, where: Path):
    if name not in saved:
        raise CheckpointError(f"{where}: no {name!r} state (a checkpoint of a training with less state)")
    return saved[name]


def _restore_rng(path: Path) -> None:
    try:
        rng = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a version-0 file keeps numpy's state as a pickled array
        log.warning("%s: RNG state of an older checkpoint format not restored", path)
        return
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(rng["python"])


def load_ema_model(url: str, config: FlowConfig, options: storage.StorageOptions | None = None) -> FlowPlusPlus:
    """The model of ``config`` holding the EMA weights of the checkpoint at ``url`` (eval mode).

    ``url`` is a checkpoint folder on any storage (``s3://...``, ``file://...``, a path).
    """
    from flowpp import build_model  # lazy: torch
    from flowpp.ema import EMA  # lazy: torch

    meta_url, state_url = storage.join(url, "meta.json"), storage.join(url, "state.pt")
    if storage.object_size(meta_url, options) is not None:
        _check_version(json.loads(storage.read_bytes(meta_url, options)), url)
    saved = _torch_load(storage.read_bytes(state_url, options), state_url)
    model = build_model(config.for_inference())
    model.load_state_dict(saved["model"])
    ema = EMA(model)
    ema.load_state_dict(saved["ema"])
    ema.copy_to(model)
    return model.eval()
