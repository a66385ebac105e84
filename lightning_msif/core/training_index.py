"""A gradient index caught from a model's own training steps, instead of a dedicated pass after training.

The forward/backward pass of each training step already holds what the index needs: each covered layer's
inputs and the gradients arriving at its outputs. ``StepCapture`` keeps them as the step's own backward runs;
``StepIndex`` then projects them (``Projection.project``) and keeps the rows by dataset index. What it gives up
against the dedicated pass, each row being the gradient *of the step that trained on it*:

- the weights: a row is taken at the weights of its step, not the final ones (the last epoch's drift);
- the mode: training mode, so dropout's mask of that step, and BatchNorm normalising by the batch's
  statistics (an example's row then also carries its batch-mates' share through those statistics);
- the curvature that balances the projection: fitted before the rows are taken, so it is K-FAC's *empirical*
  Fisher from the hooks of earlier training steps (``basis_examples`` examples), not the final EK-FAC;
- coverage: parameters no hook covers (leftovers) cannot be had from a training step, so such a model is
  refused; examples the epoch does not reach (``drop_last``, ``limit_train_batches``, a run stopped early) and
  rows that are not finite (a mixed-precision step the loss scaler skips) are filled by a dedicated pass over
  just those examples, at the final weights; such a step adds no moments either.

The step's loss must be the mean of its examples' losses (Lightning's and Hugging Face's convention), scaled
by the trainer (gradient accumulation, a loss scaler): the caller passes that scale, and the first captured
step is checked against the per-example gradients of the same batch.

Precision: a step in bfloat16/float16 (a half-precision module, autocast) hands its hooks half-precision inputs and
gradients; they are widened first, so every product runs in the compute dtype (``core/precision.py``) on a copy of
the module that follows its weights, as the dedicated pass computes. Only the step's own rounding stays in the rows.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import MSIFError
from .comm import Communicator
from .curvature.kfac import KFACCurvature, KFACOptions, Moments, KFACFit
from .data import to_device
from .index import INDEX_DTYPES, IndexStore, block_key
from .scoring import blocks, row_blocks
from .layers import StepCapture, covered_grads
from .objective import Objective, full_precision
from .params import ParamSpace
from .precision import follow
from .projection import Projection

SPILL_BYTES = 256 << 20
"""Rows kept in memory before they are written out as pieces of their blocks (bounded memory)."""
CHECK_TOLERANCE = 0.5
"""The first step's rows may differ from the batch's per-example gradients (the reference, computed in float32, or
float64 for a float64 module) by this much (relative) before the step's loss is taken not to be a mean of per-example
losses. One bound for every training precision: what it must catch is far off (a summed loss by B − 1 ≥ 1), while
the step's own arithmetic moves the rows by its rounding only (0 to ~1e-6 in float32/float64; a bf16 step rounds its
activations and gradients to 8 significant bits, ~1e-2, an fp16 one to 11, ~1e-3; both grow slowly with depth), and
dropout, whose masks the random state reproduces, not at all."""


def refuse_leftovers(leftover: Sequence[str], precision: Optional[str] = None) -> None:
    """An error when parameters no layer hook covers are to be indexed from training steps; ``precision``, the
    trainer's, is named (a precision plugin may put in layers the hooks do not know, as Transformer Engine does)."""
    if leftover:
        under = f" (precision={precision!r})" if precision is not None else ""
        raise MSIFError(
            f"The gradient index cannot be caught from training steps for parameters no layer hook covers{under}: "
            f"{list(leftover)[:5]}. Capture it after training instead (index_capture='after_fit'), which forms "
            "their per-example gradients one example at a time.")


def finite(capture: StepCapture, grads: Dict[str, torch.Tensor]) -> bool:
    """Whether every gradient a step gave its hooks, and ``grads``, is finite (one sync, not one per layer)."""
    tensors = [c.grad for calls in capture.calls.values() for c in calls if c.grad is not None] + list(grads.values())
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class StepIndex:
    """The rows of a gradient index, from training steps: first K-FAC moments for the balancing curvature
    (``add_moments``), then the projection (``build``), then rows (``add_rows``) kept as pieces in ``pieces`` and
    assembled into the index's blocks at the end (``assemble``). The hooks go on ``trained`` (default: ``obj``'s
    model), the module being trained; every product runs on ``obj``'s model, its copy in the compute dtype."""

    def __init__(self, obj: Objective, space: ParamSpace, pieces: IndexStore, *, dim: int, seed: int = 0,
                 kind: str = "eigen", damping: float = 0.0, dtype: str = "float32",
                 trained: Optional[nn.Module] = None):
        self.obj, self.space, self.pieces = obj, space, pieces
        self.dim, self.seed, self.kind, self.damping, self.dtype = dim, seed, kind, damping, INDEX_DTYPES[dtype]
        self.trained = obj.bound.model if trained is None else trained
        lmap = obj.layer_map(space)
        refuse_leftovers(lmap.leftover)
        self.lmap = lmap.on(self.trained)  # the steps run on the trained module; the products on obj's model
        self.options = KFACOptions(fisher="empirical")
        self.fit = KFACFit(obj, space, self.options)
        self.moments = Moments(self.fit)
        self.offered = 0  # examples whose steps were given to add_moments (every rank alike), finite or not
        self.projection: Optional[Projection] = None
        self.pending: Dict[Tuple[int, int], List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self.held = self.written = 0
        self.check_error: Optional[float] = None

    def watch(self, batch_size: int) -> StepCapture:
        """Hooks on the trained module for one training step (enter it around the step's forward and backward)."""
        return StepCapture(self.lmap, batch_size)

    def _prepare(self, capture: StepCapture, scale: float = 1.0) -> None:
        """Widen what the step computed in half precision (a bf16/fp16 module, autocast) to the compute dtype, so
        every product after is in float32 (float64 for a float64 module), and undo (``scale``) the step's loss
        scaling: mean over the batch, accumulation, a loss scaler."""
        capture.check()
        dtype = self.obj.dtype
        for calls in capture.calls.values():
            for call in calls:
                if call.inputs.is_floating_point() and call.inputs.dtype != dtype:
                    call.inputs = call.inputs.to(dtype)
                if call.grad is not None and (scale != 1.0 or call.grad.dtype != dtype):
                    call.grad = call.grad.to(dtype) * scale

    def add_moments(self, capture: StepCapture, scale: float, count: int) -> None:
        """One training step's hooks into the K-FAC moments that will balance the projection; a step whose gradients
        are not finite (one a loss scaler skips) adds nothing."""
        self.offered += count
        self._prepare(capture, scale)
        diagonal = covered_grads(capture, set(self.fit.diagonal))
        if finite(capture, diagonal):
            self.moments.add(capture, diagonal, count)

    def build(self) -> Projection:
        """The projection, balanced by K-FAC's empirical Fisher from the moments added so far (every rank at once:
        the moments are summed over ranks); random and unbalanced when no step gave finite moments."""
        balance = None
        if float(self.obj.comm.all_reduce_sum(torch.tensor([float(self.moments.count)], dtype=torch.float64))):
            balance = KFACCurvature(self.obj, self.space, (), self.damping, None, self.options,
                                    tuple(self.moments.blocks(correct=False))).balance()
        self.projection = Projection(self.obj, self.space, self.dim, self.seed, balance=balance, kind=self.kind)
        return self.projection

    def rows(self, capture: StepCapture, scale: float) -> torch.Tensor:
        """``[B, out_dim]``: the step's examples' projected gradients (linear in the output gradients, so the loss
        scale is undone on the rows, not on every layer's gradients)."""
        self._prepare(capture)
        assert self.projection is not None, "build() the projection first"
        return self.projection.project(capture, covered_grads(capture, set(self.projection.others)),
                                       capture.batch_size) * scale

    def reference(self, batch: Any) -> torch.Tensor:
        """The projected per-example gradients of a step's ``batch`` in the compute dtype (no autocast), at the trained
        module's current weights and in its modes (its dropout masks as far as the random state allows); BatchNorm's
        running statistics are left as they were."""
        model = self.obj.bound.model
        follow(model, self.trained)
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        try:
            with full_precision(model):
                return self.projection.examples(to_device(batch, self.obj.device, self.obj.dtype))
        finally:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])

    def check(self, rows: torch.Tensor, reference: torch.Tensor) -> None:
        """Compare the first step's rows with the batch's own per-example gradients (projected): an error when
        the step's loss was not the mean of its examples' losses; the relative difference is kept."""
        error = float((rows - reference).norm() / reference.norm().clamp_min(torch.finfo(reference.dtype).tiny))
        self.check_error = error
        if not error <= CHECK_TOLERANCE:
            raise MSIFError(
                f"The gradients of a training step differ from its examples' own loss gradients by {error:.0%}: the "
                "step's loss is not the mean of the per-example losses the influence computation uses (a sum, a "
                "weighted or regularised loss through the outputs, or another loss than the module's "
                "per_example_loss). Capture the index after training instead (index_capture='after_fit').")

    def add_rows(self, rows: torch.Tensor, idx: torch.Tensor, n: int, block: int) -> None:
        """Keep ``rows`` of dataset indices ``idx`` for their blocks (written out as pieces past ``SPILL_BYTES``)."""
        rows, idx = rows.detach().to(self.dtype), idx.to(rows.device, torch.long)
        if bool(((idx < 0) | (idx >= n)).any()):
            raise MSIFError(f"A training batch holds dataset indices outside 0..{n - 1}: the sampler does not draw "
                            "from the dataset being indexed. Capture the index after training instead.")
        for start, stop in blocks(n, block)[int(idx.min()) // block: int(idx.max()) // block + 1]:
            mine = (idx >= start) & (idx < stop)
            if bool(mine.any()):
                self.pending.setdefault((start, stop), []).append((idx[mine], rows[mine]))
        self.held += rows.numel() * rows.element_size()
        if self.held > SPILL_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the rows held in memory as pieces of their blocks (``piece.<start>-<stop>.<rank>.<k>``)."""
        for (start, stop), parts in self.pending.items():
            key = f"piece.{start}-{stop}.{self.obj.comm.rank}.{self.written}"
            self.pieces.put(f"{key}.rows", torch.cat([p[1] for p in parts]).cpu())
            self.pieces.put(f"{key}.idx", torch.cat([p[0] for p in parts]).cpu())  # last: marks the piece whole
        self.pending, self.held, self.written = {}, 0, self.written + 1


def assemble(pieces: IndexStore, store: IndexStore, obj: Objective, projection: Projection, n: int, block: int,
             dtype: torch.dtype, comm: Communicator, fill: Callable[[Sequence[int]], torch.Tensor],
             progress: Optional[Any] = None) -> Dict[str, int]:
    """Write this rank's blocks of the index from every rank's pieces; the examples no piece holds (or holds a
    row of that is not finite) get ``fill(indices)``, their rows from a dedicated pass. A block already in
    ``store`` is kept. Returns how many rows, over all ranks, came from training steps and how many were filled."""
    caught = filled = 0
    width = projection.out_dim
    keys = pieces.keys()
    for start, stop in row_blocks(n, block, comm):
        key = block_key(start, stop)
        mine = [k[: -len(".idx")] for k in keys if k.startswith(f"piece.{start}-{stop}.") and k.endswith(".idx")]
        if not store.has(key):
            rows = torch.zeros(stop - start, width, dtype=dtype)
            seen = torch.zeros(stop - start, dtype=torch.bool)
            for piece in mine:
                idx, part = pieces.get(f"{piece}.idx") - start, pieces.get(f"{piece}.rows")
                ok = torch.isfinite(part).all(1)
                rows[idx[ok]], seen[idx[ok]] = part[ok].to(rows.dtype), True
            missing = (~seen).nonzero().flatten() + start
            if len(missing):
                rows[missing - start] = fill(missing.tolist()).cpu().to(rows.dtype)
            obj.assert_finite(rows, "projected gradients", torch.arange(start, stop))
            store.put(key, rows)
            caught, filled = caught + int(seen.sum()), filled + len(missing)
        for piece in mine:
            pieces.remove(f"{piece}.idx")
            pieces.remove(f"{piece}.rows")
        if progress is not None:
            progress.update(stop - start)
    counts = comm.all_reduce_sum(torch.tensor([float(caught), float(filled)], dtype=torch.float64))
    return {"caught": int(counts[0]), "filled": int(counts[1])}
