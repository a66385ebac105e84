"""``cg``: conjugate gradient on a block of right-hand sides, each with its own step sizes.

All right-hand sides still unconverged advance together, so an iteration is one pass over the
curvature's data for the whole block. Needs a positive-definite system. It stops on the recursively
updated residual, which drifts from the true one in finite precision; the residual it reports (and
warns about) is measured afterwards with one more product, ``‖A x − b‖ / ‖b‖``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from ...errors import MSIFError
from ..curvature.base import Curvature
from ..objective import precision_cause
from ..registry import positive_int, positive_number
from .base import Info, Solver, register_solver


@dataclass(frozen=True)
class CGOptions:
    tol: float = 1e-7  # cg: stop when ‖b − Ax‖ ≤ tol·‖b‖ for every right-hand side
    max_iter: int = 500  # cg: iteration cap (each iteration is one pass over the curvature's data)

    def __post_init__(self) -> None:
        positive_number(self, "tol")
        positive_int(self, "max_iter")


@register_solver
class CGSolver(Solver):
    name = "cg"
    Options = CGOptions

    def target(self, options: CGOptions) -> float:
        return options.tol

    def run(self, op: Curvature, rhs: torch.Tensor, options: CGOptions,
            progress: Optional[Any]) -> Tuple[torch.Tensor, Info]:
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        target = (options.tol * rhs.norm(dim=1)) ** 2
        active = rs > target
        it = 0
        while active.any() and it < options.max_iter:
            a_idx = active.nonzero().squeeze(1)
            ap = op.matmat(p[a_idx])
            pap = (p[a_idx] * ap).sum(1)
            if (pap <= 0).any():
                raise non_positive_curvature(op, pap.min().item())
            step = rs[a_idx] / pap
            x[a_idx] += step[:, None] * p[a_idx]
            r[a_idx] -= step[:, None] * ap
            rs_new = (r[a_idx] * r[a_idx]).sum(1)
            p[a_idx] = r[a_idx] + (rs_new / rs[a_idx])[:, None] * p[a_idx]
            rs[a_idx] = rs_new
            active = rs > target
            it += 1
            if progress is not None:  # the running residual of the worst right-hand side
                progress.residual((rs / (rhs * rhs).sum(1).clamp_min(1e-300)).max().sqrt().item(), it)
        return x, measured_report("CG", op, x, rhs, options, it, bool(active.any()))


def non_positive_curvature(op: Curvature, value: float) -> MSIFError:
    """The error of a conjugate-gradient method that met ``pᵀAp ≤ 0``: what to change (a wider dtype for a
    low-precision model, whose rounding alone makes ``pᵀAp`` negative)."""
    cause = precision_cause(op.objective.dtype)
    if cause:
        return MSIFError(f"CG met non-positive curvature (pᵀAp = {value:.3g}) in the {op.role} Hessian. {cause}")
    return MSIFError(
        f"CG met non-positive curvature (pᵀAp = {value:.3g}) in the {op.role} "
        f"Hessian + damping (λ={op.damping}): CG needs a positive-definite system, and a Hessian "
        "away from a minimum is indefinite. Raise damping until H + λI is positive definite, use a "
        "positive semi-definite curvature (curvature='ggn', the Gauss-Newton matrix, or "
        "curvature='ekfac', its Kronecker-factored approximation), or use solver='exact'."
    )


def measured_report(name: str, op: Curvature, x: torch.Tensor, rhs: torch.Tensor, options: CGOptions, iterations: int,
                    unfinished: bool) -> Info:
    """The true residual ``max_j ‖A x_j − b_j‖/‖b_j‖`` (one more product, not the running one), a warning when it is
    over ``tol``, and the record."""
    b_norm = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    measured = ((op.matmat(x) - rhs).norm(dim=1) / b_norm).max().item()
    if measured > options.tol:
        stop = (f"did not converge in max_iter={options.max_iter} iterations" if unfinished else
                f"stopped on its running residual after {iterations} iterations, but rounding kept the true one higher")
        fix = ("Raise max_iter or damping." if unfinished else
               "Raise tol to what this precision reaches (or use float64), or raise damping.")
        warnings.warn(
            f"{name} on the {op.role} Hessian {stop}: largest relative residual ‖Ax − b‖/‖b‖ = {measured:.3g} > "
            f"tol={options.tol}. {fix}",
            stacklevel=5,
        )
    return {"iterations": iterations, "relative_residual": measured, "converged": measured <= options.tol}
