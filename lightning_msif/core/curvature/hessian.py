"""The exact Hessian of a stage's mean loss, by forward-over-reverse autodiff (``jvp`` of ``grad``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..registry import positive_int
from .base import Curvature, register_curvature


DENSE_BYTES = 512 * 2**20
"""Memory for the vectorised columns of one dense-matrix product (see ``Objective.itemsize_per_column``)."""


@dataclass(frozen=True)
class HessianOptions:
    rhs_chunk_size: Optional[int] = 32  # right-hand sides vectorised at once in one Hessian-vector product

    def __post_init__(self) -> None:
        if self.rhs_chunk_size is not None:
            positive_int(self, "rhs_chunk_size")


@register_curvature
@dataclass(frozen=True)
class HessianCurvature(Curvature):
    """``H V``: exact second derivatives (indefinite away from a minimum); needs forward-mode AD."""

    name = "hessian"
    Options = HessianOptions

    def apply(self, vectors: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        if chunk is None:
            chunk = self.options.rhs_chunk_size if self.options is not None else HessianOptions.rhs_chunk_size
        return self.objective.hvp(self.space, vectors, self.indices, chunk)

    def dense_product(self, eye: torch.Tensor) -> torch.Tensor:
        """All columns in as few vectorised products as memory allows (``DENSE_BYTES`` for the tangents, gradients
        and activations of the vectorised columns), which is what makes the dense matrix fast."""
        per_column = self.objective.itemsize_per_column(self.space)
        chunk = max(self.options.rhs_chunk_size or 1, min(self.dim, DENSE_BYTES // max(1, per_column)))
        out = self.apply(eye, chunk)
        return out + self.damping * eye + (self.shift * eye if self.shift is not None else 0)
