"""A gradient index caught from the model's own training steps (``core/training_index.py``).

A training step's hooks, with the step's loss scaling undone, give exactly the rows the dedicated pass forms
for the same batch at the same weights (BatchNorm in training mode included: both normalise by the batch); the
rows assembled from shuffled steps, with examples the epoch missed filled in, equal the dedicated capture.
"""
from __future__ import annotations

import copy

import pytest
import torch
from reference import rel_err
from test_layers import Everything, _data, _loss
from torch.utils.data import DataLoader

from lightning_msif import MSIFError, MemoryIndexStore
from lightning_msif.core.index import capture_index
from lightning_msif.core.influence import finish_step_index, per_example_gradients, step_index

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(leftover: bool = False) -> Everything:
    torch.manual_seed(0)
    model = Everything().double()
    model.scale.requires_grad_(leftover)  # the one parameter no hook covers
    return model


def _double(batch, dtype: torch.dtype = torch.float64):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _step(step, model, batch, scale_by_batch: bool = True, mean: bool = True):
    """One training step's forward/backward (in the model's dtype) under the index's hooks; the rows it gives."""
    batch, b = _double(batch, _dtype(model)), batch[0].shape[0]
    with step.watch(b) as capture:
        losses = _loss(model, batch)
        (losses.mean() if mean else losses.sum()).backward()
    model.zero_grad()
    return step.rows(capture, float(b) if scale_by_batch else 1.0)


def _moments(step, model, loader) -> None:
    for batch in (_double(b, _dtype(model)) for b in loader):
        with step.watch(batch[0].shape[0]) as capture:
            _loss(model, batch).mean().backward()
        model.zero_grad()
        step.add_moments(capture, float(batch[0].shape[0]), batch[0].shape[0])
    step.build()


@pytest.mark.parametrize("train_mode", [True, False])
def test_a_training_steps_rows_equal_the_dedicated_pass_on_its_batch(train_mode):
    """BatchNorm normalising by the batch (training mode) or by its running statistics; Conv2d, Embedding with
    padding, LayerNorm, HF Conv1D, a Linear head; the step's loss a batch mean (its 1/B undone)."""
    model, data = _model(), _data(12)
    loader = DataLoader(data, batch_size=4)
    step = step_index(model, loader, MemoryIndexStore(), dim=3, loss_fn=_loss)
    model.train(train_mode)
    _moments(step, model, loader)
    batch = next(iter(loader))
    got = _step(step, model, batch)
    want = step.projection.examples(_double(batch))
    assert got.shape == (4, step.projection.out_dim)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    step.check(got, want)
    assert step.check_error <= 1e-10


def test_a_step_whose_loss_is_not_a_mean_is_refused():
    model, data = _model(), _data(8)
    loader = DataLoader(data, batch_size=4)
    step = step_index(model, loader, MemoryIndexStore(), dim=3, loss_fn=_loss)
    _moments(step, model, loader)
    batch = next(iter(loader))
    got = _step(step, model, batch, mean=False)  # a summed loss: every row 4× too large
    with pytest.raises(MSIFError, match="not the mean of the per-example losses"):
        step.check(got, step.projection.examples(_double(batch)))


def test_parameters_no_hook_covers_are_refused():
    model, data = _model(leftover=True), _data(8)
    with pytest.raises(MSIFError, match="index_capture='after_fit'"):
        step_index(model, DataLoader(data, batch_size=4), MemoryIndexStore(), dim=3, loss_fn=_loss)


def test_rows_from_shuffled_steps_with_missed_examples_equal_the_dedicated_capture():
    """Shuffled batches, the last partial batch dropped, one step's rows poisoned (a skipped mixed-precision step):
    assembled into blocks of 4 (pieces written out as they go), the missed rows filled, the index equals the
    dedicated pass's with the same projection (eval mode, unchanged weights)."""
    model, data = _model().eval(), _data(11)
    pieces, store = MemoryIndexStore(), MemoryIndexStore()
    step = step_index(model, DataLoader(data, batch_size=3), pieces, dim=2, loss_fn=_loss)
    _moments(step, model, DataLoader(data, batch_size=3))
    order = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    for i, start in enumerate(range(0, 9, 3)):  # 3 full batches of 3: two examples never trained on
        idx = order[start:start + 3]
        rows = _step(step, model, tuple(t[idx] for t in data.tensors))
        if i == 1:
            rows[0] = float("nan")
        step.add_rows(rows, idx, 11, block=4)
        step.flush()
    index, counts = finish_step_index(step, store, block=4)
    assert counts == {"caught": 8, "filled": 3}  # 9 trained on, one of them not finite
    assert not pieces.keys()  # assembled pieces are removed
    want = MemoryIndexStore()
    capture_index(step.obj, step.projection, want, block=4)
    assert sorted(store.keys()) == sorted(want.keys())
    for key in want.keys():
        assert torch.allclose(store.get(key), want.get(key), rtol=1e-10, atol=1e-12)
    assert index.n == 11 and index.projection["balanced"]


HALF_STEP_ERROR = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
"""How far a half-precision step's rows may be from the exact ones (and from the float32 reference): its forward and
backward round every activation and gradient to 8 (bf16) or 11 (fp16) significant bits; measured here 2.4e-3 and
4.8e-4 from the exact rows, 5.5e-3 and 7.9e-4 from the reference."""


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_precision_modules_index_is_computed_in_float32(half):
    """A bf16/fp16 module trains in its own precision; the index computes on a float32 copy that follows its weights
    (as the dedicated pass computes on one): at full dimension the first step's reference and the fill pass are
    exact to float32 at the weights of the moment, the step's own rows as exact as its half-precision arithmetic."""
    model = _model().to(half).eval()  # BatchNorm by its running statistics: the examples' gradients are separable
    data = _data(7)
    loader = DataLoader(data, batch_size=3)
    step = step_index(model, loader, MemoryIndexStore(), dim=19, loss_fn=_loss)  # ≥ every side: exact
    _moments(step, model, loader)
    with torch.no_grad():
        model.head.bias.add_(0.25)  # a training step after the copy was taken
    exact, _ = per_example_gradients(copy.deepcopy(model).double(), data, loss_fn=_loss)
    vectors = torch.randn(4, exact.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    duals = step.projection.vectors(vectors.float()).double()

    def error(rows: torch.Tensor, idx: slice) -> float:
        return rel_err(rows.double() @ duals.T, exact[idx] @ vectors.T)

    batch = tuple(t[:3] for t in data.tensors)
    rows = _step(step, model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a mixed-precision region around it does not lower it
        reference = step.reference(batch)
    assert rows.dtype == reference.dtype == torch.float32
    assert {t.dtype for t in step.projection.duals.values()} == {torch.float32}
    assert error(reference, slice(0, 3)) <= 1e-5 and error(rows, slice(0, 3)) <= HALF_STEP_ERROR[half]
    step.check(rows, reference)
    assert step.check_error <= HALF_STEP_ERROR[half]
    store = MemoryIndexStore()
    _, counts = finish_step_index(step, store, block=4)  # no rows kept: every one filled
    assert counts == {"caught": 0, "filled": 7}
    assert error(torch.cat([store.get(k) for k in sorted(store.keys())]), slice(None)) <= 1e-5
    assert {p.dtype for p in model.parameters()} == {half}  # the trained module is left in its precision
