"""Kronecker-structured projections of per-example gradients: what a gradient index keeps.

A Kronecker layer's per-example gradient ``G = Σ_t g_t ã_tᵀ`` (``[out, in']``, ``core/kronecker.py``) becomes
``P_out G P_inᵀ`` (``[k_out, k_in]``), formed as ``Σ_t (P_out g_t)(P_in ã_t)ᵀ`` where that is cheaper, so the full
gradient is never materialised. A side no longer than ``k`` is kept whole, so with ``k`` at least every side the
projection is exact. The two kinds of ``P``:

- ``random``: seeded Gaussian entries of variance ``1/k``, the two sides drawn independently, so ``E[Pᵀ P] = I``
  and ``E⟨P_o G P_iᵀ, P_o S P_iᵀ⟩ = ⟨G, S⟩`` for any fixed ``G`` and ``S``: an unbiased estimate of every inner
  product, with a variance that falls as ``1/k``. The draws depend only on the seed, the parameter names and
  the sizes: any process, device or run draws the same matrices.
- ``eigen``: the leading ``k`` eigenvectors of each of the layer's Kronecker factors (from the curvature that
  balances the projection, below): deterministic, and keeps the directions where the gradients carry most energy.

Before projecting, the gradients may be *balanced* by a Kronecker-factored ``W ≈ (C + λI)^(-1/2)`` (and vectors by
``W⁻¹``), which keeps every inner product and makes its projection far more accurate (docs/math.md). An
embedding's vocabulary side is random (the rows of the tokens used); parameters outside a Kronecker layer (norm
affine, leftovers) are projected one parameter at a time by a dense ``[k², numel]`` Gaussian (whole when smaller).
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import MSIFError
from .data import batch_size_of
from .kronecker import Block, embedding_rows, sandwiched_grads
from .layers import KRONECKER_KINDS, Call, Capture
from .objective import Objective
from .params import Params, ParamSpace

KINDS = ("eigen", "random")
Balance = Dict[str, Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor], torch.Tensor]]


def _gaussian(seed: int, what: str, size: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """``[size, k]`` (a projection's transpose), entries N(0, 1/k); the identity when ``k ≥ size``."""
    if k >= size:
        return torch.eye(size, dtype=like.dtype, device=like.device)
    stream = int(hashlib.sha256(f"{seed}/{what}".encode()).hexdigest()[:15], 16)
    g = torch.Generator().manual_seed(stream)
    return (torch.randn(size, k, generator=g, dtype=torch.float64) / k ** 0.5).to(like.device, like.dtype)


def _side(p_t: torch.Tensor, basis: Optional[torch.Tensor], scale: Optional[torch.Tensor],
          power: float) -> torch.Tensor:
    """``W^power p_t`` for ``W = basis diag(scale) basisᵀ`` (no basis: the identity one; no scale: ``W = I``)."""
    if scale is None:
        return p_t
    d = scale.to(p_t.dtype).clamp_min(torch.finfo(p_t.dtype).tiny).pow(power)[:, None]
    if basis is None:
        return d * p_t
    basis = basis.to(p_t.dtype)
    return basis @ (d * (basis.T @ p_t))


def _leading(basis: torch.Tensor, scale: torch.Tensor, k: int, fallback: torch.Tensor) -> torch.Tensor:
    """The ``k`` columns of an orthonormal ``basis`` with the largest ``scale`` (all of them: ``fallback``)."""
    if k >= basis.shape[1]:
        return fallback
    return basis[:, torch.argsort(scale, descending=True)[:k]].to(fallback.dtype)


def _size(block: Block) -> int:
    """The number of projected coordinates of a block."""
    return block.q_a.shape[1] * (block.q_s.shape[1] if block.q_s is not None else 1)


class Projection:
    """The projection of the gradients over ``space`` of one model: ``dim`` per side of each layer, ``seed``.

    ``balance`` (``EKFACCurvature.balance()``): a change of basis ``W ≈ (C + λI)^(-1/2)``, Kronecker-factored per
    layer, applied before projecting: examples' gradients become ``P W g`` and vectors ``P W⁻¹ v``, so their
    inner product is still ``gᵀ v`` on average (exactly, at full dimension) but the two sides are of similar size:
    a score ``gᵀ (C + λI)⁻¹ u`` is no longer the small difference of large projected terms, and its projection
    error is far smaller. ``kind="eigen"`` (with a balance) projects each Kronecker layer onto the leading ``dim``
    eigenvectors of each of its factors instead of random directions: deterministic, exact at full dimension, and
    it keeps the directions where the gradients carry most of their energy (an embedding's vocabulary side and the
    other parameters stay random). ``duals`` (from a stored index) replace the vectors' side matrices;
    ``balanced`` then says whether they were balanced.
    """

    def __init__(self, objective: Objective, space: ParamSpace, dim: int, seed: int = 0,
                 balance: Optional[Balance] = None, duals: Optional[Dict[str, torch.Tensor]] = None,
                 balanced: Optional[bool] = None, kind: str = "eigen"):
        if kind not in KINDS:
            raise MSIFError(f"The projection must be one of {list(KINDS)}, got {kind!r}.")
        self.obj, self.space, self.dim, self.seed = objective, space, dim, seed
        self.kind = kind if balance is not None or duals is not None else "random"  # eigen needs a curvature
        self.balanced = balance is not None if balanced is None else balanced
        balance = balance or {}
        like = next(iter(objective.params.values()))
        lmap = objective.layer_map(space)
        shapes = dict(zip(space.names, space.shapes))
        parts: List[Tuple[Block, torch.Tensor, Optional[torch.Tensor]]] = []  # (example side, dual q_a, dual q_s)
        covered = set()
        for layer in lmap.layers:
            if layer.kind in KRONECKER_KINDS and layer.weight is not None:
                block = Block("kronecker", tuple(layer.names), layer)
                rows, cols = block.matrix({n: torch.zeros(1, *shapes[n]) for n in layer.names}).shape[1:]
            elif layer.kind == "embedding":
                block = Block("embedding", (layer.weight,), layer)
                rows, cols = shapes[layer.weight]
            else:
                continue
            q_s, r, q_a, c = balance.get(block.names[0], (None, None, None, None))
            if r is not None and (r.numel() != rows or c.numel() != cols):  # e.g. a layer K-FAC saw no data reach
                q_s, r, q_a, c = None, None, None, None
            p_rows = _gaussian(seed, f"{layer.weight}/rows", rows, dim, like)
            p_cols = _gaussian(seed, f"{layer.weight}/columns", cols, dim, like)
            if kind == "eigen" and block.kind == "kronecker" and q_s is not None:  # the leading eigenvectors
                p_rows = _leading(q_s, r, dim, p_rows)
                p_cols = _leading(q_a, c, dim, p_cols)
            if block.kind == "kronecker":
                block.q_s, block.q_a = _side(p_rows, q_s, r, -0.5), _side(p_cols, q_a, c, -0.5)
                parts.append((block, _side(p_cols, q_a, c, 0.5), _side(p_rows, q_s, r, 0.5)))
            else:  # the vocabulary side as q_a (rows picked by token id), the width as q_s
                block.q_a, block.q_s = _side(p_rows, q_s, r, -0.5), _side(p_cols, q_a, c, -0.5)
                parts.append((block, _side(p_rows, q_s, r, 0.5), _side(p_cols, q_a, c, 0.5)))
            covered.update(layer.names)
        for name in space.names:  # one dense projection per remaining parameter
            if name not in covered:
                _, r, _, _ = balance.get(name, (None, None, None, None))
                r = r if r is not None and r.numel() == shapes[name].numel() else None
                p = _gaussian(seed, name, shapes[name].numel(), dim * dim, like)
                parts.append((Block("diagonal", (name,), q_a=_side(p, None, r, -0.5)), _side(p, None, r, 0.5), None))
        order = {n: i for i, n in enumerate(space.names)}
        parts.sort(key=lambda part: order[part[0].names[0]])
        self.parts = [part[0] for part in parts]
        self.duals = {f"{i}.{side}": t for i, part in enumerate(parts) for side, t in (("a", part[1]), ("s", part[2]))
                      if t is not None}
        if duals is not None:
            if {k: tuple(v.shape) for k, v in duals.items()} != {k: tuple(v.shape) for k, v in self.duals.items()}:
                raise MSIFError("The gradient index was captured for other parameters or layers than this model's "
                                "(its stored projection does not fit them): capture it again from this model.")
            self.duals = {k: v.to(like.device, like.dtype) for k, v in duals.items()}
        self.others = [b.names[0] for b in self.parts if b.kind == "diagonal"]
        self.out_dim = sum(_size(b) for b in self.parts)

    def describe(self) -> Dict[str, Any]:
        """What defines the projection (for an index's manifest and the run record)."""
        return {"kind": self.kind, "seed": self.seed, "dim": self.dim, "out_dim": self.out_dim,
                "balanced": self.balanced,
                "names": list(self.space.names),
                "blocks": [{"kind": b.kind, "names": list(b.names), "size": _size(b)} for b in self.parts]}

    def vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[m, dim_space] → [m, out_dim]``: vectors in the parameter space (e.g. the solved queries), projected
        (with ``W⁻¹`` when balanced)."""
        params = self.space.unflatten(vectors)
        out = []
        for i, b in enumerate(self.parts):
            m = b.matrix(params)
            d_a, d_s = self.duals[f"{i}.a"], self.duals.get(f"{i}.s")
            if b.kind == "kronecker":
                m = d_s.T @ m @ d_a
            elif b.kind == "embedding":
                m = d_a.T @ m @ d_s
            else:
                m = m @ d_a
            out.append(m.reshape(m.shape[0], -1))
        return torch.cat(out, 1)

    def examples(self, batch: Any, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, out_dim]``: each example's loss gradient, projected, from one hooked backward pass."""
        capture, grads = self.obj.hooked_grads(self.space, batch, self.others, idx=idx)
        return self.project(capture, grads, batch_size_of(batch))

    def project(self, capture: Capture, grads: Params, batch_size: int) -> torch.Tensor:
        """``[B, out_dim]`` from a backward pass's hooks (``capture``) and the per-example gradients of the
        parameters outside the Kronecker layers (``grads``, keyed by ``others``)."""
        out = []
        for b in self.parts:
            calls = capture.calls.get(b.layer.path, []) if b.layer is not None else []
            if b.kind == "kronecker":
                m = sandwiched_grads(b, calls)
            elif b.kind == "embedding":
                m = _embedding(b, calls)
            else:
                m = b.matrix(grads) @ b.q_a
            if m is None:  # this batch never reached the layer
                m = b.q_a.new_zeros(batch_size, _size(b))
            out.append(m.reshape(m.shape[0], -1))
        return torch.cat(out, 1)


def _embedding(block: Block, calls: List[Call]) -> Optional[torch.Tensor]:
    """``[B, k_V, k_D]``: ``Σ_t P_V[:, id_t] (P_D g_t)ᵀ`` per example."""
    total = None
    for call in calls:
        if call.grad is not None:
            rows, g = embedding_rows(block.layer, call, block.q_a)
            m = torch.bmm(rows.transpose(1, 2), g @ block.q_s)
            total = m if total is None else total + m
    return total
