"""``direct``: the curvature's own closed-form inverse (Kronecker-factored curvatures): no iteration."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..curvature.base import Curvature
from .base import Info, Solver, register_solver


@register_solver
class DirectSolver(Solver):
    name = "direct"
    needs = ("inverse_matmat",)

    def run(self, op: Curvature, rhs: torch.Tensor, options: Any,
            progress: Optional[Any]) -> Tuple[torch.Tensor, Info]:
        x = op.inverse_matmat(rhs)  # type: ignore[attr-defined]
        residual = ((op.matmat(x) - rhs).norm(dim=1) / rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)).max()
        return x, {"relative_residual": residual.item()}
