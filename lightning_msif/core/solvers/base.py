"""Linear solvers ``A X = B`` for a curvature A and a block of right-hand sides B ``[k, dim]``.

A solver is a subclass of ``Solver`` with a ``name``, an ``Options`` dataclass (checked in its
``__post_init__``), the curvature methods it ``needs`` beyond ``matmat``, its progress (how many ``steps`` a
solve takes, or the relative residual ``target`` an iterative solve stops at), and ``run``;
``@register_solver`` makes it available everywhere by name.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Tuple

import torch

from ...errors import MSIFError
from ..curvature.base import Curvature
from ..objective import autodiff_refusal, precision_cause
from ..registry import NoOptions, Registry

Info = Dict[str, Any]


class Solver:
    """One way to apply ``A⁻¹`` to a block of vectors."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs: ClassVar[Tuple[str, ...]] = ()  # curvature methods used besides matmat, e.g. ("inverse_matmat",)

    def steps(self, options: Any) -> Optional[int]:
        """Progress-bar length of one solve in steps, each ``progress.update(1)`` (None: no step bar)."""
        return None

    def target(self, options: Any) -> Optional[float]:
        """The relative residual a solve stops at, for a bar in digits of residual gained: ``run`` then calls
        ``progress.residual(value, iterations)`` (a ``core.progress.ResidualProgress``) instead of ``update``."""
        return None

    def supports(self, op: Curvature) -> bool:
        return all(callable(getattr(op, need, None)) for need in self.needs)

    def run(self, op: Curvature, rhs: torch.Tensor, options: Any, progress: Optional[Any]) -> Tuple[torch.Tensor, Info]:
        """``X ≈ A⁻¹ rhs`` and a record of the convergence; ``progress`` (or None) as ``steps``/``target`` say."""
        raise NotImplementedError


SOLVERS: Registry[Solver] = Registry("solver")


def register_solver(cls: type) -> type:
    """Class decorator: register an instance of the ``Solver`` subclass ``cls`` under ``cls.name``."""
    SOLVERS.register(cls())
    return cls


def solve(op: Curvature, rhs: torch.Tensor, solver: str, options: Any,
          progress: Optional[Any] = None) -> Tuple[torch.Tensor, Info]:
    """``X`` with ``op.matmat(X) ≈ rhs`` by the named solver, and a dict describing the convergence."""
    if rhs.shape[0] == 0 or op.dim == 0:
        return torch.zeros_like(rhs), {"solver": solver, "dim": op.dim}
    impl = SOLVERS.get(solver)
    if not impl.supports(op):
        raise MSIFError(
            f"solver={solver!r} needs a curvature with {list(impl.needs)}, which curvature={op.name!r} does not "
            f"provide. Choose a solver from {[s.name for s in SOLVERS if s.supports(op)]} for this curvature."
        )
    try:
        x, info = impl.run(op, rhs, options, progress)
    except NotImplementedError as err:  # a layer without the autodiff this curvature's products need
        refusal = autodiff_refusal(err, op.objective.bound.model, f"curvature={op.name!r}",
                                   "curvature='ekfac' or curvature='kfac' (first-order module hooks only)")
        if refusal is None:
            raise
        raise refusal from err
    if not torch.isfinite(x).all():
        fix = precision_cause(op.objective.dtype) or ("Add damping (damping=1e-3 or more) or check the model for "
                                                      "non-finite weights.")
        raise MSIFError(f"The {solver} solve of the {op.role} Hessian produced NaN/inf. {fix}")
    info.update(solver=solver, dim=op.dim, rhs=rhs.shape[0])
    return x, info
