"""A gradient index: every training example's projected loss gradient, kept in fixed global blocks, so that any
later set of query vectors is scored by one product per block, without reading the training data again.

Blocks of ``block`` examples are dealt to ranks round-robin (as in the scoring pass), so what is written does
not depend on the number of processes, and a block already in the store is not captured again: an
interrupted capture resumes where it stopped, on any number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple

import torch

from ..errors import MSIFError
from .objective import Objective
from .projection import Projection
from .scoring import DEFAULT_BLOCK, SCORING_BATCH_FACTOR, RowBlocks, ScoreStore, blocks, row_blocks

INDEX_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
AUTOCAST = ("bfloat16", "float16")


class IndexStore(Protocol):
    """Where an index's blocks live (implemented by the snapshot layer)."""

    def has(self, key: str) -> bool:
        """Whether the block ``key`` is complete."""

    def get(self, key: str) -> torch.Tensor:
        """The rows of block ``key``."""

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Save the rows of block ``key`` (atomically)."""

    def keys(self) -> List[str]:
        """Every key held."""

    def remove(self, key: str) -> None:
        """Drop ``key`` (no error when absent)."""


class MemoryIndexStore(dict):
    """An ``IndexStore`` in memory (tests, and indexes small enough to keep)."""

    def has(self, key: str) -> bool:
        return key in self

    def get(self, key: str) -> torch.Tensor:  # type: ignore[override]
        return self[key]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self[key] = tensor

    def keys(self) -> List[str]:  # type: ignore[override]
        return list(super().keys())

    def remove(self, key: str) -> None:
        self.pop(key, None)


@dataclass(frozen=True)
class GradientIndex:
    """A captured index: where its blocks are, how many examples it covers, and the projection it was taken
    with (``Projection.describe()`` and the matrices that project vectors alike; scoring checks they fit)."""

    store: IndexStore
    n: int
    projection: Dict[str, Any]
    duals: Dict[str, torch.Tensor]  # the projection's matrices for vectors (``Projection.duals``)
    block: int = DEFAULT_BLOCK


def block_key(start: int, stop: int) -> str:
    return f"rows.{start}-{stop}"


def capture_index(obj: Objective, projection: Projection, store: IndexStore, dtype: str = "float32",
                  block: int = DEFAULT_BLOCK, progress: Optional[Any] = None,
                  autocast: Optional[str] = None) -> Dict[str, Any]:
    """Write this rank's blocks of ``obj``'s examples' projected gradients (those not yet in ``store``); returns
    how many examples were captured now and how many were already there, over all ranks. ``autocast``
    (``"bfloat16"`` | ``"float16"``): the forward, backward and projections under ``torch.autocast`` in that
    precision (products accumulate in float32 inside each kernel; rows are stored in ``dtype``)."""
    comm, n = obj.comm, len(obj.source)
    if n == 0:
        raise MSIFError(f"No {obj.role} examples to index: pass data with examples.")
    size = max(1, SCORING_BATCH_FACTOR * obj.source.batch_size)
    done = kept = 0
    for start, stop in row_blocks(n, block, comm):
        key = block_key(start, stop)
        if store.has(key):
            kept += stop - start
        else:
            rows, where = [], []
            for batch, idx in obj.batches(range(start, stop), shard=False, batch_size=size):
                with torch.autocast(obj.device.type, dtype=INDEX_DTYPES[autocast or "float32"],
                                    enabled=autocast is not None):
                    rows.append(projection.examples(batch, idx).to(INDEX_DTYPES[dtype]))
                where.append(idx)
            block_rows = torch.cat(rows)
            obj.assert_finite(block_rows, "projected gradients", torch.cat(where))  # one device sync per block
            store.put(key, block_rows)
            done += stop - start
        if progress is not None:
            progress.update(stop - start)
    counts = comm.all_reduce_sum(torch.tensor([float(done), float(kept)], dtype=torch.float64))
    return {"captured": int(counts[0]), "reused": int(counts[1])}


def index_rows(store: IndexStore, n: int, block: int = DEFAULT_BLOCK, rank: int = 0,
               world_size: int = 1) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """``(start, stop, rows)`` of this rank's blocks; an error naming the block when one is missing."""
    for start, stop in blocks(n, block)[rank::world_size]:
        key = block_key(start, stop)
        if not store.has(key):
            raise MSIFError(f"The gradient index has no block {key} (examples {start} to {stop - 1}): its capture "
                            "did not finish. Run the capture again (it resumes) before scoring against it.")
        yield start, stop, store.get(key)


def index_scores(store: IndexStore, n: int, projected: torch.Tensor, comm: Any, block: int = DEFAULT_BLOCK,
                 progress: Optional[Any] = None, scores: Optional[ScoreStore] = None,
                 stream: bool = False) -> Optional[torch.Tensor]:
    """``S [n, k] = −rows · projectedᵀ`` on every rank: each rank reads its blocks, then all gather (in
    ``projected``'s dtype; the rows are widened to it block by block). ``stream``: the score blocks go to
    ``scores`` only and nothing is returned (``RowBlocks``)."""
    out = RowBlocks(comm, scores, projected, stream)
    for start, stop, rows in index_rows(store, n, block, comm.rank, comm.world_size):
        if rows.shape != (stop - start, projected.shape[1]):
            raise MSIFError(f"The gradient index's block {block_key(start, stop)} holds {tuple(rows.shape)} rows, "
                            f"but ({stop - start}, {projected.shape[1]}) were expected: the index belongs to "
                            "another projection. Capture it again.")
        out.add(start, stop, -(rows.to(projected.device, projected.dtype) @ projected.T))
        if progress is not None:
            progress.update(stop - start)
    return out.finish()
