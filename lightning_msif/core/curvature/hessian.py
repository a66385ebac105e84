"""The exact Hessian of a stage's mean loss, by forward-over-reverse autodiff (``jvp`` of ``grad``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..registry import positive_int
from .base import Curvature, register_curvature


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

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        chunk = self.options.rhs_chunk_size if self.options is not None else HessianOptions.rhs_chunk_size
        return self.objective.hvp(self.space, vectors, self.indices, chunk)
