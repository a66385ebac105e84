"""A layer's parameters as one matrix, and each example's gradient of it multiplied on both sides, ``Lᵀ G R``.

A Kronecker layer (``Linear``, ``Conv2d``, Hugging Face ``Conv1D``) holds its weight and bias as one matrix
``M = [W | b]`` (``[out, in']``, ``in'`` counting the bias column), an embedding as ``[V, D]``. Each example's
gradient of ``M`` is ``G = Σ_t g_t ã_tᵀ`` over the layer's positions ``t``. Two uses need ``Lᵀ G R`` for every
example: EK-FAC's eigenvalue correction (``L``, ``R`` the Kronecker eigenbases, square) and the gradient index's
projection (``L``, ``R`` tall random matrices that shrink each side). ``sandwiched_grads`` forms it either way
round, whichever needs fewer multiplications: per position (``Σ_t (Lᵀ g_t)(Rᵀ ã_t)ᵀ``; a convolution's
``Rᵀ ã`` by one convolution with ``R``'s columns as filters) or per example (``G`` first, one batched product
per kernel row, then the two products).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .conv import rotated_patches
from .layers import Call, Layer, example_grads, token_grads, token_inputs
from .params import Params


@dataclass
class Block:
    """One diagonal block: a Kronecker layer, an embedding, or a diagonal over parameters; with a basis per side
    (``q_s`` on the rows of the layer's matrix, ``q_a`` on its columns) and one value per coordinate (``eig``)."""

    kind: str  # "kronecker" | "embedding" | "diagonal"
    names: Tuple[str, ...]
    layer: Optional[Layer] = None
    q_a: Optional[torch.Tensor] = None  # [in', k_in] (kronecker)
    q_s: Optional[torch.Tensor] = None  # [out, k_out] (kronecker), [D, k] (embedding)
    eig: Optional[torch.Tensor] = None  # [out, in'] | [V, D] | [numel]

    # -- parameters ↔ the block's matrix -------------------------------------------------------------------
    def matrix(self, parts: Params) -> torch.Tensor:
        """``{name: [k, *shape]}`` → ``[k, out, in']`` (kronecker), ``[k, V, D]`` (embedding), ``[k, numel]``."""
        if self.kind == "diagonal":
            return torch.cat([parts[n].flatten(1) for n in self.names], 1)
        layer = self.layer
        assert layer is not None
        if self.kind == "embedding":
            return parts[layer.weight]
        w = parts[layer.weight]
        w = w.transpose(1, 2) if layer.kind == "conv1d" else w.flatten(2)
        return torch.cat([w, parts[layer.bias].unsqueeze(-1)], 2) if layer.bias is not None else w

    def parts(self, m: torch.Tensor, shapes: Dict[str, torch.Size]) -> Params:
        """The inverse of ``matrix``."""
        if self.kind == "diagonal":
            sizes = [shapes[n].numel() for n in self.names]
            return {n: c.reshape(m.shape[0], *shapes[n]) for n, c in zip(self.names, torch.split(m, sizes, 1))}
        layer = self.layer
        assert layer is not None
        if self.kind == "embedding":
            return {layer.weight: m}
        out: Params = {}
        if layer.bias is not None:
            m, out[layer.bias] = m[..., :-1], m[..., -1]
        w = m.transpose(1, 2) if layer.kind == "conv1d" else m
        out[layer.weight] = w.reshape(m.shape[0], *shapes[layer.weight])
        return out

    def rotate(self, m: torch.Tensor) -> torch.Tensor:
        """Into the block's bases: ``q_sᵀ M q_a`` (kronecker), ``M q_s`` (embedding)."""
        if self.kind == "kronecker":
            return self.q_s.T @ m @ self.q_a
        if self.kind == "embedding":
            return m @ self.q_s
        return m

    def unrotate(self, m: torch.Tensor) -> torch.Tensor:
        if self.kind == "kronecker":
            return self.q_s @ m @ self.q_a.T
        if self.kind == "embedding":
            return m @ self.q_s.T
        return m


def tokens_first(block: Block, call: Call) -> bool:
    """Whether multiplying each position's input and output gradient before summing over the positions costs
    fewer products than forming each example's gradient first and multiplying that."""
    g = token_grads(block.layer, call)
    t, n_out, n_in = g.shape[1], g.shape[2], block.q_a.shape[0]
    k_out, k_in = block.q_s.shape[1], block.q_a.shape[1]
    per_position = t * (n_out * k_out + n_in * k_in)  # then one [k_out, T] × [T, k_in] product per example
    per_example = t * n_out * n_in + n_out * n_in * k_in + k_out * n_out * k_in
    return per_position < per_example


def sandwiched_tokens(block: Block, call: Call) -> torch.Tensor:
    """``[B, k_out, k_in]``: ``Σ_t (q_sᵀ g_t)(q_aᵀ ã_t)ᵀ`` per example (a convolution's ``q_aᵀ ã`` by convolution)."""
    layer, q_a = block.layer, block.q_a
    bias = layer.bias is not None
    if layer.kind == "conv2d":
        a = rotated_patches(layer.module, call.inputs, q_a, bias).transpose(1, 2)  # [B, L, k_in]
        return torch.bmm(block.q_s.T @ call.grad.flatten(2), a)
    a = token_inputs(layer, call)
    a = a @ q_a[:-1] + q_a[-1] if bias else a @ q_a
    return torch.bmm((token_grads(layer, call) @ block.q_s).transpose(1, 2), a)


def sandwiched_grads(block: Block, calls: Sequence[Call]) -> Optional[torch.Tensor]:
    """``[B, k_out, k_in]``: each example's gradient of a Kronecker layer, ``q_sᵀ G q_a`` (summed over the layer's
    calls), in whichever order of products is cheaper for each call's sizes; None when no call has a gradient."""
    first, rest = [], []
    for call in calls:
        if call.grad is not None:
            (first if tokens_first(block, call) else rest).append(call)
    total = block.rotate(block.matrix(example_grads(block.layer, rest))) if rest else None
    for call in first:
        m = sandwiched_tokens(block, call)
        total = m if total is None else total + m
    return total


def diagonal_tokens(layer: Layer, call: Call, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``[B, m]``: ``Σ_t (left_iᵀ g_t)(right_iᵀ ã_t)`` for each of the ``m`` column pairs, i.e. ``⟨G, left_i right_iᵀ⟩``
    for each example's gradient ``G`` of a Kronecker layer, without forming ``G`` (a convolution's ``right_iᵀ ã`` by
    one convolution)."""
    bias = layer.bias is not None
    if layer.kind == "conv2d":
        a = rotated_patches(layer.module, call.inputs, right, bias)  # [B, m, L]
        return (a * (left.T @ call.grad.flatten(2))).sum(-1)
    a = token_inputs(layer, call)
    a = a @ right[:-1] + right[-1] if bias else a @ right
    return (a * (token_grads(layer, call) @ left)).sum(1)


def embedding_rows(layer: Layer, call: Call, table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(table[id_t] [B, T, m], g_t [B, T, D])`` of an embedding call: a matrix's rows picked by each position's
    token (zero for the padding token, which has no gradient) and the gradient at each position's output."""
    ids = call.inputs.reshape(call.inputs.shape[0], -1)
    rows = table[ids]
    if layer.module.padding_idx is not None:
        rows = rows * (ids != layer.module.padding_idx).unsqueeze(-1).to(rows.dtype)
    return rows, call.grad.reshape(ids.shape[0], ids.shape[1], -1)
