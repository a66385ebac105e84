"""The scoring pass: ``S[i, j] = −s_j · ∇ℓ(z_i)`` over every training example, streamed once.

Examples are cut into fixed global blocks handed to ranks round-robin, so the partition does not
depend on the number of processes. A ``ScoreStore`` (optional) keeps finished blocks and solved
vectors, so an interrupted run resumes where it stopped, on any number of processes. A matrix too large
to hold is *streamed*: its blocks stay in the store only and are never gathered (``RowBlocks``).
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch

from ..errors import MSIFError
from .lowrank import LowRankQueries
from .objective import Objective
from .params import ParamSpace

DEFAULT_BLOCK = 4096
SCORING_BATCH_FACTOR = 4
STREAM_ABOVE_BYTES = 2**30
"""``stream_scores=None`` streams a score matrix larger than this (1 GiB: 268M float32 scores, e.g. 1M × 256)."""

AUTO_JVP_MAX_QUERIES = 16
"""``'auto'`` scoring considers forward mode up to this many queries, per-example gradients always.

Forward mode costs about two forward passes per query; per-example gradients cost one
materialisation of ``[batch, dim]`` gradients plus one matrix product for all queries. On an MLP
(``benchmarks/scoring_pass.py``, 85k parameters, CPU) the two cross between 16 and 32 queries; on a
convolutional network forward mode is many times slower at any count, so ``auto`` times both on one batch.
"""


def fastest_method(obj: Objective, space: ParamSpace, s: torch.Tensor) -> Tuple[str, Dict[str, float]]:
    """``'auto'``: the faster of ``grad`` and ``jvp`` on one batch of scoring (each timed on its second call, after
    one-time costs), agreed by all ranks; ``grad`` outright above ``AUTO_JVP_MAX_QUERIES`` queries."""
    if s.shape[0] > AUTO_JVP_MAX_QUERIES:
        return "grad", {}
    size = max(1, min(obj.source.batch_size, obj.chunk_for(space)))
    batch, _ = next(obj.batches(range(min(len(obj.source), size)), shard=False))
    kernels = {"grad": lambda: obj.example_grad_dots(space, s, batch), "jvp": lambda: obj.directional(space, s, batch)}
    seconds: Dict[str, float] = {}
    for method, kernel in kernels.items():
        try:
            for _ in range(2):
                start = time.perf_counter()
                kernel()
                seconds[method] = time.perf_counter() - start
        except (RuntimeError, NotImplementedError):  # no forward mode through this model
            seconds[method] = float("inf")
    votes = obj.comm.all_reduce_sum(torch.tensor([1.0 if seconds["jvp"] < seconds["grad"] else 0.0]))
    return ("jvp" if 2 * float(votes) > obj.comm.world_size else "grad"), seconds


class ScoreStore(Protocol):
    """Where partial results survive an interruption (implemented by the snapshot layer)."""

    def get(self, key: str) -> Optional[torch.Tensor]:
        """A tensor saved under ``key`` by an earlier, identical computation, or None."""

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Save ``tensor`` under ``key`` (atomically)."""


class ScoreMatrix(Protocol):
    """A score matrix ``[n, k]`` read block of rows by block, in dataset order: in memory (``DenseScores``) or
    on disk (a snapshot's streamed blocks). The reports take either, so no view needs the whole matrix."""

    n: int
    k: int

    def blocks(self) -> Iterator[Tuple[int, torch.Tensor]]:
        """``(start, rows)`` for consecutive row blocks covering ``0 … n − 1``."""


class DenseScores:
    """A ``ScoreMatrix`` held in memory, read in views of ``DEFAULT_BLOCK`` rows (what a view computes from one
    block at a time then stays small beside the matrix)."""

    def __init__(self, scores: torch.Tensor):
        self.scores = scores.detach().cpu()
        self.n, self.k = self.scores.shape

    def blocks(self) -> Iterator[Tuple[int, torch.Tensor]]:
        for start in range(0, self.n, DEFAULT_BLOCK):
            yield start, self.scores[start : start + DEFAULT_BLOCK]


def agreed(comm: Any, found: bool) -> bool:
    """True only when every rank found its piece (ranks must take the same branch)."""
    flag = torch.tensor([1.0 if found else 0.0])
    return bool(comm.all_reduce_sum(flag).item() == comm.world_size)


def cached(store: Optional[ScoreStore], comm: Any, key: str, compute: Callable[[], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``compute()``, or the stored result when every rank has it."""
    hit = store.get(f"{key}.rank{comm.rank}") if store is not None else None
    if store is not None and agreed(comm, hit is not None):
        return hit.to(like.device, like.dtype)
    out = compute()
    if store is not None:
        store.put(f"{key}.rank{comm.rank}", out.detach().cpu())
    return out


def score_pass(obj: Objective, space: ParamSpace, s: torch.Tensor, method: str,
               store: Optional[ScoreStore] = None, progress: Optional[Any] = None,
               block: Optional[int] = None, rank: int = 8, stream: bool = False) -> Optional[torch.Tensor]:
    """``[n, k]`` scores on every rank; each rank computes (or reloads) its blocks, then all gather (``stream``:
    the blocks are left in ``store`` and nothing is returned).

    ``method`` is ``'grad'``, ``'jvp'``, ``'lowrank'`` (the queries at ``rank`` per layer) or ``'auto'`` (see
    ``fastest_method``).
    """
    comm, n = obj.comm, len(obj.source)
    if method == "auto":
        method = fastest_method(obj, space, s)[0]
    lowrank = LowRankQueries(obj, space, s, rank) if method == "lowrank" else None
    # Fewer, larger vectorised calls: up to SCORING_BATCH_FACTOR × the data's batch size per read,
    # within one gradient chunk (activation memory then stays near a training step's).
    bs = obj.source.batch_size
    size = max(bs, min(obj.chunk_for(space), SCORING_BATCH_FACTOR * bs))
    out = RowBlocks(comm, store, s, stream)
    for start, stop in row_blocks(n, block or DEFAULT_BLOCK, comm):
        if not out.has(start, stop):
            pieces = []
            for batch, idx in obj.batches(range(start, stop), shard=False, batch_size=size):
                piece = lowrank.scores(batch) if lowrank is not None else obj.dot_grads(space, s, batch, method)
                obj.assert_finite(piece, "per-example gradients", idx)
                pieces.append(piece)
            out.add(start, stop, -torch.cat(pieces))
        if progress is not None:
            progress.update(stop - start)
    return out.finish()


def blocks(n: int, block: int = DEFAULT_BLOCK) -> List[Tuple[int, int]]:
    """The fixed global blocks ``[start, stop)`` of ``n`` examples."""
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def row_blocks(n: int, block: int, comm: Any) -> List[Tuple[int, int]]:
    """This rank's ``(start, stop)`` blocks of ``n`` rows: fixed global blocks of ``block`` rows, round-robin."""
    return blocks(n, block)[comm.rank :: comm.world_size]


def block_name(start: int, stop: int) -> str:
    """The store key of the score rows ``start:stop``."""
    return f"scores.{start}-{stop}"


def block_span(key: str) -> Optional[Tuple[int, int]]:
    """``(start, stop)`` of a ``block_name`` key; None for any other key."""
    found = re.fullmatch(r"scores\.(\d+)-(\d+)", key)
    return (int(found[1]), int(found[2])) if found else None


class RowBlocks:
    """This rank's finished row blocks of a score matrix: saved to the store (when there is one, so a rerun
    resumes) and either kept to be gathered in dataset order, or (``stream``) left in the store only, so that
    no process ever holds the matrix."""

    def __init__(self, comm: Any, store: Optional[ScoreStore], like: torch.Tensor, stream: bool = False):
        if stream and store is None:
            raise MSIFError("stream_scores=True writes the score matrix block by block to a store, and none was "
                            "given: score through the callback or `msif score`, pass store=, or leave it None.")
        self.comm, self.store, self.like, self.stream = comm, store, like, stream
        self.parts: List[torch.Tensor] = []
        self.rows: List[torch.Tensor] = []

    def has(self, start: int, stop: int) -> bool:
        """True (and the block taken) when an earlier, identical run finished this block."""
        part = self.store.get(block_name(start, stop)) if self.store is not None else None
        if part is not None:
            self._keep(start, stop, part)
        return part is not None

    def add(self, start: int, stop: int, part: torch.Tensor) -> None:
        """A newly computed block ``[stop - start, k]``."""
        if self.store is not None:
            self.store.put(block_name(start, stop), part.detach().cpu())
        self._keep(start, stop, part)

    def _keep(self, start: int, stop: int, part: torch.Tensor) -> None:
        if not self.stream:
            self.parts.append(part.to(self.like.device, self.like.dtype))
            self.rows.append(torch.arange(start, stop, device=self.like.device))

    def finish(self) -> Optional[torch.Tensor]:
        """The whole matrix on every rank, or None when streamed (every rank's blocks are in the store)."""
        if self.stream:
            self.comm.all_reduce_sum(torch.zeros(1))  # every rank has written its blocks
            return None
        return gather_in_order(self.comm, self.parts, self.rows, self.like.new_zeros(0, self.like.shape[0]))


def gather_in_order(comm: Any, parts: List[torch.Tensor], rows: List[torch.Tensor],
                    empty: torch.Tensor) -> torch.Tensor:
    """Every rank's row blocks ``parts`` (at dataset rows ``rows``), gathered on every rank in dataset order."""
    local = torch.cat(parts) if parts else empty
    parts.clear()  # the blocks are in ``local`` now: one copy of the matrix less at the peak
    index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=empty.device)
    gathered = comm.all_gather_rows(local)
    order = comm.all_gather_rows(index)
    if bool((order == torch.arange(len(order), device=order.device)).all()):
        return gathered  # one process: its blocks were already in dataset order
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out
