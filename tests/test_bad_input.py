"""Bad input of a new user's kind (issue 11): each class is refused with an ``MSIFError`` naming the problem, the
dataset index where there is one, and the fix, before any expensive work; or, where it is sensible, supported."""
from __future__ import annotations

import copy
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from reference import loader, trained_problem
from torch import nn
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

from lightning_msif import MSIFError, multistage_influence, single_stage_influence
from lightning_msif.core.arguments import InfluenceArguments
from lightning_msif.core.solvers import SOLVERS, Solver, register_solver

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def case():
    """The trained fixed-mode problem of tests/reference.py (fresh models, free to change)."""
    return trained_problem("fixed", None, 0.1)


def _raises(*words: str):
    return pytest.raises(MSIFError, match="(?s)" + ".*".join(words))


# -- numeric settings: type (int where int, no bool), finiteness, range; at every entry point ------------------


@pytest.mark.parametrize("setting,words", [
    (dict(mode="updated", alpha=float("inf")), ("alpha must be a finite number > 0", "got inf")),
    (dict(solver="cg", tol=float("inf")), ("tol must be a finite number > 0", "got inf")),
    (dict(solver="cg", tol="1e-6"), ("tol must be a finite number > 0", r"'1e-6' \(a str\)")),
    (dict(solver="lissa", lissa_scale=float("inf")), ("lissa_scale must be a finite number > 0",)),
    (dict(solver="lissa", lissa_seed=0.5), ("lissa_seed must be an integer ≥ 0",)),
    (dict(curvature="ekfac", relative_damping=float("inf")), ("relative_damping must be a finite number ≥ 0",)),
    (dict(curvature="kfac", fisher_seed="0"), ("fisher_seed must be an integer ≥ 0", r"\(a str\)")),
    (dict(chunk_size=8.0), ("chunk_size must be a positive integer", "got 8.0")),
    (dict(chunk_size=-1), ("chunk_size must be a positive integer", "got -1")),
    (dict(hessian_samples=True), ("hessian_samples must be a positive integer", r"True \(a bool\)")),
    (dict(damping=float("inf")), ("damping must be a finite number ≥ 0", "got inf")),
])
def test_numeric_settings_are_checked_for_type_finiteness_and_range(case, setting, words):
    pre, fine, pt, ft, q = case
    with _raises(*words):
        multistage_influence(pre, fine, loader(pt), loader(ft), loader(q), shared="backbone",
                             **{"damping": 0.1, **setting})
    if "alpha" not in setting:
        with _raises(*words):
            single_stage_influence(pre, loader(pt), loader(q), **{"damping": 0.1, **setting})
        with _raises(*words):
            InfluenceArguments.from_mapping(_as_fields(setting))


def _as_fields(setting: dict) -> dict:
    """Flat keywords as the fields of the arguments object (plug-in options in their dicts), as YAML holds them."""
    names = {f.name for f in fields(InfluenceArguments)}
    solver, curvature = InfluenceArguments.split_options({k: v for k, v in setting.items() if k not in names})
    plain = {k: v for k, v in setting.items() if k in names}
    return {**plain, "solver_options": solver, "curvature_options": curvature}


# -- data a loader does not pass whole, or passes in another form --------------------------------------------


def test_a_sampler_that_subsets_or_repeats_is_refused(case):
    """The model trained on 8 of 13 examples: scoring all 13 (Hessian included) would be silently wrong."""
    pre, fine, pt, ft, q = case
    subset = DataLoader(pt, batch_size=4, sampler=SubsetRandomSampler(list(range(8))))
    with _raises("pretrain_data is a DataLoader whose SubsetRandomSampler visits 8 of the 13 examples",
                 r"DataLoader\(Subset\(dataset, indices\)"):
        multistage_influence(pre, fine, subset, loader(ft), loader(q), shared="backbone")
    weighted = DataLoader(pt, batch_size=4, sampler=WeightedRandomSampler(torch.ones(13), 13, generator=_seeded()))
    with _raises("train_data is a DataLoader whose WeightedRandomSampler visits", "repeat an example", "Subset"):
        single_stage_influence(pre, weighted, loader(q))
    batches = DataLoader(pt, batch_sampler=[[12, 0, 5], [1, 2, 3, 4], [6, 7, 8, 9, 10, 11]])  # all, once each
    shuffled = DataLoader(pt, batch_size=4, shuffle=True)
    expected = single_stage_influence(pre, loader(pt), loader(q), damping=0.1)
    for data in (batches, shuffled):
        torch.testing.assert_close(single_stage_influence(pre, data, loader(q), damping=0.1), expected)


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_a_list_of_examples_and_a_loader_without_batches_are_datasets(case):
    pre, fine, pt, ft, q = case
    expected = multistage_influence(pre, fine, loader(pt), loader(ft), loader(q), shared="backbone")
    examples = [pt[i] for i in range(len(pt))]  # (x [3], y []) pairs
    labels_as_ints = [(x, int(y)) for x, y in examples]
    for data in (examples, labels_as_ints, DataLoader(pt, batch_size=None), iter(examples)):
        scores = multistage_influence(pre, fine, data, loader(ft), loader(q), shared="backbone")
        torch.testing.assert_close(scores, expected)


# -- examples the model cannot take, at a late batch: named by dataset index ----------------------------------


def _relabelled(data: TensorDataset, row: int, label: int) -> TensorDataset:
    x, y = data.tensors
    y = y.clone()
    y[row] = label
    return TensorDataset(x, y)


class _Ragged(Dataset):
    """``base`` with the example at ``row`` one feature longer than the others."""

    def __init__(self, base: TensorDataset, row: int):
        self.base, self.row = base, row

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return (torch.cat([x, x[:1]]) if i == self.row else x), y


def test_a_label_out_of_range_at_a_late_batch(case):
    pre, fine, pt, ft, q = case
    with _raises(r"pretraining model and loss fail on the pretrain_data examples at dataset indices \[10\]",
                 "Target 7 is out of bounds", "the data is the problem: a label outside the model's outputs"):
        multistage_influence(pre, fine, loader(_relabelled(pt, 10, 7)), loader(ft), loader(q), shared="backbone")


def test_a_ragged_example_at_a_late_batch(case):
    pre, _fine, pt, _ft, q = case
    with _raises(r"train_data: the example at dataset index 10 has shapes \[\(4,\), \(\)\] but the one at index 8 "
                 r"\[\(3,\), \(\)\]", "pad or crop"):
        single_stage_influence(pre, DataLoader(_Ragged(pt, 10), batch_size=4), loader(q))


def test_a_query_batch_of_another_width(case):
    pre, fine, pt, ft, q = case
    wide = TensorDataset(torch.randn(5, 4, dtype=torch.float64), q.tensors[1])
    with _raises(r"query model and loss fail on the query_data examples at dataset indices \[0, 1, 2, 3\]",
                 "mat1 and mat2 shapes cannot be multiplied", "inputs of another shape"):
        multistage_influence(pre, fine, loader(pt), loader(ft), loader(wide), shared="backbone")


def test_a_non_finite_loss_at_a_late_batch_names_the_data(case):
    """Finite inputs, a loss that is NaN on example 10 only: before, met in a Hessian product with "add damping"."""
    pre, _fine, pt, _ft, q = case
    x, y = pt.tensors
    x = x.clone()
    x[10, 0] = 0.0

    def loss(model: nn.Module, batch) -> torch.Tensor:  # NaN where the first feature is 0: 0 · log 0
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none") + 0.0 * batch[0][:, 0].abs().log()

    with _raises(r"NaN/inf in the training losses at dataset indices \[10\]", "weights are finite",
                 "the data is the problem"):
        single_stage_influence(pre, loader(TensorDataset(x, y)), loader(q), loss_fn=loss, solver="cg", damping=0.1)


def test_bad_data_is_refused_before_any_solve(case):
    """A bad label in the last pretraining batch stops the run before the finetune side's solve."""
    pre, fine, pt, ft, q = case
    solved = []

    @register_solver
    class Recording(Solver):
        name = "recording_badinput"

        def run(self, op, rhs, options, progress):
            solved.append(op.role)
            return torch.zeros_like(rhs), {}

    try:
        with _raises(r"dataset indices \[12\]"):
            multistage_influence(pre, fine, loader(_relabelled(pt, 12, -1)), loader(ft), loader(q),
                                 shared="backbone", solver="recording_badinput", curvature="hessian")
    finally:
        SOLVERS.remove("recording_badinput")
    assert solved == []


# -- models: dtypes, autodiff a layer lacks, low precision ----------------------------------------------------


def test_mixed_dtypes_across_stages_and_within_a_model(case):
    """Across stages, both are scored in the finetune side's compute dtype (docs/architecture.md, "Precision"):
    a float32 pretraining model with a float64 finetune one gives the scores of its exact float64 copy. Within one
    model, a mix is refused."""
    pre, fine, pt, ft, q = case
    settings = dict(shared="backbone", mode="updated", alpha=1.0)
    got = multistage_influence(pre.float(), fine, loader(pt), loader(ft), loader(q), **settings)
    want = multistage_influence(copy.deepcopy(pre).double(), fine, loader(pt), loader(ft), loader(q), **settings)
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    pre.head.double()  # pre is float32 since pre.float() (in place)
    with _raises(r"training model's parameters mix dtypes \['torch.float32', 'torch.float64'\]", r"model\.double\(\)"):
        single_stage_influence(pre, loader(pt), loader(q))


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(10, 4, mode="mean")
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


@pytest.mark.parametrize("curvature,mode", [("ggn", "forward-mode differentiation"),
                                            ("hessian", "second-order differentiation")])
def test_a_layer_without_the_autodiff_a_curvature_needs(curvature, mode):
    torch.manual_seed(0)
    model = _Bag().double()
    data = TensorDataset(torch.randint(0, 10, (12, 3)), torch.randint(0, 2, (12,)))
    with _raises(f"curvature='{curvature}' needs {mode}", r"emb \(EmbeddingBag\) does not support it",
                 "curvature='ekfac'"):
        single_stage_influence(model, loader(data), loader(data), curvature=curvature, solver="cg", damping=0.1)
    scores = single_stage_influence(model, loader(data), loader(data), curvature="ekfac", damping=0.1)
    assert torch.isfinite(scores).all()
    with _raises("scoring='jvp' with gradients='func' needs forward-mode", r"emb \(EmbeddingBag\)", "scoring='grad'"):
        single_stage_influence(model, loader(data), loader(data), curvature="ekfac", damping=0.1, scoring="jvp",
                               gradients="func")


def test_a_low_precision_model_is_computed_in_float32(case):
    """A float16 model is scored on a float32 copy of its weights (docs/architecture.md, "Precision"): its
    curvature is not lost to float16's three digits, and the trained model keeps its own dtype."""
    pre, _fine, pt, _ft, q = case
    pt16, q16 = (TensorDataset(d.tensors[0].half(), d.tensors[1]) for d in (pt, q))
    half = pre.half()
    got = single_stage_influence(half, loader(pt16), loader(q16), solver="exact", curvature="hessian", damping=0.01)
    wide = copy.deepcopy(half).float()
    want = single_stage_influence(wide, loader(pt16), loader(q16), solver="exact", curvature="hessian", damping=0.01)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert next(half.parameters()).dtype == torch.float16
