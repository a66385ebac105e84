"""The generalised Gauss-Newton matrix ``G = (1/n) Σ_i J_iᵀ Λ_i J_i`` of a stage's mean loss.

``J_i`` is the Jacobian of example ``i``'s model outputs (``objective.task.outputs``, the logits) in the
parameters, ``Λ_i`` the Hessian of the loss of those outputs (``objective.task.output_loss``; softmax
cross-entropy: ``diag(p) − ppᵀ``). ``G`` drops the Hessian's term in the loss gradient times the outputs'
second derivatives, so it is positive semi-definite wherever the loss is convex in the outputs: CG and
LiSSA apply away from a minimum too. It equals the Hessian for a model linear in its parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch.func import grad, jvp, vjp, vmap

from ...errors import MSIFError
from ..objective import Objective
from ..params import Params, ParamSpace
from .base import Curvature, register_curvature
from .hessian import HessianOptions, rhs_chunk


@register_curvature
@dataclass(frozen=True)
class GaussNewtonCurvature(Curvature):
    """``G V`` by ``Jᵀ (Λ (J V))``: one ``jvp`` and one ``vjp`` of the model, one HVP of the output loss."""

    name = "ggn"
    Options = HessianOptions  # the same option: right-hand sides vectorised at once

    @classmethod
    def build(cls, objective: Objective, space: ParamSpace, indices: Sequence[int], *, damping: float,
              shift: Optional[torch.Tensor], options: Any) -> "GaussNewtonCurvature":
        _check_task_matches_loss(objective, indices)
        return cls(objective, space, indices, damping, shift, options)

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        obj, space = self.objective, self.space
        chunk = rhs_chunk(self, vectors.shape[0])
        base = {n: obj.params[n] for n in space.names}
        total = torch.zeros_like(vectors)
        for batch, _ in obj.batches(self.indices):
            def outputs(p: Params, batch: Any = batch) -> torch.Tensor:
                return obj.outputs(p, batch)  # the other parameters: constants

            out, pull = vjp(outputs, base)  # J at this batch, for Jᵀ u
            loss_grad = grad(lambda o, batch=batch: obj.task.output_loss(o, batch).sum())

            def gv(v: torch.Tensor, outputs: Callable = outputs, out: torch.Tensor = out, pull: Callable = pull,
                   loss_grad: Callable = loss_grad) -> torch.Tensor:
                jv = jvp(outputs, (base,), (space.unflatten(v),))[1]
                lam_jv = jvp(loss_grad, (out.detach(),), (jv,))[1]  # Λ_i (J_i v): block-diagonal per example
                return space.flatten(pull(lam_jv)[0])

            total += vmap(gv, chunk_size=chunk)(vectors)
        total = obj.comm.all_reduce_sum(total) / len(self.indices)
        if not torch.isfinite(total).all():
            raise obj.curvature_refusal("a Gauss-Newton-vector product")
        return total


def _check_task_matches_loss(obj: Objective, indices: Sequence[int]) -> None:
    """The task's loss of the outputs is the objective's loss, on the first batch: else ``G`` is another loss's."""
    batch, idx = next(obj.batches(indices[: obj.source.batch_size], shard=False))
    with torch.no_grad():
        task_loss = obj.task.output_loss(obj.outputs({}, batch), batch)
        loss = obj.losses({}, batch)
    if task_loss.shape == loss.shape:
        bad = ~torch.isclose(task_loss, loss, rtol=1e-4, atol=1e-6).cpu()
    else:
        bad = torch.ones(len(idx), dtype=torch.bool)
    if bad.any():
        raise MSIFError(
            f"curvature='ggn' differentiates the {obj.role} loss as a function of the model's outputs, taken from "
            f"its task ({type(obj.task).__name__}: softmax cross-entropy of the logits unless given), but that "
            f"loss differs from the {obj.role} loss at dataset indices {idx[bad][:5].tolist()}. Use "
            "curvature='hessian' for this loss, or pass task=<a lightning_msif Task> whose output_loss is it."
        )
