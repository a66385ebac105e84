"""K-FAC and EK-FAC: Kronecker-factored Fisher curvature from first-order quantities, with a closed-form inverse.

Each covered layer's block of the Fisher ``F = E[g gᵀ]`` (``g`` a per-example loss gradient) is
approximated by a Kronecker product ``Ā ⊗ S̄`` of the covariance of the layer's inputs (``Ā``, with a 1
appended when its bias is included) and of the gradients at its outputs (``S̄``), caught with module
hooks in one ordinary forward/backward pass over the data: no forward-mode AD and no double backward,
so any attention kernel and autocast work. With ``T`` positions per example (tokens, pixels),
``Ā = E[Σ_t a aᵀ] / T̄`` and ``S̄ = E[Σ_t g gᵀ]``.

- ``kfac``: eigenvalues of the block are the products of the factors' eigenvalues.
- ``ekfac``: the eigenvalues are re-fitted in the Kronecker eigenbasis, ``Λ = E[(Q_Sᵀ G Q_A)²]`` with ``G``
  each example's gradient of the layer (a second pass): the best diagonal fit in that basis. The factors serve
  only for their eigenbases, so they come from ``basis_examples`` evenly spaced examples (2,048 by default);
  the eigenvalues and the diagonal blocks come from every example.
- ``nn.Embedding``: ``Ā`` is diagonal (token counts), so the basis is the identity on the vocabulary.
- Norm affine parameters, a bias whose weight is not trained, and leftovers (parameters no hook covers):
  diagonal blocks ``E[g²]`` from exact per-example gradients.

The Fisher is the *true* one by default (labels drawn from the model's own predictive distribution, per
example from its dataset index), or the *empirical* one (the data's labels). Sums are accumulated in
``covariance_dtype`` and all-reduced over ranks; eigendecompositions are in float64. Damping per block:
``λ`` (+ α on the shared layers in updated mode: the ``shift``), plus ``relative_damping`` × the block's
mean eigenvalue (by default 0.1 when λ = 0, else none). Blocks never couple two layers; ``cross_product``
gives the Fisher cross block between two parameter sets (the fixed mode's ``H_θW``) from per-example
gradients, in closed form over the model's labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ...errors import MSIFError
from ..data import batch_size_of, slice_batch
from ..kronecker import Block, sandwiched_grads
from ..layers import KRONECKER_KINDS, Call, Layer, example_grads, token_grads, token_inputs
from ..objective import Objective
from ..params import Params, ParamSpace
from ..registry import check_float, check_int
from .base import Curvature, register_curvature
from ..conv import bordered, patch_moment

FISHERS = ("true", "empirical")
EXACT_LABELS = 32  # the Fisher cross block sums over the labels in closed form up to this many classes
HEURISTIC_DAMPING = 0.1
"""With no damping given (λ = 0), each block is damped by this × its mean eigenvalue: an unconverged model's
Fisher has (near-)zero eigenvalues, e.g. vocabulary rows no example uses. kronfluence uses the same heuristic."""
DTYPES = {"float32": torch.float32, "float64": torch.float64}
BASIS_EXAMPLES = 2048
"""EK-FAC fits the Kronecker factors, whose only use is their eigenbases, on this many examples (evenly spaced over
the data) and its eigenvalues on all of them: one full pass instead of two once the data is much larger."""


@dataclass(frozen=True)
class KFACOptions:
    fisher: str = "true"  # true: labels sampled from the model | empirical: the data's labels
    relative_damping: Optional[float] = None  # extra damping per block, × its mean eigenvalue (None: 0.1 when λ = 0)
    covariance_dtype: str = "float64"  # float32 | float64: accumulation of the covariances and eigenvalues
    fisher_seed: int = 0  # seed of the sampled labels (each example's draw depends on it and its index)
    basis_examples: Optional[int] = BASIS_EXAMPLES  # EK-FAC: eigenbases from this many examples (None: all)

    def __post_init__(self) -> None:
        if self.fisher not in FISHERS:
            raise MSIFError(f"fisher={self.fisher!r} is not allowed; choose one of {list(FISHERS)}.")
        if self.covariance_dtype not in DTYPES:
            raise MSIFError(f"covariance_dtype={self.covariance_dtype!r} is not allowed; choose one of {list(DTYPES)}.")
        check_float("relative_damping", self.relative_damping, strict=False, optional=True)
        check_int("fisher_seed", self.fisher_seed, minimum=0)
        if self.basis_examples is not None and not (isinstance(self.basis_examples, int)
                                                     and not isinstance(self.basis_examples, bool)
                                                     and self.basis_examples > 0):
            raise MSIFError(f"basis_examples must be a whole number > 0 (or None for all examples), got "
                            f"{self.basis_examples!r}.")


class KFACFit:
    """The blocks of one curvature fit, and the passes over the data that fill them."""

    def __init__(self, objective: Objective, space: ParamSpace, options: KFACOptions):
        self.obj, self.space, self.options = objective, space, options
        self.dtype = DTYPES[options.covariance_dtype]
        self.lmap = objective.layer_map(space)
        self.blocks: List[Block] = []
        diagonal: List[str] = list(self.lmap.leftover)
        for layer in self.lmap.layers:
            if layer.kind in KRONECKER_KINDS and layer.weight is not None:
                self.blocks.append(Block("kronecker", tuple(layer.names), layer))
            elif layer.kind == "embedding":
                self.blocks.append(Block("embedding", (layer.weight,), layer))
            else:  # norm affine, or a bias whose weight is not in the space
                diagonal.extend(layer.names)
        order = {n: i for i, n in enumerate(space.names)}
        self.diagonal = sorted(diagonal, key=order.__getitem__)
        if self.diagonal:
            self.blocks.append(Block("diagonal", tuple(self.diagonal)))

    def losses(self, params: Params, batch: Any, idx: torch.Tensor) -> torch.Tensor:
        """The Fisher's per-example losses: at labels drawn from the model (true) or the data's (empirical)."""
        if self.options.fisher == "true":
            return self.obj.sampled_losses(params, batch, idx, self.options.fisher_seed)
        return self.obj.losses(params, batch)

    def backward(self, batch: Any, idx: torch.Tensor) -> Tuple[Any, Params]:
        """One hooked backward pass of the Fisher's losses."""
        return self.obj.hooked_backward(self.space, batch, lambda p, b: self.losses(p, b, idx))

    def grads(self, batch: Any, idx: torch.Tensor) -> Tuple[Any, Params]:
        """The hooks of one backward pass, and the per-example gradients of the diagonal block's parameters."""
        return self.obj.hooked_grads(self.space, batch, self.diagonal, self.losses, idx)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.obj.comm.all_reduce_sum(t)


def _input_moment(layer: Layer, call: Call, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ ã ãᵀ`` over a call's examples and positions (``ã``: the input, a 1 appended with a bias), products in the
    data's precision, the sum in ``dtype`` (added into ``out``, a running sum, when given); a convolution's without
    unfolding its input where it can."""
    bias = layer.bias is not None
    if layer.kind == "conv2d":
        moment = patch_moment(layer.module, call.inputs, bias, dtype, out)
        if moment is not None:
            return moment
    a = token_inputs(layer, call)
    a = a.reshape(-1, a.shape[-1])
    moment = (a.T @ a).to(dtype)
    moment = bordered(moment, a.sum(0, dtype=dtype), float(a.shape[0])) if bias else moment
    return moment if out is None else out.add_(moment)


def _rotated_embedding_grads(block: Block, calls: Sequence[Call]) -> Optional[torch.Tensor]:
    """``[B, V, D]``: each example's gradient of an embedding in the block's eigenbasis, ``G Q_S``: each token's
    output gradient rotated before it is added into its row (``T`` rows per example instead of ``V``)."""
    rotated = [Call(call.inputs, grad=call.grad @ block.q_s) for call in calls if call.grad is not None]
    return example_grads(block.layer, rotated).get(block.layer.weight)


def basis_subset(indices: Sequence[int], count: Optional[int]) -> Sequence[int]:
    """``count`` of ``indices``, evenly spaced (a sorted data set still gives every part), or all of them."""
    if count is None or count >= len(indices):
        return indices
    return [indices[(i * len(indices)) // count] for i in range(count)]


class Moments:
    """K-FAC's sums over examples for the blocks of one fit, added one backward pass's hooks at a time (a pass of
    ours, or a training step's), then turned into eigenbases and eigenvalues."""

    def __init__(self, fit: KFACFit):
        self.fit = fit
        self.sums: Dict[int, Dict[str, torch.Tensor]] = {i: {} for i in range(len(fit.blocks))}
        self.count = 0

    def _add(self, i: int, key: str, value: torch.Tensor) -> None:
        value = value.to(self.fit.dtype)
        self.sums[i][key] = value if key not in self.sums[i] else self.sums[i][key] + value

    def add(self, capture: Any, diag: Optional[Params], count: int) -> None:
        """One backward pass of ``count`` examples: its hooks, and the diagonal block's per-example gradients
        (``None``: that block's values come from elsewhere, EK-FAC's correction pass)."""
        self.count += count
        dt = self.fit.dtype
        for i, block in enumerate(self.fit.blocks):
            if block.kind == "diagonal":
                if diag is not None:
                    self._add(i, "eig", _squares(block, diag))
                continue
            for call in capture.calls.get(block.layer.path, []):
                if call.grad is None:
                    continue
                if block.kind == "kronecker":
                    g = token_grads(block.layer, call)
                    g = g.reshape(-1, g.shape[-1])
                    self.sums[i]["A"] = _input_moment(block.layer, call, dt, self.sums[i].get("A"))  # summed in place
                    self._add(i, "S", g.T @ g)  # products in the data's precision, sums in covariance_dtype
                    self._add(i, "positions", torch.tensor(float(g.shape[0])))
                else:  # embedding: one-hot inputs, so Ā is the token counts
                    ids, g = call.inputs.reshape(-1), call.grad.reshape(-1, call.grad.shape[-1]).to(dt)
                    keep = ids != block.layer.module.padding_idx if block.layer.module.padding_idx is not None \
                        else torch.ones_like(ids, dtype=torch.bool)
                    self._add(i, "A", torch.bincount(ids[keep], minlength=block.layer.module.num_embeddings).to(dt))
                    self._add(i, "S", g[keep].T @ g[keep])
                    self._add(i, "positions", torch.tensor(float(ids.shape[0])))

    def blocks(self, correct: bool) -> List[Block]:
        """The fit's blocks from the sums over every rank: eigenbases, and K-FAC's eigenvalues (products of the
        factors'); with ``correct``, a layer no example reached keeps the identity basis for EK-FAC to fill."""
        fit, objective, space = self.fit, self.fit.obj, self.fit.space
        n = _examples(fit, self.count)
        for i, block in enumerate(fit.blocks):
            s = {k: fit.reduce(v) for k, v in self.sums[i].items()}
            if block.kind == "diagonal":
                block.eig = (s["eig"] / n).to(objective.dtype) if "eig" in s else None
                continue
            if "S" not in s and correct:  # not reached by the basis examples: EK-FAC's eigenvalues in the plain basis
                _plain_basis(block, space, objective)
                continue
            if "S" not in s:  # the data never reached this layer: its gradients are zero
                block.kind, block.names = "diagonal", tuple(block.names)
                block.eig = torch.zeros(sum(space.shapes[space.names.index(nm)].numel() for nm in block.names),
                                        dtype=objective.dtype, device=objective.device)
                continue
            positions = float(s["positions"])
            s_bar = (s["S"] / n).double()
            d_s, block.q_s = torch.linalg.eigh((s_bar + s_bar.T) / 2)
            if block.kind == "kronecker":
                a_bar = (s["A"] / positions).double()
                d_a, block.q_a = torch.linalg.eigh((a_bar + a_bar.T) / 2)
            else:
                d_a = (s["A"] / positions).double()
            block.eig = (d_s.clamp_min(0)[:, None] * d_a.clamp_min(0)[None, :]) if block.kind == "kronecker" else \
                (d_a.clamp_min(0)[:, None] * d_s.clamp_min(0)[None, :])
            # row-major (eigh's are column-major): the products then match those of factors read back from a snapshot
            block.q_s = block.q_s.to(objective.dtype).contiguous()
            if block.q_a is not None:
                block.q_a = block.q_a.to(objective.dtype).contiguous()
        return fit.blocks


def fit_blocks(objective: Objective, space: ParamSpace, indices: Sequence[int], options: KFACOptions,
               correct: bool) -> List[Block]:
    """The blocks of ``space``: factors and eigenbases from one pass (EK-FAC: over ``basis_examples`` of the
    examples), EK-FAC's eigenvalues and the diagonal blocks from a second pass over all of them."""
    fit = KFACFit(objective, space, options)
    moments = Moments(fit)
    for batch, idx in objective.batches(basis_subset(indices, options.basis_examples) if correct else indices):
        capture, diag = fit.backward(batch, idx) if correct else fit.grads(batch, idx)
        moments.add(capture, None if correct else diag, len(idx))
    blocks = moments.blocks(correct)
    if correct:
        _correct(fit, objective, indices)
    for block in blocks:
        block.eig = block.eig.to(objective.dtype)
    return blocks


def _plain_basis(block: Block, space: ParamSpace, objective: Objective) -> None:
    """Identity eigenbases for a layer the basis examples never reached (the correction pass may still reach it)."""
    shape = block.matrix({nm: torch.zeros(1, *space.shapes[space.names.index(nm)]) for nm in block.names}).shape
    kw = {"dtype": objective.dtype, "device": objective.device}
    block.q_s = torch.eye(shape[1] if block.kind == "kronecker" else shape[2], **kw)
    block.q_a = torch.eye(shape[2], **kw) if block.kind == "kronecker" else None
    block.eig = torch.zeros(shape[1:], **kw)  # zero unless the correction pass reaches the layer


def _squares(block: Block, diag: Params) -> torch.Tensor:
    """``Σ g²`` over a batch's examples, for a diagonal block."""
    return torch.cat([diag[n].flatten(1) for n in block.names], 1).pow(2).sum(0)


def _examples(fit: KFACFit, count: int) -> float:
    """The number of examples over every rank; an error when there are none."""
    n = float(fit.reduce(torch.tensor([float(count)], dtype=torch.float64)).item())
    if n == 0:
        raise MSIFError(f"No {fit.obj.role} examples to fit the Kronecker factors on: pass data with examples.")
    return n


def _correct(fit: KFACFit, objective: Objective, indices: Sequence[int]) -> None:
    """EK-FAC: ``Λ = E[(Q_Sᵀ G Q_A)²]`` over all the examples, in the eigenbasis of the first pass; the diagonal
    blocks' ``E[g²]`` in the same pass."""
    dt = fit.dtype
    sums: Dict[int, torch.Tensor] = {}

    def add(i: int, value: torch.Tensor) -> None:
        value = value.to(dt)
        sums[i] = value if i not in sums else sums[i] + value

    targets = [i for i, b in enumerate(fit.blocks) if b.kind != "diagonal" or b.eig is None]
    count = 0
    for batch, idx in objective.batches(indices):
        capture, diag = fit.grads(batch, idx) if fit.diagonal else (fit.backward(batch, idx)[0], {})
        count += len(idx)
        for i in targets:
            block = fit.blocks[i]
            if block.kind == "diagonal":
                add(i, _squares(block, diag))
                continue
            calls = capture.calls.get(block.layer.path, [])
            rotated = sandwiched_grads if block.kind == "kronecker" else _rotated_embedding_grads
            g = rotated(block, calls)
            if g is not None:
                add(i, g.pow(2).sum(0))
    n = _examples(fit, count)
    for i in targets:
        block = fit.blocks[i]
        total = sums.get(i, torch.zeros(block.eig.shape if block.eig is not None else
                                        sum(fit.obj.params[nm].numel() for nm in block.names),
                                        dtype=dt, device=objective.device))
        block.eig = (fit.reduce(total) / n).to(objective.dtype)


@register_curvature
@dataclass(frozen=True)
class EKFACCurvature(Curvature):
    """Eigenvalue-corrected Kronecker-factored Fisher (George et al. 2018), block-diagonal over layers."""

    name = "ekfac"
    Options = KFACOptions
    correct = True

    blocks: Tuple[Block, ...] = ()

    @classmethod
    def build(cls, objective: Objective, space: ParamSpace, indices: Sequence[int], *, damping: float,
              shift: Optional[torch.Tensor], options: Any) -> "EKFACCurvature":
        blocks = tuple(fit_blocks(objective, space, indices, options or KFACOptions(), cls.correct))
        return cls(objective, space, indices, damping, shift, options, blocks)

    def state(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        tensors: Dict[str, torch.Tensor] = {}
        blocks = []
        for i, block in enumerate(self.blocks):
            for key in ("q_a", "q_s", "eig"):
                value = getattr(block, key)
                if value is not None:
                    tensors[f"{i}.{key}"] = value
            blocks.append({"kind": block.kind, "names": list(block.names),
                           "path": block.layer.path if block.layer is not None else None})
        return tensors, {"blocks": blocks, "names": list(self.space.names)}

    @classmethod
    def from_state(cls, objective: Objective, space: ParamSpace, indices: Sequence[int], *, damping: float,
                   shift: Optional[torch.Tensor], options: Any, tensors: Dict[str, torch.Tensor],
                   meta: Dict[str, Any]) -> Optional["EKFACCurvature"]:
        if list(meta.get("names", [])) != list(space.names):
            return None
        layers = {layer.path: layer for layer in objective.layer_map(space).layers}
        blocks = []
        for i, b in enumerate(meta["blocks"]):
            layer = layers.get(b["path"]) if b["path"] is not None else None
            if b["path"] is not None and (layer is None or sorted(layer.names) != sorted(b["names"])):
                return None  # the model's layers are not those the factors were fitted on
            blocks.append(Block(b["kind"], tuple(b["names"]), layer,
                                *(tensors.get(f"{i}.{k}") for k in ("q_a", "q_s", "eig"))))
        to = dict(device=objective.device, dtype=objective.dtype)
        for block in blocks:
            block.q_a = block.q_a.to(**to) if block.q_a is not None else None
            block.q_s = block.q_s.to(**to) if block.q_s is not None else None
            block.eig = block.eig.to(**to)
        return cls(objective, space, indices, damping, shift, options, tuple(blocks))

    def coverage(self) -> Dict[str, Any]:
        """How each parameter is handled (for the run record)."""
        kinds: Dict[str, List[str]] = {}
        for block in self.blocks:
            kinds.setdefault(block.kind, []).extend(block.names)
        return {"kronecker": len([b for b in self.blocks if b.kind == "kronecker"]),
                "embedding": len([b for b in self.blocks if b.kind == "embedding"]),
                "diagonal": kinds.get("diagonal", []), "leftover": self.objective.layer_map(self.space).leftover}

    def block_damping(self, block: Block) -> float:
        value = self.damping
        if self.shift is not None:
            coords = torch.cat([self.shift[self._slice(n)] for n in block.names])
            if coords.numel() and not torch.all(coords == coords[0]):
                raise MSIFError(f"A per-coordinate shift that varies inside one block ({block.names[0]}) cannot be "
                                "applied to a Kronecker-factored curvature: give a shift constant per layer.")
            value += float(coords[0]) if coords.numel() else 0.0
        relative = self.options.relative_damping if self.options is not None else None
        if relative is None:
            relative = HEURISTIC_DAMPING if self.damping == 0 else 0.0
        return value + relative * float(block.eig.mean())

    def balance(self) -> Dict[str, Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor], torch.Tensor]]:
        """Per parameter block (keyed by its first name): ``(Q_S, r, Q_A, c)`` with ``r cᵀ`` the best separable fit
        of the block's damped eigenvalues ``Λ + λ`` (``r`` over ``Q_S``'s columns, ``c`` over ``Q_A``'s; a missing
        basis is the identity; a diagonal block gives one entry per parameter, ``r`` its values, ``c = 1``). So
        ``Q_S diag(r) Q_Sᵀ ⊗ Q_A diag(c) Q_Aᵀ`` is a Kronecker-factored stand-in for the damped block."""
        out: Dict[str, Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor], torch.Tensor]] = {}
        for block in self.blocks:
            lam = block.eig + self.block_damping(block)
            if block.kind == "diagonal":
                shapes = dict(zip(self.space.names, self.space.numels))
                for name, part in zip(block.names, torch.split(lam, [shapes[n] for n in block.names])):
                    out[name] = (None, part, None, part.new_ones(1))
                continue
            rows, cols = lam.mean(1), lam.mean(0) / lam.mean()  # r_i c_j = Λ_ij + λ when Λ + λ is separable
            if block.kind == "kronecker":
                out[block.names[0]] = (block.q_s, rows, block.q_a, cols)
            else:  # embedding [V, D]: the vocabulary in the plain basis, the width in q_s
                out[block.names[0]] = (None, rows, block.q_s, cols)
        return out

    def _slice(self, name: str) -> slice:
        start = 0
        for n, k in zip(self.space.names, self.space.numels):
            if n == name:
                return slice(start, start + k)
            start += k
        raise KeyError(name)

    def _map(self, vectors: torch.Tensor, inverse: bool) -> torch.Tensor:
        parts = self.space.unflatten(vectors)
        shapes = dict(zip(self.space.names, self.space.shapes))
        out: Params = {}
        for block in self.blocks:
            lam = block.eig + self.block_damping(block)
            rotated = block.rotate(block.matrix(parts))
            if inverse:
                if bool((lam <= 0).any()):
                    raise MSIFError(
                        f"The {self.role} {self.name} curvature has a zero eigenvalue in the block of {block.names[0]} "
                        "and no damping: add damping (e.g. damping=1e-3) or relative_damping."
                    )
                rotated = rotated / lam
            else:
                rotated = rotated * lam
            out.update(block.parts(block.unrotate(rotated), shapes))
        return self.space.flatten(out)

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._map(vectors, inverse=False)

    def inverse_matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(C + diag(shift) + λI)⁻¹ V`` in closed form, block by block in each block's eigenbasis."""
        return self._map(vectors, inverse=True)

    @classmethod
    def cross_product(cls, objective: Objective, rows: ParamSpace, cols: ParamSpace, vectors: torch.Tensor,
                      indices: Sequence[int], options: Any) -> torch.Tensor:
        """The Fisher cross block ``F_rows,cols V = (1/m) Σ_x g_rows(x) (g_cols(x) · v)``: per-example gradients of
        both sets in one pass per label (chunked), one matrix product per chunk for all right-hand sides.

        True Fisher with one label per example and at most ``EXACT_LABELS`` classes: the expectation over the
        model's labels in closed form, ``Σ_c p_c(x) g(x, c) g(x, c)ᵀ`` (one pass per class, no sampling noise:
        this block is what the fixed mode's score depends on most directly); else one drawn label per example.
        """
        options = options or KFACOptions()
        out = torch.zeros(vectors.shape[0], rows.dim, device=vectors.device, dtype=vectors.dtype)
        both = ParamSpace(rows.names + cols.names, rows.shapes + cols.shapes)
        step = objective.chunk_for(both)

        def add(batch: Any, weights: Optional[torch.Tensor]) -> None:
            for start in range(0, batch_size_of(batch), step):
                g = objective.per_example_grads(both, slice_batch(batch, start, start + step))  # [b, rows + cols]
                c = g[:, rows.dim:] @ vectors.T  # [b, k]
                if weights is not None:
                    c = c * weights[start:start + step, None]
                out.add_(c.T @ g[:, :rows.dim])

        for batch, idx in objective.batches(indices):
            if options.fisher != "true":
                add(batch, None)
                continue
            with torch.no_grad():
                logits = objective.outputs({}, batch)
            if logits.dim() == 2 and logits.shape[1] <= EXACT_LABELS:
                probs = torch.softmax(logits.double(), -1).to(out.dtype)
                labels = objective.task.labels_of(batch)
                for c in range(logits.shape[1]):
                    add(objective.task.with_labels(batch, torch.full_like(labels, c)), probs[:, c])
            else:
                add(objective.relabelled(batch, idx, options.fisher_seed), None)
        return objective.comm.all_reduce_sum(out) / len(indices)


@register_curvature
@dataclass(frozen=True)
class KFACCurvature(EKFACCurvature):
    """Kronecker-factored Fisher (Martens & Grosse 2015): eigenvalues are products of the factors' eigenvalues."""

    name = "kfac"
    correct = False
