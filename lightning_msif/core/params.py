"""Parameter selection and flattening.

A ``ParamSpace`` is an ordered list of parameter names with their shapes; it maps between the
``{name: tensor}`` dicts that ``torch.func.functional_call`` takes and the flat vectors the solvers
work on. The shared embedding θ is picked by a name prefix (``"backbone"`` selects
``backbone.*``); the two stages must agree on θ's names and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

from ..errors import MSIFError

Params = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParamSpace:
    """Ordered parameter names and shapes; flat vectors concatenate them in this order."""

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: Params, names: Sequence[str]) -> "ParamSpace":
        return cls(tuple(names), tuple(params[n].shape for n in names))

    @property
    def numels(self) -> List[int]:
        return [s.numel() for s in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.numels)

    def flatten(self, params: Params) -> torch.Tensor:
        """``{name: [..., *shape]}`` → ``[..., dim]`` (leading batch dims are kept)."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = params[name]
            lead = t.shape[: t.dim() - len(shape)]
            parts.append(t.reshape(*lead, shape.numel()))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> Params:
        """``[..., dim]`` → ``{name: [..., *shape]}`` (views where possible)."""
        lead = flat.shape[:-1]
        chunks = torch.split(flat, self.numels, dim=-1)
        return {n: c.reshape(*lead, *s) for n, c, s in zip(self.names, chunks, self.shapes)}


def detached_params(model: nn.Module) -> Params:
    """Every parameter of ``model``, detached (no autograd history, shares storage)."""
    return {n: p.detach() for n, p in model.named_parameters()}


def under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under the module prefix ``prefix`` (``backbone`` → ``backbone.*``)."""
    return name == prefix or name.startswith(prefix + ".")


def shared_names(names: Iterable[str], prefix: str) -> List[str]:
    """The names under ``prefix``, in the given order: the shared embedding θ."""
    return [n for n in names if under(n, prefix)]


def _top_level_prefixes(names: Iterable[str]) -> List[str]:
    return sorted({n.split(".")[0] for n in names})


def split_shared(model: nn.Module, shared: str, role: str) -> Tuple[List[str], List[str]]:
    """(shared names, trainable names outside the prefix) of ``model``.

    Shared parameters count whether or not they are trainable (a frozen backbone is still θ);
    parameters outside the prefix count only when trainable (frozen ones are constants).
    """
    if not isinstance(shared, str) or not shared or shared.endswith("."):
        raise MSIFError(
            f"shared={shared!r} is not a parameter-name prefix: pass the name of the shared module "
            "without a trailing dot, e.g. shared='backbone' for parameters 'backbone.*'."
        )
    named = list(model.named_parameters())
    theta = shared_names((n for n, _ in named), shared)
    if not theta:
        raise MSIFError(
            f"shared={shared!r} matches no parameter of the {role} model. Its top-level modules are "
            f"{_top_level_prefixes(n for n, _ in named)}: pass one of those (the prefix of the shared "
            "embedding, identical in both stages)."
        )
    head = [n for n, p in named if not under(n, shared) and p.requires_grad]
    return theta, head


def check_same_shared(pre: nn.Module, fine: nn.Module, shared: str) -> Tuple[List[str], List[str], List[str]]:
    """θ names (pretraining order), U names, W names; raises if the stages disagree on θ."""
    theta, u = split_shared(pre, shared, "pretraining")
    theta_ft, w = split_shared(fine, shared, "finetune")
    missing, extra = sorted(set(theta) - set(theta_ft)), sorted(set(theta_ft) - set(theta))
    if missing or extra:
        raise MSIFError(
            f"The shared parameters under {shared!r} differ between the stages: missing in the finetune "
            f"model {missing[:5]}, only in the finetune model {extra[:5]}. Both models must hold the same "
            "shared module (same attribute path and architecture)."
        )
    pre_p, ft_p = dict(pre.named_parameters()), dict(fine.named_parameters())
    for n in theta:
        if pre_p[n].shape != ft_p[n].shape:
            raise MSIFError(
                f"Shared parameter {n!r} has shape {tuple(pre_p[n].shape)} in the pretraining model but "
                f"{tuple(ft_p[n].shape)} in the finetune model: the shared embedding must keep its shapes."
            )
    return theta, u, w


def check_fixed_backbone(pre: nn.Module, fine: nn.Module, theta: Sequence[str], atol: float = 0.0) -> None:
    """In fixed mode the finetune model must carry the pretrained θ unchanged."""
    pre_p, ft_p = dict(pre.named_parameters()), dict(fine.named_parameters())
    for n in theta:
        a, b = pre_p[n].detach(), ft_p[n].detach().to(pre_p[n].device, pre_p[n].dtype)
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        if diff > atol:
            raise MSIFError(
                f"mode='fixed' needs the finetune model's shared parameters to equal the pretrained ones, "
                f"but {n!r} differs by up to {diff:.3g}. Freeze the shared module while finetuning "
                "(requires_grad=False), or use mode='updated' with alpha=..."
            )
