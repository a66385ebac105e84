"""``block_cg``: breakdown-free block conjugate gradient (Ji & Li, BIT 2017) over all right-hand sides at once.

The k right-hand sides share one Krylov space: each iteration's search block is an orthonormal basis of the
residuals (plus the previous directions), with directions that have become dependent dropped (a rank-revealing
SVD), so it needs fewer iterations (= passes over the curvature's data) than k independent CG recurrences and
does not break down. A right-hand side leaves the block once it has converged, so later products are smaller.
Same options, stopping rule and measured residual as ``cg``; needs a positive-definite system.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..curvature.base import Curvature
from .base import Info, register_solver
from .cg import CGOptions, CGSolver, measured_report, non_positive_curvature


def _orth(m: torch.Tensor) -> torch.Tensor:
    """``[dim, s]`` orthonormal basis of the columns of ``m`` ``[dim, k]``, dependent directions dropped.

    The columns are normalised first, so a nearly converged residual (small, but still new information) is not
    mistaken for a dependent one; a direction is dropped when its part outside the others' span is below √eps.
    (Dropping by the raw singular values lost such residuals and doubled the iterations.)"""
    m = m / m.norm(dim=0).clamp_min(torch.finfo(m.dtype).tiny)
    u, sv, _ = torch.linalg.svd(m, full_matrices=False)
    if not len(sv) or sv[0] == 0:
        return m[:, :0]
    keep = sv > sv[0] * torch.finfo(m.dtype).eps ** 0.5
    return u[:, keep]


@register_solver
class BlockCGSolver(CGSolver):
    """CG's options, stopping rule and progress target; one Krylov space for all right-hand sides."""

    name = "block_cg"

    def run(self, op: Curvature, rhs: torch.Tensor, options: CGOptions,
            progress: Optional[Any]) -> Tuple[torch.Tensor, Info]:
        b = rhs.T  # columns
        x = torch.zeros_like(b)
        r = b.clone()
        target = options.tol * b.norm(dim=0)
        active = (r.norm(dim=0) > target).nonzero().squeeze(1)  # converged right-hand sides leave the block
        p = _orth(r[:, active])
        it = 0
        while it < options.max_iter and len(active) and p.shape[1]:
            q = op.matmat(p.T).T
            pq = p.T @ q
            pq = (pq + pq.T) / 2
            low = torch.linalg.eigvalsh(pq)[0].item()
            if low <= 0:
                raise non_positive_curvature(op, low)
            alpha = torch.linalg.solve(pq, p.T @ r[:, active])
            x[:, active] += p @ alpha
            r[:, active] -= q @ alpha
            active = active[r[:, active].norm(dim=0) > target[active]]
            beta = -torch.linalg.solve(pq, q.T @ r[:, active])
            p = _orth(r[:, active] + p @ beta)
            it += 1
            if progress is not None:
                progress.residual((r.norm(dim=0) / b.norm(dim=0).clamp_min(1e-300)).max().item(), it)
        return x.T.contiguous(), measured_report("Block CG", op, x.T, rhs, options, it, bool(len(active)))
