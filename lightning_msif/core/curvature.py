"""Curvature as a linear operator: ``(H + diag(shift) + λI) V`` over a set of examples.

Solvers only ever call ``matmat`` (and ``dense`` for the exact one), so the exact, CG and LiSSA
solvers are interchangeable and can be tested against each other.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from ..errors import MSIFError
from .objective import Objective
from .params import ParamSpace


@dataclass(frozen=True)
class HessianOperator:
    """Hessian of ``objective``'s mean loss w.r.t. ``space`` over ``indices``, plus diagonal terms."""

    objective: Objective
    space: ParamSpace
    indices: Sequence[int]
    damping: float = 0.0
    shift: Optional[torch.Tensor] = None  # extra diagonal, e.g. α on the θ coordinates
    rhs_chunk: Optional[int] = 32

    @property
    def dim(self) -> int:
        return self.space.dim

    def on(self, indices: Sequence[int]) -> "HessianOperator":
        """The same operator over other examples (LiSSA's mini-batches)."""
        return replace(self, indices=indices)

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[k, dim] → [k, dim]``, each row multiplied by the damped Hessian."""
        out = self.objective.hvp(self.space, vectors, self.indices, self.rhs_chunk)
        if self.damping:
            out = out + self.damping * vectors
        if self.shift is not None:
            out = out + self.shift * vectors
        return out

    def dense(self, max_params: int) -> torch.Tensor:
        """The explicit ``[dim, dim]`` matrix, for small models (exact solves, tests)."""
        p = self.dim
        if p > max_params:
            gb = p * p * 8 / 2**30
            raise MSIFError(
                f"solver='exact' builds a dense {p}×{p} Hessian ({gb:.1f} GiB in float64) for the "
                f"{self.objective.role} stage, over max_dense_params={max_params}. Use solver='cg' (or "
                "'lissa') for a model this size, or raise max_dense_params if the memory is there."
            )
        obj = self.objective
        eye = torch.eye(p, device=obj.device, dtype=obj.dtype)
        h = self.matmat(eye)  # one pass over the data; vmap chunks the columns
        return (h + h.T) / 2
