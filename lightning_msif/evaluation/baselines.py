"""Scores to compare the multi-stage ones against, with the same shape ``[n_pretrain, n_query]`` and sign.

- ``random``: independent standard normal scores (the floor: correlations near 0).
- ``grad_dot``: the multi-stage formula with every Hessian replaced by the identity (up to a positive
  factor in updated mode), i.e. ``−∇_θ f(q_j; finetuned) · ∇_θ ℓ_pt(z_i; pretrained)`` over the shared
  parameters: no curvature.
- ``single_stage``: Koh & Liang on the finetuned model alone, as if it had been trained on the
  pretraining set: ``−∇f(q_j)ᵀ (H + λI)⁻¹ ∇ℓ_pt(z_i)`` over its trainable parameters, with the pretraining
  loss evaluated on the finetuned model (it ignores that the stages have their own heads and optima).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..core.comm import Communicator
from ..core.influence import compute_single_stage, per_example_gradients
from ..core.objective import LossFn
from ..core.params import shared_names
from ..errors import MSIFError


def random_scores(n: int, k: int, seed: int) -> torch.Tensor:
    """``[n, k]`` standard normal scores from a generator seeded with ``seed``."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _columns(grads: torch.Tensor, names: Sequence[str], model: nn.Module, wanted: Sequence[str]) -> torch.Tensor:
    """The columns of the parameters ``wanted``, in that order, from ``[rows, dim]`` gradients over ``names``."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    starts, offset = {}, 0
    for name in names:
        starts[name], offset = offset, offset + sizes[name]
    return torch.cat([grads[:, starts[n] : starts[n] + sizes[n]] for n in wanted], dim=1)


def grad_dot_scores(pretrain_model: nn.Module, finetune_model: nn.Module, pretrain_data: Any, query_data: Any,
                    shared: str, pretrain_loss: LossFn, query_loss: LossFn, comm: Communicator,
                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """``−∇_θ f(q_j) · ∇_θ ℓ_pt(z_i)`` on the shared parameters θ (``[n, k]``)."""
    g_pt, pt_names = per_example_gradients(pretrain_model, pretrain_data, shared=shared, loss_fn=pretrain_loss,
                                           chunk_size=chunk_size, comm=comm)
    g_q, q_names = per_example_gradients(finetune_model, query_data, shared=shared, loss_fn=query_loss,
                                         chunk_size=chunk_size, comm=comm)
    theta = shared_names(pt_names, shared)
    return -(_columns(g_pt, pt_names, pretrain_model, theta) @ _columns(g_q, q_names, finetune_model, theta).T)


def single_stage_scores(finetune_model: nn.Module, pretrain_data: Any, query_data: Any, pretrain_loss: LossFn,
                        query_loss: LossFn, influence: Dict[str, Any]) -> torch.Tensor:
    """Koh & Liang on the finetuned model with the pretraining set as its training set (``[n, k]``).

    ``influence``: keywords of ``compute_single_stage`` (damping, solver and its options, comm, ...).
    """
    try:
        return compute_single_stage(finetune_model, pretrain_data, query_data, loss_fn=pretrain_loss,
                                    query_fn=query_loss, **influence).scores
    except (RuntimeError, ValueError, IndexError) as err:
        if isinstance(err, MSIFError) and err.__cause__ is None:  # a refusal of its own, not the model failing
            raise
        raise MSIFError(
            f"The single_stage baseline evaluates the pretraining loss on the finetuned model, which failed "
            f"here ({type(err).__name__}: {str(err).splitlines()[0]}). It needs both stages to take the same "
            "inputs and give outputs the pretraining loss accepts: leave single_stage out of methods."
        ) from err
