"""The precision the influence computation runs in, whatever precision the models were trained in.

Curvature fits, solves and scores need at least float32: a model trained in bfloat16/float16 is computed on a
float32 copy of its weights (widened exactly, the trained model is left alone); a float64 model stays float64.
The two stages of a run are computed in one dtype, the finetune model's (``scoring_pair``).
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn


def floating_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the module's first floating-point parameter (None when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a model trained in ``dtype`` is computed in: float64 stays, anything narrower becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_compute_dtype(module: nn.Module, like: Optional[nn.Module] = None) -> nn.Module:
    """``module`` in the compute dtype of ``like`` (default: of itself); a cast copy when its floating parameters
    are in another dtype, so the model being trained or reported on keeps its own weights and dtype."""
    trained = floating_dtype(like if like is not None else module)
    if trained is None or len({p.dtype for p in module.parameters() if p.is_floating_point()}) > 1:
        return module  # a model mixing dtypes is refused by its objective, which names its role
    target = compute_dtype(trained)
    if all(p.dtype == target for p in module.parameters() if p.is_floating_point()):
        return module
    return copy.deepcopy(module).to(target)


def follow(compute: nn.Module, module: nn.Module) -> None:
    """Bring ``compute``, a compute-dtype copy of ``module`` (``in_compute_dtype``), to ``module``'s current parameters,
    buffers (widened exactly) and train/eval modes: a copy taken before training goes on standing for the module
    being trained. Nothing to do when they are one module."""
    if compute is module:
        return
    with torch.no_grad():
        for mine, theirs in zip(compute.modules(), module.modules()):
            mine.training = theirs.training
            for name, t in [*theirs.named_parameters(recurse=False), *theirs.named_buffers(recurse=False)]:
                getattr(mine, name).copy_(t)


def scoring_pair(pretrain_model: nn.Module, finetune_model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """Both stages' models in the finetune model's compute dtype (a pretraining model in another dtype would mix
    float32 and float64, or bfloat16, in the products of the two stages)."""
    return in_compute_dtype(pretrain_model, like=finetune_model), in_compute_dtype(finetune_model)
