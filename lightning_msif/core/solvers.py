"""Linear solvers ``A X = B`` for a ``HessianOperator`` A and a block of right-hand sides B ``[k, dim]``.

- ``exact``: dense matrix, float64 solve. Small models and tests.
- ``cg``: conjugate gradient, all right-hand sides advanced together (one data pass per iteration
  for the whole block), each with its own step sizes; needs A ≻ 0.
- ``lissa``: the stochastic Neumann series ``x ← b + (I − A/scale) x`` on mini-batch curvature,
  averaged over repeats; needs ``scale`` above A's largest eigenvalue.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import MSIFError
from .curvature import HessianOperator

SOLVERS = ("exact", "cg", "lissa")


@dataclass
class SolverOptions:
    """Settings of the solvers (each applies to the solver named in its prefix, or to all)."""

    tol: float = 1e-7  # cg: stop when ‖b − Ax‖ ≤ tol·‖b‖ for every right-hand side
    max_iter: int = 500  # cg: iteration cap (each iteration is one pass over the Hessian data)
    lissa_depth: int = 1000  # lissa: Neumann-series terms per repeat
    lissa_repeats: int = 1  # lissa: independent runs averaged
    lissa_scale: Optional[float] = None  # lissa: None estimates 1.2 × the largest eigenvalue
    lissa_batch_size: Optional[int] = None  # lissa: examples per curvature sample (None: the data's batch size)
    lissa_seed: int = 0
    max_dense_params: int = 10_000  # exact: refuse a bigger dense Hessian
    rhs_chunk_size: Optional[int] = 32  # right-hand sides vectorised at once in a Hessian-vector product

    @classmethod
    def from_kwargs(cls, options: Dict[str, Any]) -> "SolverOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MSIFError(f"Unknown solver option(s) {unknown}; the options are {sorted(known)}.")
        opts = cls(**options)
        for name in ("tol",):
            if not getattr(opts, name) > 0:
                raise MSIFError(f"{name} must be > 0, got {getattr(opts, name)!r}.")
        for name in ("max_iter", "lissa_depth", "lissa_repeats", "max_dense_params"):
            if int(getattr(opts, name)) < 1:
                raise MSIFError(f"{name} must be a positive integer, got {getattr(opts, name)!r}.")
        if opts.lissa_scale is not None and not opts.lissa_scale > 0:
            raise MSIFError(f"lissa_scale must be > 0 (or None to estimate it), got {opts.lissa_scale!r}.")
        return opts

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def solve(op: HessianOperator, rhs: torch.Tensor, solver: str, opts: SolverOptions,
          progress: Optional[Any] = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """``X`` with ``op.matmat(X) ≈ rhs`` and a dict describing the convergence.

    ``progress`` (a tqdm-like bar, or None) advances once per iteration of the iterative solvers.
    """
    if rhs.shape[0] == 0 or op.dim == 0:
        return torch.zeros_like(rhs), {"solver": solver, "dim": op.dim}
    fn = {"exact": _exact, "cg": _cg, "lissa": _lissa}[solver]
    x, info = fn(op, rhs, opts, progress)
    if not torch.isfinite(x).all():
        raise MSIFError(
            f"The {solver} solve of the {op.objective.role} Hessian produced NaN/inf. Add damping "
            "(damping=1e-3 or more) or check the model for non-finite weights."
        )
    info.update(solver=solver, dim=op.dim, rhs=rhs.shape[0])
    return x, info


def _exact(op: HessianOperator, rhs: torch.Tensor, opts: SolverOptions, progress: Optional[Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    h = op.dense(opts.max_dense_params).double()
    try:
        x = torch.linalg.solve(h, rhs.double().T).T
    except RuntimeError as err:  # singular
        raise MSIFError(
            f"The {op.objective.role} Hessian is singular ({err}). Add damping, e.g. damping=1e-3."
        ) from err
    eig = torch.linalg.eigvalsh(h)
    return x.to(rhs.dtype), {"min_eigenvalue": eig[0].item(), "max_eigenvalue": eig[-1].item()}


def _cg(op: HessianOperator, rhs: torch.Tensor, opts: SolverOptions, progress: Optional[Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    target = (opts.tol * rhs.norm(dim=1)) ** 2
    active = rs > target
    it = 0
    while active.any() and it < opts.max_iter:
        a_idx = active.nonzero().squeeze(1)
        ap = op.matmat(p[a_idx])
        pap = (p[a_idx] * ap).sum(1)
        if (pap <= 0).any():
            raise MSIFError(
                f"CG met non-positive curvature (pᵀAp = {pap.min().item():.3g}) in the {op.objective.role} "
                f"Hessian + damping (λ={op.damping}): CG needs a positive-definite system, and a Hessian "
                "away from a minimum is indefinite. Raise damping until H + λI is positive definite, or "
                "use solver='exact'."
            )
        step = rs[a_idx] / pap
        x[a_idx] += step[:, None] * p[a_idx]
        r[a_idx] -= step[:, None] * ap
        rs_new = (r[a_idx] * r[a_idx]).sum(1)
        p[a_idx] = r[a_idx] + (rs_new / rs[a_idx])[:, None] * p[a_idx]
        rs[a_idx] = rs_new
        active = rs > target
        it += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(residual=f"{(rs.max() / rhs.norm(dim=1).max() ** 2).sqrt().item():.2e}", refresh=False)
    rel = (rs.sqrt() / rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)).tolist()
    if active.any():
        warnings.warn(
            f"CG on the {op.objective.role} Hessian did not converge in max_iter={opts.max_iter} iterations: "
            f"largest relative residual {max(rel):.3g} > tol={opts.tol}. Raise max_iter or damping.",
            stacklevel=3,
        )
    return x, {"iterations": it, "relative_residual": max(rel), "converged": not bool(active.any())}


def _power_max_eig(op: HessianOperator, like: torch.Tensor, iters: int = 30) -> float:
    """Largest eigenvalue of ``op`` by power iteration from a fixed start."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(op.dim, generator=g, dtype=like.dtype).to(like.device)[None]
    lam = 0.0
    for _ in range(iters):
        w = op.matmat(v / v.norm())
        lam = float((w * (v / v.norm())).sum())
        v = w
    return abs(lam)


def _lissa(op: HessianOperator, rhs: torch.Tensor, opts: SolverOptions, progress: Optional[Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    scale = opts.lissa_scale or 1.2 * _power_max_eig(op, rhs)
    n = len(op.indices)
    batch = min(n, opts.lissa_batch_size or op.objective.source.batch_size)
    acc = torch.zeros_like(rhs)
    # Mini-batch curvature makes the iterates fluctuate around the solution: average the second half.
    tail = opts.lissa_depth // 2 if batch < n else opts.lissa_depth - 1
    b_norm = rhs.norm()
    last_change = 0.0
    for rep in range(opts.lissa_repeats):
        g = torch.Generator().manual_seed(opts.lissa_seed + rep)
        h, tail_sum = rhs.clone(), torch.zeros_like(rhs)
        for t in range(opts.lissa_depth):
            sample = op if batch >= n else op.on([op.indices[i] for i in torch.randperm(n, generator=g)[:batch].tolist()])
            new = rhs + h - sample.matmat(h) / scale
            norm = new.norm()
            if not math.isfinite(norm.item()) or norm > 1e6 * b_norm:
                raise MSIFError(
                    f"LiSSA diverged on the {op.objective.role} Hessian at step {t} (‖h‖ = {norm.item():.3g}, "
                    f"‖b‖ = {b_norm.item():.3g}) with lissa_scale={scale:.4g}: the scale must exceed the "
                    "largest eigenvalue of H + λI, and H + λI must be positive definite. Raise "
                    "lissa_scale or damping."
                )
            last_change = ((new - h).norm() / norm.clamp_min(1e-300)).item()
            h = new
            if progress is not None:
                progress.update(1)
            if t >= tail:
                tail_sum += h
        acc += tail_sum / (opts.lissa_depth - tail) / scale
    return acc / opts.lissa_repeats, {"scale": scale, "depth": opts.lissa_depth, "last_relative_change": last_change}
