"""``exact``: the dense matrix, solved in float64. Small models and tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from ...errors import MSIFError
from ..curvature.base import Curvature
from ..registry import positive_int
from .base import Info, Solver, register_solver


@dataclass(frozen=True)
class ExactOptions:
    max_dense_params: int = 10_000  # exact: refuse a bigger dense matrix (it is dim² float64 numbers)

    def __post_init__(self) -> None:
        positive_int(self, "max_dense_params")


@register_solver
class ExactSolver(Solver):
    name = "exact"
    Options = ExactOptions
    needs = ("dense",)

    def run(self, op: Curvature, rhs: torch.Tensor, options: ExactOptions,
            progress: Optional[Any]) -> Tuple[torch.Tensor, Info]:
        h = op.dense(options.max_dense_params).double()
        try:
            x = torch.linalg.solve(h, rhs.double().T).T
        except RuntimeError as err:  # singular
            raise MSIFError(f"The {op.role} Hessian is singular ({err}). Add damping, e.g. damping=1e-3.") from err
        eig = torch.linalg.eigvalsh(h)
        return x.to(rhs.dtype), {"min_eigenvalue": eig[0].item(), "max_eigenvalue": eig[-1].item()}
