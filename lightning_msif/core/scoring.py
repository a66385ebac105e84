"""The scoring pass: ``S[i, j] = −s_j · ∇ℓ(z_i)`` over every training example, streamed once.

Examples are cut into fixed global blocks handed to ranks round-robin, so the partition does not
depend on the number of processes. A ``ScoreStore`` (optional) keeps finished blocks and solved
vectors, so an interrupted run resumes where it stopped, on any number of processes.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch

from .lowrank import LowRankQueries
from .objective import Objective
from .params import ParamSpace

DEFAULT_BLOCK = 4096
SCORING_BATCH_FACTOR = 4

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
               block: Optional[int] = None, rank: int = 8) -> torch.Tensor:
    """``[n, k]`` scores on every rank; each rank computes (or reloads) its blocks, then all gather.

    ``method`` is ``'grad'``, ``'jvp'``, ``'lowrank'`` (the queries at ``rank`` per layer) or ``'auto'`` (see
    ``fastest_method``).
    """
    comm, n = obj.comm, len(obj.source)
    if method == "auto":
        method = fastest_method(obj, space, s)[0]
    lowrank = LowRankQueries(obj, space, s, rank) if method == "lowrank" else None
    block = block or DEFAULT_BLOCK
    starts = list(range(0, n, block))[comm.rank :: comm.world_size]
    # Fewer, larger vectorised calls: up to SCORING_BATCH_FACTOR × the data's batch size per read,
    # within one gradient chunk (activation memory then stays near a training step's).
    bs = obj.source.batch_size
    size = max(bs, min(obj.chunk_for(space), SCORING_BATCH_FACTOR * bs))
    parts: List[torch.Tensor] = []
    rows: List[torch.Tensor] = []
    for start in starts:
        stop = min(start + block, n)
        key = f"scores.{start}-{stop}"
        part = store.get(key) if store is not None else None
        if part is None:
            pieces = []
            for batch, idx in obj.batches(range(start, stop), shard=False, batch_size=size):
                piece = lowrank.scores(batch) if lowrank is not None else obj.dot_grads(space, s, batch, method)
                obj.assert_finite(piece, "per-example gradients", idx)
                pieces.append(piece)
            part = -torch.cat(pieces)
            if store is not None:
                store.put(key, part.detach().cpu())
        if progress is not None:
            progress.update(stop - start)
        parts.append(part.to(s.device, s.dtype))
        rows.append(torch.arange(start, stop, device=s.device))
    return gather_in_order(comm, parts, rows, s.new_zeros(0, s.shape[0]))


def gather_in_order(comm: Any, parts: List[torch.Tensor], rows: List[torch.Tensor],
                    empty: torch.Tensor) -> torch.Tensor:
    """Every rank's row blocks ``parts`` (at dataset rows ``rows``), gathered on every rank in dataset order."""
    local = torch.cat(parts) if parts else empty
    index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=empty.device)
    gathered = comm.all_gather_rows(local)
    order = comm.all_gather_rows(index)
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out
