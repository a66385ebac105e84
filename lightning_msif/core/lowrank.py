"""Low-rank queries: the scoring pass without forming any example's full gradient, for many queries at once.

Each solved query vector ``s_j`` is, on a Kronecker layer, a matrix ``S_j`` (``[out, in']``, ``core/kronecker.py``);
its best rank-``r`` approximation ``Σ_i σ_i u_i v_iᵀ`` (truncated SVD) turns the layer's part of the score into
``Σ_i σ_i Σ_t (u_iᵀ g_t)(v_iᵀ ã_t)``: two thin products per position instead of the example's ``out × in'``
gradient, so ``k`` queries cost ``k·r·(out + in')`` per position. Where forming the example's gradient costs less
than that (few positions, many queries) the layer is scored exactly instead, so the pass never costs more than
the exact one. An embedding's ``[V, D]`` block by its factors too (the vocabulary side by token id). Other
parameters (norm affine, leftovers) are scored exactly from their per-example gradients. With ``r`` at least
``min(out, in')`` of every layer the scores are exact.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch

from .data import batch_size_of
from .kronecker import Block, diagonal_tokens, embedding_rows
from .layers import KRONECKER_KINDS, example_grads
from .objective import Objective
from .params import ParamSpace


def _factors(m: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[k, a, b]`` → ``(left [a, k·r], right [b, k·r])``: each matrix's leading ``r`` singular pairs, ``σ`` folded
    into ``left``; from the eigendecomposition of the smaller Gram matrix (float64), far cheaper than an SVD of
    many wide matrices."""
    k, a, b = m.shape
    r = min(rank, a, b)
    wide = a <= b
    x = (m if wide else m.transpose(1, 2)).double()  # [k, short, long]
    vals, vecs = torch.linalg.eigh(x @ x.transpose(1, 2))  # ascending
    vecs = vecs[:, :, -r:].flip(-1)  # [k, short, r]: the leading left singular vectors
    sv = vals[:, -r:].flip(-1).clamp_min(0).sqrt()
    other = (x.transpose(1, 2) @ vecs) / sv.clamp_min(torch.finfo(torch.float64).tiny)[:, None, :]  # [k, long, r]
    u, v = (vecs * sv[:, None, :], other) if wide else (other * sv[:, None, :], vecs)
    left = u.permute(1, 0, 2).reshape(a, k * r).to(m.dtype)
    right = v.permute(1, 0, 2).reshape(b, k * r).to(m.dtype)
    return left, right


class LowRankQueries:
    """The queries ``vectors [k, dim]`` over ``space``, factored to rank ``rank`` per layer, and their scores
    ``∇ℓ(z_b) · vectors[j]`` for a batch of examples from one hooked backward pass."""

    def __init__(self, objective: Objective, space: ParamSpace, vectors: torch.Tensor, rank: int):
        self.obj, self.space, self.k, self.dtype = objective, space, vectors.shape[0], vectors.dtype
        params = space.unflatten(vectors)
        self.parts: List[Tuple[Block, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (block, full, left, right)
        covered = set()
        for layer in objective.layer_map(space).layers:
            if layer.kind in KRONECKER_KINDS and layer.weight is not None:
                block = Block("kronecker", tuple(layer.names), layer)
            elif layer.kind == "embedding":
                block = Block("embedding", (layer.weight,), layer)
            else:
                continue
            full = block.matrix(params)
            self.parts.append((block, full, *_factors(full, rank)))
            covered.update(layer.names)
        self.others = [n for n in space.names if n not in covered]
        self.other_vectors = {n: params[n].reshape(self.k, -1) for n in self.others}

    def scores(self, batch: Any) -> torch.Tensor:
        """``[B, k]``."""
        capture, grads = self.obj.hooked_grads(self.space, batch, self.others)
        b = batch_size_of(batch)
        out = torch.zeros(b, self.k, device=self.obj.device, dtype=self.dtype)
        for block, full, left, right in self.parts:
            r = left.shape[1] // self.k
            for call in capture.calls.get(block.layer.path, []):
                if call.grad is None:
                    continue
                if not _thin_is_cheaper(call, full, left.shape[1], block.kind == "embedding"):
                    whole = block.matrix(example_grads(block.layer, [call]))  # score it exactly: cheaper here
                    out += whole.reshape(b, -1) @ full.reshape(self.k, -1).T
                elif block.kind == "embedding":
                    rows, g = embedding_rows(block.layer, call, left)
                    out += (rows * (g @ right)).sum(1).reshape(b, self.k, r).sum(-1)
                else:
                    out += diagonal_tokens(block.layer, call, left, right).reshape(b, self.k, r).sum(-1)
        for name, v in self.other_vectors.items():
            out += grads[name].reshape(b, -1) @ v.T
        return out


def _thin_is_cheaper(call: Any, full: torch.Tensor, columns: int, embedding: bool) -> bool:
    """Whether the thin products of all the queries' factors (``columns`` of them) cost fewer multiplications at
    this call than forming each example's gradient and scoring it exactly with the ``k`` full matrices (an
    embedding's gradient is its positions' output gradients added into their tokens' rows)."""
    k, n_out, n_in = full.shape
    if embedding:  # [V, D]: the token side is a row lookup
        t = call.inputs[0].numel()
        return t * columns * (1 + n_in) < t * n_in + k * n_out * n_in
    t = call.grad[0].numel() // n_out  # positions
    return t * columns * (n_out + n_in) < (t + k) * n_out * n_in
