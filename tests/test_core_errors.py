"""Every bad input raises ``MSIFError`` (a ``ValueError``) whose message names the problem."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from reference import TinyNet, loader, problem, trained_problem
from torch import nn
from torch.utils.data import TensorDataset

from lightning_msif import MSIFError, compute_multistage, multistage_influence, single_stage_influence

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def case():
    """Trained fixed-mode problem (models are fresh copies, free to modify)."""
    return trained_problem("fixed", None, 0.1)


def _run(pre, fine, pt, ft, q, **kw):
    kw.setdefault("shared", "backbone")
    return multistage_influence(pre, fine, loader(pt), loader(ft), loader(q), **kw)


def _raises(match: str):
    return pytest.raises(MSIFError, match=match)


def test_msif_error_is_a_value_error():
    assert issubclass(MSIFError, ValueError)


# -- the shared parameters ------------------------------------------------------------------------------


def test_shared_prefix_matching_nothing(case):
    pre, fine, pt, ft, q = case
    with _raises(r"shared='body' matches no parameter of the pretraining model.*\['backbone', 'head'\]"):
        _run(pre, fine, pt, ft, q, shared="body")
    with _raises(r"matches no parameter of the finetune model"):
        _run(pre, nn.Linear(3, 2).double(), pt, ft, q)
    with _raises(r"not a parameter-name prefix"):
        _run(pre, fine, pt, ft, q, shared="backbone.")
    with _raises(r"matches no parameter"):  # a prefix of a name is not a module prefix
        _run(pre, fine, pt, ft, q, shared="back")


def test_different_shared_names_between_models(case):
    pre, _, pt, ft, q = case
    fine = TinyNet(classes=2).double()
    fine.backbone = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    with _raises(r"shared parameters under 'backbone' differ between the stages.*backbone\.2\.weight"):
        _run(pre, fine, pt, ft, q, mode="updated", alpha=1.0)


def test_different_shared_shapes(case):
    pre, _, pt, ft, q = case
    fine = TinyNet(hidden=5, classes=2).double()
    with _raises(r"'backbone\.0\.weight' has shape \(4, 3\) in the pretraining model but \(5, 3\)"):
        _run(pre, fine, pt, ft, q, mode="updated", alpha=1.0)


def test_fixed_mode_with_a_changed_backbone(case):
    pre, fine, pt, ft, q = case
    with torch.no_grad():
        fine.backbone[0].bias[1] += 1e-6
    with _raises(r"mode='fixed' needs the finetune model's shared parameters to equal.*backbone\.0\.bias"):
        _run(pre, fine, pt, ft, q, mode="fixed")
    _run(pre, fine, pt, ft, q, mode="updated", alpha=1.0)  # the same models are fine in updated mode


# -- settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 0, 0.0, -1.0, float("nan"), float("inf"), "0.1", True])
def test_alpha_missing_or_not_positive_in_updated_mode(case, alpha):
    pre, fine, pt, ft, q = case
    with _raises(r"mode='updated' needs alpha > 0" if alpha is None else r"alpha must be a finite number > 0"):
        _run(pre, fine, pt, ft, q, mode="updated", alpha=alpha)


@pytest.mark.parametrize("damping", [-1e-3, float("nan"), float("inf"), "0.1", True])
def test_bad_damping(case, damping):
    pre, fine, pt, ft, q = case
    with _raises(r"damping must be a finite number ≥ 0"):
        _run(pre, fine, pt, ft, q, damping=damping)
    with _raises(r"damping must be a finite number ≥ 0"):
        single_stage_influence(pre, loader(pt), loader(q), damping=damping)


def test_unknown_solver_mode_scoring_and_option(case):
    pre, fine, pt, ft, q = case
    with _raises(r"Unknown solver 'newton'"):
        _run(pre, fine, pt, ft, q, solver="newton")
    with _raises(r"Unknown mode 'frozen'"):
        _run(pre, fine, pt, ft, q, mode="frozen")
    with _raises(r"Unknown scoring 'fwd'"):
        _run(pre, fine, pt, ft, q, scoring="fwd")
    with _raises(r"Unknown solver option\(s\) \['lissa_steps'\]"):
        _run(pre, fine, pt, ft, q, lissa_steps=10)
    with _raises(r"Unknown solver option\(s\) \['maxiter'\]"):
        single_stage_influence(pre, loader(pt), loader(q), solver="cg", maxiter=10)


@pytest.mark.parametrize("option,match", [
    (dict(tol=0.0), r"tol must be a finite number > 0"),
    (dict(max_iter=0), r"max_iter must be a positive integer"),
    (dict(lissa_depth=0), r"lissa_depth must be a positive integer"),
    (dict(lissa_scale=-1.0), r"lissa_scale must be a finite number > 0"),
    (dict(hessian_samples=0), r"hessian_samples must be a positive integer"),
])
def test_bad_option_values(case, option, match):
    pre, fine, pt, ft, q = case
    with _raises(match):
        _run(pre, fine, pt, ft, q, **option)


def test_exact_solver_over_max_dense_params(case):
    pre, fine, pt, ft, q = case  # 31 pretraining parameters (θ + U), 10 finetune-only (W)
    with _raises(r"dense 31×31 Hessian .* over max_dense_params=30"):
        _run(pre, fine, pt, ft, q, solver="exact", max_dense_params=30, damping=0.1)
    with _raises(r"max_dense_params=5.*solver='cg'"):
        _run(pre, fine, pt, ft, q, solver="exact", max_dense_params=5, damping=0.1)
    result = compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), shared="backbone", max_dense_params=30,
                                damping=0.1, tol=1e-12)  # solver="auto" takes block CG past max_dense_params
    solves = result.info["solves"]
    assert solves["pretrain"]["solver"] == "block_cg" and solves["finetune"]["solver"] == "exact"


# -- losses ---------------------------------------------------------------------------------------------


def test_loss_returning_a_scalar(case):
    pre, fine, pt, ft, q = case
    mean = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])
    with _raises(r"must return one loss per example \(shape \[4\] for this batch\) but returned \(\)"):
        _run(pre, fine, pt, ft, q, loss_fn=mean)
    with _raises(r"The pretraining loss must return one loss per example"):
        _run(pre, fine, pt, ft, q, pretrain_loss_fn=mean)
    with _raises(r"The (training|query) loss must return one loss per example"):
        single_stage_influence(pre, loader(pt), loader(q), loss_fn=mean)


def test_loss_with_the_wrong_shape(case):
    pre, fine, pt, ft, q = case
    column = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], reduction="none")[:, None]
    with _raises(r"one loss per example \(shape \[4\] for this batch\) but returned \(4, 1\)"):
        _run(pre, fine, pt, ft, q, finetune_loss_fn=column, mode="updated", alpha=1.0)
    logits = lambda model, batch: model(batch[0])  # [B, classes]
    with _raises(r"The query loss must return one loss per example .* returned \(4, 2\)"):
        _run(pre, fine, pt, ft, q, query_fn=logits)


def test_default_loss_needs_pairs(case):
    pre, fine, pt, ft, q = case
    x = [t[0] for t in (pt.tensors, ft.tensors, q.tensors)]
    with _raises(r"The default loss expects \(x, y\) batches"):
        multistage_influence(pre, fine, *[loader(TensorDataset(t)) for t in x], shared="backbone")


# -- data ---------------------------------------------------------------------------------------------


def _with(data: TensorDataset, row: int, value: float) -> TensorDataset:
    x, y = data.tensors
    x = x.clone()
    x[row, 1] = value
    return TensorDataset(x, y)


def test_nan_in_the_data(case):
    """Every example is checked before any solve: a NaN/inf input is named by its dataset index, first batch or not."""
    pre, fine, pt, ft, q = case
    data = r"\. The data is the problem: fix or drop those examples of"
    with _raises(rf"NaN/inf in the pretraining input data at dataset indices \[2\]{data} pretrain_data"):
        _run(pre, fine, _with(pt, 2, float("nan")), ft, q)
    with _raises(rf"NaN/inf in the query input data at dataset indices \[4\]{data} query_data"):
        _run(pre, fine, pt, ft, _with(q, 4, float("inf")))
    with _raises(rf"NaN/inf in the pretraining input data at dataset indices \[10\]{data}"):  # a late batch
        _run(pre, fine, _with(pt, 10, float("nan")), ft, q)
    with _raises(rf"NaN/inf in the finetune input data at dataset indices \[9\]{data}"):
        _run(pre, fine, pt, _with(ft, 9, float("-inf")), q, mode="updated", alpha=1.0, solver="cg")
    with _raises(rf"NaN/inf in the training input data at dataset indices \[12\]{data} train_data"):
        single_stage_influence(pre, loader(_with(pt, 12, float("nan"))), loader(q), solver="lissa", damping=0.1)


@pytest.mark.parametrize("where", ["pre.head.weight", "pre.backbone.0.weight", "fine.head.bias"])
def test_nan_in_the_model_weights(case, where):
    pre, fine, pt, ft, q = case
    model, name = where.split(".", 1)
    target = {"pre": pre, "fine": fine}[model]
    with torch.no_grad():
        dict(target.named_parameters())[name].view(-1)[0] = float("nan")
    if name.startswith("backbone"):
        with torch.no_grad():
            fine.backbone[0].weight.view(-1)[0] = float("nan")  # a consistent (NaN) backbone in both
    with _raises(r"NaN/inf in the (pretraining|finetune|query) losses"):
        _run(pre, fine, pt, ft, q, damping=0.1)
    with _raises(r"NaN/inf in the (training|query) losses"):
        single_stage_influence(target, loader(pt), loader(q), damping=0.1)


@pytest.mark.parametrize("which", ["pretrain_data", "finetune_data", "query_data"])
def test_empty_data(case, which):
    pre, fine, pt, ft, q = case
    empty = TensorDataset(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    data = {"pretrain_data": pt, "finetune_data": ft, "query_data": q}
    for form in (lambda d: d, loader, lambda d: []):
        args = {k: (form(empty) if k == which else loader(v)) for k, v in data.items()}
        with _raises(rf"{which} is empty \(0 examples\)"):
            multistage_influence(pre, fine, args["pretrain_data"], args["finetune_data"], args["query_data"],
                                 shared="backbone")
    with _raises(r"train_data is empty"):
        single_stage_influence(pre, empty, loader(q))


def test_model_without_any_parameter():
    """Single stage on a model with no parameters at all (a wrong object passed as the model)."""
    data = TensorDataset(torch.randn(5, 3, dtype=torch.float64))
    with _raises(r"no trainable parameter"):
        single_stage_influence(nn.Tanh(), data, data, loss_fn=lambda m, batch: m(batch[0]).pow(2).sum(1))


def test_model_with_every_parameter_frozen(case):
    pre, _fine, pt, _ft, q = case
    pre.requires_grad_(False)
    with _raises(r"no trainable parameter"):
        single_stage_influence(pre, loader(pt), loader(q))


def test_data_that_is_not_data(case):
    pre, fine, _pt, ft, q = case
    with _raises(r"pretrain_data must be a DataLoader, a map-style Dataset or an iterable of batches"):
        multistage_influence(pre, fine, 42, loader(ft), loader(q), shared="backbone")


# -- solvers that cannot work on this system ------------------------------------------------------------


def test_cg_on_an_indefinite_hessian():
    """A random, untrained model and no damping: H is indefinite, CG must refuse, not return garbage."""
    pre, fine, pt, ft, q = problem(seed=0)
    with _raises(r"CG met non-positive curvature .* pretraining Hessian .*positive-definite.*Raise damping.*"
                 r"curvature='ggn'.*curvature='ekfac'"):
        _run(pre, fine, pt, ft, q, solver="cg", damping=0.0)
    with _raises(r"CG met non-positive curvature .* training Hessian .*positive-definite"):
        single_stage_influence(pre, loader(pt), loader(q), solver="cg")


def test_cg_on_a_concave_loss():
    """Negative-definite curvature: the very first CG step sees pᵀAp < 0."""
    model = nn.Linear(3, 1).double()
    data = TensorDataset(torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    concave = lambda m, batch: -m(batch[0]).squeeze(1) ** 2
    with _raises(r"non-positive curvature"):
        single_stage_influence(model, data, data, loss_fn=concave, solver="cg", damping=0.1)


def test_lissa_with_too_small_a_scale_diverges(case):
    pre, fine, pt, ft, q = case
    with _raises(r"LiSSA diverged .*lissa_scale=0\.001.*Raise lissa_scale"):
        _run(pre, fine, pt, ft, q, solver="lissa", damping=0.1, lissa_scale=1e-3)
    with _raises(r"LiSSA diverged on the training Hessian"):
        single_stage_influence(pre, loader(pt), loader(q), solver="lissa", damping=0.1, lissa_scale=0.05)


def test_cg_non_convergence_warns_with_the_residual(case):
    pre, fine, pt, ft, q = case
    residual = (r"did not converge in max_iter=1 iterations: largest relative residual ‖Ax − b‖/‖b‖ = "
                r"\d\.\d+(e-\d+)? > tol=1e-07\. Raise max_iter")
    with pytest.warns(UserWarning) as record:
        scores = _run(pre, fine, pt, ft, q, solver="cg", damping=0.1, max_iter=1)
    messages = [str(w.message) for w in record]
    for stage in ("finetune", "pretraining"):
        assert any(re.match(rf"CG on the {stage} Hessian {residual}", m) for m in messages), messages
    assert torch.isfinite(scores).all()
    with pytest.warns(UserWarning, match=rf"CG on the training Hessian {residual}"):
        single_stage_influence(pre, loader(pt), loader(q), solver="cg", damping=0.1, max_iter=1)
