"""What ``curvature="auto"`` and ``solver="auto"`` choose, and why (the reason goes into the run record).

- Curvature: the exact Hessian for a stage small enough for a dense solve whose model supports
  reverse-over-reverse autodiff under ``vmap`` (checked on one batch); EK-FAC otherwise, which needs
  first-order quantities only (fused attention kernels, ``.item()`` in a forward, any size).
- Solver: the curvature's closed-form inverse when it has one (``direct``), a dense ``exact`` solve up to
  ``max_dense_params``, block conjugate gradient above.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch.func import grad, vjp, vmap

from .comm import Communicator
from .curvature.base import Curvature
from .objective import Objective
from .params import ParamSpace
from .scoring import agreed

AUTO_HESSIAN_MAX_PARAMS = 5_000
"""Above this many parameters in a stage, ``auto`` takes EK-FAC: a dense float64 Hessian of 5,000 parameters
is 200 MB and solves in seconds on a CPU; CG on an exact Hessian away from a minimum is not reliable."""


def _hessian_runs(obj: Objective, space: ParamSpace, indices: Sequence[int]) -> Tuple[bool, str]:
    """One vectorised Hessian-vector product on the first batch, as ``HessianCurvature`` computes it."""
    batch, _ = next(obj.batches(list(indices[: obj.source.batch_size]), shard=False))  # also checks the losses
    try:
        base = {n: obj.params[n] for n in space.names}
        _, pullback = vjp(grad(lambda p: obj.losses(p, batch).sum()), base)
        vmap(lambda v: pullback(space.unflatten(v)))(torch.zeros(1, space.dim, device=obj.device, dtype=obj.dtype))
    except (RuntimeError, NotImplementedError) as err:
        return False, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return True, ""


def choose_curvature(obj: Objective, space: ParamSpace, indices: Sequence[int], comm: Communicator) -> Tuple[str, str]:
    """``(curvature name, why)`` for one stage; every rank takes the same decision."""
    if space.dim > AUTO_HESSIAN_MAX_PARAMS:
        return "ekfac", f"{space.dim} parameters > {AUTO_HESSIAN_MAX_PARAMS}: Kronecker-factored Fisher (EK-FAC)"
    ok, why = _hessian_runs(obj, space, indices) if len(indices) else (True, "")
    if not agreed(comm, ok):
        return "ekfac", f"the model does not support reverse-over-reverse autodiff under vmap ({why or 'on a rank'})"
    return "hessian", f"{space.dim} parameters ≤ {AUTO_HESSIAN_MAX_PARAMS}: exact Hessian"


def choose_solver(op: Curvature, max_dense_params: int) -> Tuple[str, str]:
    """``(solver name, why)`` for a built curvature."""
    if callable(getattr(op, "inverse_matmat", None)):
        return "direct", f"{op.name} has a closed-form inverse"
    if op.dim <= max_dense_params:
        return "exact", f"{op.dim} parameters ≤ max_dense_params={max_dense_params}: dense solve"
    return "block_cg", f"{op.dim} parameters > max_dense_params={max_dense_params}: block conjugate gradient"
