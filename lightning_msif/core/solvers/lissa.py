"""``lissa``: the stochastic Neumann series ``x ← b + (I − A/scale) x`` on mini-batch curvature.

Averaged over the second half of the iterates and over repeats; ``scale`` must exceed A's largest
eigenvalue (estimated by power iteration when not given). The curvature mini-batch is a fixed number
of examples, not the loader's batch size (a loader's batch is sized for memory, not for the variance
of a curvature sample). After the last step the residual ``‖A x − b‖ / ‖b‖`` is measured on the full
operator, reported, and warned about above ``lissa_tol``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from ...errors import MSIFError
from ..curvature.base import Curvature
from ..registry import check_int, positive_int, positive_number
from .base import Info, Solver, register_solver


@dataclass(frozen=True)
class LissaOptions:
    lissa_depth: int = 1000  # lissa: Neumann-series terms per repeat
    lissa_repeats: int = 1  # lissa: independent runs averaged
    lissa_scale: Optional[float] = None  # lissa: None estimates 1.2 × the largest eigenvalue
    lissa_batch_size: Optional[int] = 512  # lissa: examples per curvature sample (all when fewer; None: all)
    # Measured by benchmarks/lissa_defaults.py against the exact solve, every other option at its default
    # (Pearson / relative error of the scores / largest residual ‖Ax − b‖/‖b‖ on the full curvature):
    # - tests/reference.py, 13 + 11 examples, loaders of 4 and 7 (so all examples): 1.000000 / 7e-15 / 7e-15 in
    #   both modes; mini-batches of 8 instead (the old default with loaders of 8): 0.9997 / 2.7e-2 / 3.5e-2;
    # - a 10-16-5 MLP on 2000 examples, loader 250: 0.99999 / 5.0e-3 / 7.0e-3 (128: 1.0e-2 / 1.4e-2;
    #   32: 2.2e-2 / 3.5e-2; 8: 6.0e-2 / 8.3e-2: the error falls as 1/√batch);
    # - a two-stage MLP (fixed), 1500 + 800 examples, loader 64: 0.99999 / 4.6e-3 / 6.4e-3 (128: 8.2e-3 / 1.3e-2);
    # - an ill-conditioned one (updated, κ ≈ 600), 2000 + 1200, loader 100: 0.984 / 0.18 / 2.3e-2, and with all
    #   examples 0.995 / 0.11 / 1.2e-2: 1000 terms are too few there whatever the batch, and LiSSA warns.
    # 512 keeps the residual under lissa_tol where the series converges, at 512 examples' products per term.
    lissa_seed: int = 0  # lissa: seed of the mini-batch draws (repeat r uses lissa_seed + r)
    lissa_tol: float = 1e-2  # lissa: warn when the measured ‖Ax − b‖/‖b‖ on the full curvature exceeds it

    def __post_init__(self) -> None:
        positive_int(self, "lissa_depth", "lissa_repeats")
        positive_number(self, "lissa_scale", optional=True)
        positive_number(self, "lissa_tol")
        check_int("lissa_batch_size", self.lissa_batch_size, optional=True)
        check_int("lissa_seed", self.lissa_seed, minimum=0)


def power_max_eig(op: Curvature, like: torch.Tensor, iters: int = 30) -> float:
    """Largest eigenvalue magnitude of ``op`` by power iteration from a fixed start."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(op.dim, generator=g, dtype=like.dtype).to(like.device)[None]
    lam = 0.0
    for _ in range(iters):
        w = op.matmat(v / v.norm())
        lam = float((w * (v / v.norm())).sum())
        v = w
    return abs(lam)


@register_solver
class LissaSolver(Solver):
    name = "lissa"
    Options = LissaOptions

    def steps(self, options: LissaOptions) -> int:
        return options.lissa_depth * options.lissa_repeats

    def run(self, op: Curvature, rhs: torch.Tensor, options: LissaOptions,
            progress: Optional[Any]) -> Tuple[torch.Tensor, Info]:
        scale = options.lissa_scale or 1.2 * power_max_eig(op, rhs)
        examples = op.examples
        n = len(examples)
        batch = min(n, options.lissa_batch_size or n)
        depth = options.lissa_depth
        acc = torch.zeros_like(rhs)
        # Mini-batch curvature makes the iterates fluctuate around the solution: average the second half.
        tail = depth // 2 if batch < n else depth - 1
        b_norm = rhs.norm()
        last_change = 0.0
        for rep in range(options.lissa_repeats):
            g = torch.Generator().manual_seed(options.lissa_seed + rep)
            h, tail_sum = rhs.clone(), torch.zeros_like(rhs)
            for t in range(depth):
                if batch >= n:
                    sample = op
                else:
                    sample = op.restricted([examples[i] for i in torch.randperm(n, generator=g)[:batch].tolist()])
                new = rhs + h - sample.matmat(h) / scale
                norm = new.norm()
                if not math.isfinite(norm.item()) or norm > 1e6 * b_norm:
                    raise MSIFError(
                        f"LiSSA diverged on the {op.role} Hessian at step {t} (‖h‖ = {norm.item():.3g}, "
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
            acc += tail_sum / (depth - tail) / scale
        x = acc / options.lissa_repeats
        b_rows = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
        residual = ((op.matmat(x) - rhs).norm(dim=1) / b_rows).max().item()  # full operator: mini-batch noise included
        if residual > options.lissa_tol:
            warnings.warn(
                f"LiSSA on the {op.role} Hessian ({depth} terms × {options.lissa_repeats} repeats, curvature "
                f"mini-batches of {batch} of {n} examples) stopped at largest relative residual ‖Ax − b‖/‖b‖ = "
                f"{residual:.3g} > lissa_tol={options.lissa_tol}. Raise lissa_depth (terms), lissa_batch_size "
                "or lissa_repeats (less mini-batch noise), or damping; or use solver='cg'.",
                stacklevel=4,
            )
        return x, {"scale": scale, "depth": depth, "batch_size": batch, "last_relative_change": last_change,
                   "relative_residual": residual, "converged": residual <= options.lissa_tol}
