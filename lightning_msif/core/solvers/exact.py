"""``exact``: the dense matrix, solved in float64. Small models and tests.

One symmetric-indefinite (Bunch-Kaufman) ``L D Lᵀ`` factorisation gives both the solve and the inertia: by
Sylvester's law the matrix has as many negative eigenvalues as the block-diagonal ``D``, so the record says
whether ``C + λI`` was positive definite at a third of the cost of an eigendecomposition.
"""
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


def negative_eigenvalues(ld: torch.Tensor, pivots: torch.Tensor) -> int:
    """How many negative eigenvalues the factorised matrix has: those of ``D``'s 1×1 and 2×2 blocks (LAPACK's
    ``sytrf`` layout: a negative pivot marks the first row of a 2×2 block, stored on the sub-diagonal)."""
    d, sub, piv = ld.diagonal().tolist(), ld.diagonal(-1).tolist(), pivots.tolist()
    count, k = 0, 0
    while k < len(d):
        if piv[k] > 0:
            count += d[k] < 0
            k += 1
        else:  # 2×2 block [[a, b], [b, c]]: one eigenvalue of each sign when ac < b², else both of a's sign
            a, b, c = d[k], sub[k], d[k + 1]
            count += 1 if a * c < b * b else 2 * (a < 0)
            k += 2
    return count


@register_solver
class ExactSolver(Solver):
    name = "exact"
    Options = ExactOptions
    needs = ("dense",)

    def run(self, op: Curvature, rhs: torch.Tensor, options: ExactOptions,
            progress: Optional[Any]) -> Tuple[torch.Tensor, Info]:
        h = op.dense(options.max_dense_params).double()
        ld, pivots, status = torch.linalg.ldl_factor_ex(h)
        if status.item() != 0:
            raise MSIFError(f"The {op.role} Hessian is singular (a zero pivot in its L D Lᵀ factorisation). Add "
                            "damping, e.g. damping=1e-3.")
        x = torch.linalg.ldl_solve(ld, pivots, rhs.double().T).T
        negative = negative_eigenvalues(ld, pivots)
        return x.to(rhs.dtype), {"negative_eigenvalues": negative, "positive_definite": negative == 0}
