"""The data plan: which samples each step, rank and loader worker reads, in which order.

An epoch's samples are addressed by *global index* g in [0, N): the shards in a
seeded per-epoch permutation, their samples concatenated. A plan holds the
still-unread part of the epoch as sorted ``segments`` of global indices.

The epoch is cut into ``strands``: strand j holds positions [jL, (j+1)L) of the
concatenated segments, L a multiple of ``strand_batch`` = global batch / strands. Step s
takes the ``strand_batch`` samples [s q, (s+1) q) of every strand, strand after strand:
**a step's images do not depend on the world size**. Rank r of W takes the strands
[r S/W, (r+1) S/W), its loader workers contiguous runs of those, so each worker reads few
shards, each one mostly in full, and every rank the same number of steps. What does not
fill a whole step on every strand (< one global batch) is dropped and counted.

- A strand is cut into *chunks* at segment, shard and shuffle-block boundaries; each
  chunk is read in a seeded permutation (the shuffle buffer).
- Progress is one number, the steps consumed, identical on every rank. A run resumed on
  another world size or worker count reads on from there, the same images at each step
  as if it had never stopped (the strands and their batch stay). Another strand count,
  batch or shuffle buffer *re-plans* the rest of the epoch: every remaining sample is read
  exactly once, in a new layout.
- ``RankMajorPlan`` is the layout of checkpoints written before strands (rank r took
  positions [rM, (r+1)M), a worker's batches one by one): it only re-plans their rest.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from orchestrator.config import JobSpec


@dataclass(frozen=True)
class Chunk:
    shard: int
    """Index into the manifest's shard list."""
    start: int
    """First sample offset inside the shard."""
    stop: int
    generation: int = 0

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """Offsets in read order: a seeded permutation of [start, stop)."""
        rng = np.random.default_rng([seed, epoch, self.generation, self.shard, self.start])
        return self.start + rng.permutation(self.stop - self.start)


def default_strands(world_sizes: Iterable[int], global_batch: int, num_workers: int) -> int:
    """The strands of a job that runs at any of ``world_sizes``: a multiple of each (every rank
    takes whole strands) that divides the global batch, as many as the largest world's loader
    workers can read one each, and no more (each strand is a stream of shards of its own)."""
    sizes = list(world_sizes)
    base = math.lcm(*sizes)
    most = max(sizes) * max(1, num_workers)
    return max(
        k * base
        for k in range(1, global_batch // base + 1)
        if global_batch % (k * base) == 0 and k * base <= max(most, base)
    )


def job_strands(spec: JobSpec) -> int:
    """A job's training strands: every world size of its range shares them."""
    s = spec.scaling
    return default_strands(range(s.min_workers, s.max_workers + 1), spec.train.global_batch_size,
                           spec.data.num_workers)  # fmt: skip


@dataclass
class _Epoch:
    """What every layout shares: the epoch's shard order, and the positions of its segments."""

    counts: list[int]
    """Samples per shard, manifest order."""
    seed: int
    epoch: int
    world_size: int
    batch_size: int
    """A rank's samples a step."""
    num_workers: int
    shuffle_buffer: int
    segments: list[tuple[int, int]] = field(default_factory=list)
    generation: int = 0
    dropped: int = 0
    """Samples that earlier generations of this epoch's plan left out for good (normally 0: a
    re-plan takes the previous remainder back; only the final plan's ``dropped_now`` is lost)."""

    def __post_init__(self):
        if not self.segments:
            self.segments = [(0, sum(self.counts))]
        self.segments = [tuple(s) for s in self.segments]
        rng = np.random.default_rng([self.seed, self.epoch])
        self.shard_order = rng.permutation(len(self.counts)).tolist()
        self.shard_pos = {shard: p for p, shard in enumerate(self.shard_order)}
        self.starts = np.concatenate([[0], np.cumsum([self.counts[s] for s in self.shard_order])]).tolist()
        self.total = sum(b - a for a, b in self.segments)

    def _global_ranges(self, a: int, b: int) -> list[tuple[int, int]]:
        """Positions [a, b) of the concatenated segments as ranges of global indices."""
        out, pos = [], 0
        for s, e in self.segments:
            n = e - s
            lo, hi = max(a, pos), min(b, pos + n)
            if lo < hi:
                out.append((s + lo - pos, s + hi - pos))
            pos += n
            if pos >= b:
                break
        return out

    def _chunks(self, a: int, b: int) -> list[Chunk]:
        """Positions [a, b), cut at segment, shard and shuffle-block boundaries."""
        out = []
        for g0, g1 in self._global_ranges(a, b):
            g = g0
            while g < g1:
                p = bisect.bisect_right(self.starts, g) - 1
                offset = g - self.starts[p]
                block_end = (offset // self.shuffle_buffer + 1) * self.shuffle_buffer
                stop = min(self.counts[self.shard_order[p]], block_end, offset + g1 - g)
                out.append(Chunk(self.shard_order[p], offset, stop, self.generation))
                g += stop - offset
        return out

    def _order(self, a: int, b: int) -> list[tuple[int, int]]:
        """(shard, offset) of positions [a, b) in read order."""
        return [(c.shard, int(o)) for c in self._chunks(a, b) for o in c.order(self.seed, self.epoch)]

    def _to_global(self, shard: int, offset: int) -> int:
        return self.starts[self.shard_pos[shard]] + offset

    def _left(self, unread: list[tuple[int, int]], first_dropped: int) -> list[tuple[int, int]]:
        """The unread samples and this plan's remainder (still unread: it goes back in the pool)."""
        left = [self._to_global(shard, off) for shard, off in unread]
        for g0, g1 in self._global_ranges(first_dropped, self.total):
            left.extend(range(g0, g1))
        return _merge(sorted(left))

    def remaining_segments(self, consumed_batches: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def replan(self, consumed_batches: int, *, world_size, batch_size, num_workers, shuffle_buffer, strands=0) -> Plan:
        """The rest of this epoch, laid out anew (another strand count, batch or shuffle buffer)."""
        return Plan(self.counts, self.seed, self.epoch, world_size, batch_size, num_workers, shuffle_buffer,
                    segments=self.remaining_segments(consumed_batches), generation=self.generation + 1,
                    dropped=self.dropped, strands=strands)  # fmt: skip

    def _fields(self) -> dict:
        keys = ("seed", "epoch", "world_size", "batch_size", "num_workers", "shuffle_buffer", "generation", "dropped")
        d = {k: asdict(self)[k] for k in keys}
        d["segments"] = [list(s) for s in self.segments]
        return d


@dataclass
class Plan(_Epoch):
    strands: int = 0
    """Strands of the epoch (0: one a loader worker of every rank)."""

    def __post_init__(self):
        super().__post_init__()
        if self.strands == 0:
            self.strands = self.world_size * max(1, self.num_workers)
        global_batch = self.world_size * self.batch_size
        if self.strands % self.world_size or global_batch % self.strands:
            raise ValueError(
                f"{self.strands} strands cannot split among {self.world_size} ranks or a global batch of {global_batch}"
            )
        self.strand_batch = global_batch // self.strands
        self.strand_size = self.total // (self.strands * self.strand_batch) * self.strand_batch
        self.num_batches = self.strand_size // self.strand_batch
        self.per_rank = self.num_batches * self.batch_size
        self.dropped_now = self.total - self.strands * self.strand_size

    # -- layout ------------------------------------------------------------------------
    def worker_strands(self, rank: int, worker: int) -> range:
        """The strands (rank, worker) reads: a contiguous run of the rank's (empty for a worker
        beyond the rank's strand count)."""
        per_rank, k = self.strands // self.world_size, max(1, self.num_workers)
        counts = [per_rank // k + (i < per_rank % k) for i in range(k)]
        first = rank * per_rank + sum(counts[:worker])
        return range(first, first + counts[worker])

    def strand_order(self, strand: int) -> list[tuple[int, int]]:
        """(shard, offset) of a strand's samples in read order."""
        return self._order(strand * self.strand_size, (strand + 1) * self.strand_size)

    def worker_order(self, rank: int, worker: int, first_step: int = 0) -> list[tuple[int, int]]:
        """(shard, offset) of what (rank, worker) yields from ``first_step`` on: each step, its
        strands' ``strand_batch`` samples, strand after strand."""
        q = self.strand_batch
        orders = [self.strand_order(j) for j in self.worker_strands(rank, worker)]
        return [
            s
            for step in range(first_step, self.num_batches)
            for order in orders
            for s in order[step * q : (step + 1) * q]
        ]

    def step_order(self, step: int) -> list[tuple[int, int]]:
        """(shard, offset) of the whole global batch of ``step``, rank after rank."""
        q = self.strand_batch
        return [s for j in range(self.strands) for s in self.strand_order(j)[step * q : (step + 1) * q]]

    # -- progress ----------------------------------------------------------------------
    def remaining_segments(self, consumed_batches: int) -> list[tuple[int, int]]:
        """Global indices not yet delivered on any rank, as sorted merged ranges."""
        q = consumed_batches * self.strand_batch
        unread = [s for j in range(self.strands) for s in self.strand_order(j)[q:]]
        return self._left(unread, self.strands * self.strand_size)

    def relaid(self, *, world_size: int, batch_size: int, num_workers: int) -> Plan:
        """The same plan on another world size or worker count: the same strands and steps."""
        return replace(self, world_size=world_size, batch_size=batch_size, num_workers=num_workers)

    def to_dict(self) -> dict:
        return {**self._fields(), "strands": self.strands}

    @classmethod
    def from_dict(cls, counts: list[int], d: dict) -> Plan | RankMajorPlan:
        """A saved plan; one without strands is the older rank-major layout."""
        kind = cls if "strands" in d else RankMajorPlan
        return kind(counts, **{**d, "segments": [tuple(s) for s in d["segments"]]})


@dataclass
class RankMajorPlan(_Epoch):
    """The layout before strands, kept to re-plan the rest of an epoch a checkpoint of it holds."""

    def __post_init__(self):
        super().__post_init__()
        self.per_rank = self.total // (self.world_size * self.batch_size) * self.batch_size
        self.num_batches = self.per_rank // self.batch_size

    def _worker_batches(self) -> list[int]:
        k = max(1, self.num_workers)
        return [self.num_batches // k + (i < self.num_batches % k) for i in range(k)]

    def remaining_segments(self, consumed_batches: int) -> list[tuple[int, int]]:
        counts = self._worker_batches()
        done = [0] * len(counts)
        schedule = [(w, i) for i in range(max(counts, default=0)) for w in range(len(counts)) if i < counts[w]]
        for w, _ in schedule[:consumed_batches]:  # a rank's batches came round-robin over its workers
            done[w] += 1
        unread = []
        for rank in range(self.world_size):
            for w in range(len(counts)):
                a = rank * self.per_rank + sum(counts[:w]) * self.batch_size
                unread += self._order(a, a + counts[w] * self.batch_size)[done[w] * self.batch_size :]
        return self._left(unread, self.world_size * self.per_rank)


def _merge(indices: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for g in indices:
        if out and out[-1][1] == g:
            out[-1] = (out[-1][0], g + 1)
        else:
            out.append((g, g + 1))
    return out
