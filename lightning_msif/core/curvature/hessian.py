"""The exact Hessian of a stage's mean loss, by reverse-over-reverse autodiff (``vjp`` of ``grad``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from ..registry import positive_int
from .base import Curvature, register_curvature


DENSE_BYTES = 64 * 2**20
"""Memory for the vectorised right-hand sides of one product (see ``Objective.itemsize_per_column``): cache-sized
blocks; larger ones (512 MB) made the dense Hessian of a small MLP slower, the products being memory-bound."""
MIN_COLUMNS = 64
"""``product_batch`` grows a product's batches while this many right-hand sides still fit in ``DENSE_BYTES``."""
KEPT_BYTES = 256 * 2**20
"""Up to this much, the gradient graphs of a curvature's examples are kept between products (iterative solves)."""


@dataclass(frozen=True)
class HessianOptions:
    rhs_chunk_size: Optional[int] = None  # right-hand sides vectorised at once (None: as many as DENSE_BYTES allow)

    def __post_init__(self) -> None:
        if self.rhs_chunk_size is not None:
            positive_int(self, "rhs_chunk_size")


@register_curvature
@dataclass(frozen=True)
class HessianCurvature(Curvature):
    """``H V``: exact second derivatives (indefinite away from a minimum); needs double backward."""

    name = "hessian"
    Options = HessianOptions
    _kept: List[Callable] = field(default_factory=list, init=False, repr=False, compare=False)

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        k = vectors.shape[0]
        size = product_batch(self, k)
        return self.objective.hvp(self.space, vectors, self.indices, rhs_chunk(self, k, size), size,
                                  self._pullbacks(size))

    def _pullbacks(self, batch_size: int) -> Optional[List[Callable]]:
        """The examples' gradient graphs, built on the first product and reused by the next ones (an iterative
        solve makes dozens) when they fit in ``KEPT_BYTES``; None: build them in every product."""
        obj = self.objective
        if obj.activation_bytes(-(-len(self.indices) // obj.comm.world_size)) > KEPT_BYTES:
            return None
        if not self._kept:
            self._kept.extend(obj.hessian_pullbacks(self.space, self.indices, batch_size))
        return self._kept


def product_batch(op: Curvature, k: int) -> int:
    """Examples per batch of a product: more than the data's batch when memory leaves room for ``min(k,
    MIN_COLUMNS)`` vectorised right-hand sides over them (fewer, larger pieces: far less overhead per example)."""
    obj = op.objective
    fits = DENSE_BYTES // max(1, obj.activation_bytes(1) * min(k, MIN_COLUMNS))
    return int(max(obj.source.batch_size, min(fits, -(-len(op.indices) // obj.comm.world_size))))


def rhs_chunk(op: Curvature, k: int, batch_size: Optional[int] = None) -> int:
    """Right-hand sides per vectorised product: ``rhs_chunk_size``, or as many of the ``k`` as ``DENSE_BYTES`` hold
    (their tangents, results and the activations of a ``batch_size`` batch), which is what makes many queries and
    dense matrices fast."""
    given = op.options.rhs_chunk_size if op.options is not None else None
    if given is not None:
        return given
    return max(1, min(k, DENSE_BYTES // max(1, op.objective.itemsize_per_column(op.space, batch_size))))
