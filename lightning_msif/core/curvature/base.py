"""What a solver may ask of a curvature: the ``Curvature`` base class and its registry.

A curvature is a linear operator ``V ↦ (C + diag(shift) + λI) V`` over a set of examples of one
stage, where ``C`` approximates (or is) the Hessian of that stage's mean loss. Solvers see only this
class: ``matmat``, ``dense`` (explicit matrix, small models), ``restricted`` (the same curvature over
other examples: mini-batch sampling), ``examples``, ``dim``, ``damping`` and ``role``
(for messages). A curvature with a closed-form inverse also defines ``inverse_matmat``.

A new curvature is one subclass with a ``name``, an ``Options`` dataclass, ``build`` and ``apply``,
decorated with ``@register_curvature``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import torch

from ...errors import MSIFError
from ..objective import Objective
from ..params import ParamSpace
from ..registry import NoOptions, Registry


@dataclass(frozen=True)
class Curvature:
    """Curvature of ``objective``'s mean loss w.r.t. ``space`` over ``indices``, plus the diagonal terms."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    objective: Objective
    space: ParamSpace
    indices: Sequence[int]
    damping: float = 0.0
    shift: Optional[torch.Tensor] = None  # extra diagonal, e.g. α on the θ coordinates (updated mode)
    options: Any = None

    @classmethod
    def build(cls, objective: Objective, space: ParamSpace, indices: Sequence[int], *, damping: float,
              shift: Optional[torch.Tensor], options: Any) -> "Curvature":
        """The operator for one stage (a subclass may fit factors from the data here)."""
        return cls(objective, space, indices, damping, shift, options)

    def state(self) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
        """What was fitted from the data (tensors, plain metadata), for a snapshot; None when nothing was."""
        return None

    @classmethod
    def from_state(cls, objective: Objective, space: ParamSpace, indices: Sequence[int], *, damping: float,
                   shift: Optional[torch.Tensor], options: Any, tensors: Dict[str, torch.Tensor],
                   meta: Dict[str, Any]) -> Optional["Curvature"]:
        """The curvature rebuilt from ``state()``'s output without touching the data; None if it does not fit."""
        return None

    @classmethod
    def cross_product(cls, objective: Objective, rows: ParamSpace, cols: ParamSpace, vectors: torch.Tensor,
                      indices: Sequence[int], options: Any) -> torch.Tensor:
        """``C[rows, cols] V`` (``[k, cols.dim] → [k, rows.dim]``), an off-diagonal block without damping.

        By default the curvature over ``rows + cols`` times ``[0; V]``; a block-diagonal curvature, which has no
        such block, computes it in its own way.
        """
        both = ParamSpace(rows.names + cols.names, rows.shapes + cols.shapes)
        op = cls.build(objective, both, indices, damping=0.0, shift=None, options=options)
        padded = torch.cat([vectors.new_zeros(vectors.shape[0], rows.dim), vectors], 1)
        return op.matmat(padded)[:, : rows.dim]

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[k, dim] → [k, dim]``: the undamped curvature ``C`` times each row."""
        raise NotImplementedError

    # -- what solvers use --------------------------------------------------------------------------
    @property
    def role(self) -> str:
        return self.objective.role

    @property
    def dim(self) -> int:
        return self.space.dim

    @property
    def examples(self) -> Sequence[int]:
        return self.indices

    def restricted(self, indices: Sequence[int]) -> "Curvature":
        """The same curvature over other examples (a mini-batch)."""
        return replace(self, indices=indices)

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(C + diag(shift) + λI) V`` for ``V = vectors [k, dim]``."""
        out = self.apply(vectors)
        if self.damping:
            out = out + self.damping * vectors
        if self.shift is not None:
            out = out + self.shift * vectors
        return out

    def dense(self, max_params: int) -> torch.Tensor:
        """The explicit ``[dim, dim]`` matrix (symmetrised), for small models: exact solves and tests."""
        p = self.dim
        if p > max_params:
            gb = p * p * 8 / 2**30
            raise MSIFError(
                f"solver='exact' builds a dense {p}×{p} Hessian ({gb:.1f} GiB in float64) for the "
                f"{self.role} stage, over max_dense_params={max_params}. Use solver='cg' (or "
                "'lissa') for a model this size, or raise max_dense_params if the memory is there."
            )
        obj = self.objective
        h = self.matmat(torch.eye(p, device=obj.device, dtype=obj.dtype))  # one pass over the data
        return (h + h.T) / 2


CURVATURES: Registry[type] = Registry("curvature")
register_curvature = CURVATURES.register
