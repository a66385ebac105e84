"""The exact Hessian of a stage's mean loss, by forward-over-reverse autodiff (``jvp`` of ``grad``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..registry import positive_int
from .base import Curvature, register_curvature


DENSE_BYTES = 512 * 2**20
"""Memory for the vectorised right-hand sides of one product (see ``Objective.itemsize_per_column``)."""


@dataclass(frozen=True)
class HessianOptions:
    rhs_chunk_size: Optional[int] = None  # right-hand sides vectorised at once (None: as many as DENSE_BYTES allow)

    def __post_init__(self) -> None:
        if self.rhs_chunk_size is not None:
            positive_int(self, "rhs_chunk_size")


@register_curvature
@dataclass(frozen=True)
class HessianCurvature(Curvature):
    """``H V``: exact second derivatives (indefinite away from a minimum); needs forward-mode AD."""

    name = "hessian"
    Options = HessianOptions

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.objective.hvp(self.space, vectors, self.indices, rhs_chunk(self, vectors.shape[0]))


def rhs_chunk(op: Curvature, k: int) -> int:
    """Right-hand sides per vectorised product: ``rhs_chunk_size``, or as many of the ``k`` as ``DENSE_BYTES`` hold
    (their tangents, results and activations), which is what makes many queries and dense matrices fast."""
    given = op.options.rhs_chunk_size if op.options is not None else None
    if given is not None:
        return given
    return max(1, min(k, DENSE_BYTES // max(1, op.objective.itemsize_per_column(op.space))))
