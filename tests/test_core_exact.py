"""Every solver against the brute-force float64 evaluation of docs/math.md (tests/reference.py).

The models sit at the exact optimum of their training objective with an L2 penalty equal to the
damping, so ``H + λI`` is positive definite and CG / LiSSA apply.
"""
from __future__ import annotations

import pytest
import torch
from reference import (blobs, brute_force, brute_force_single, loader, pearson, problem, rel_err, solved_case,
                       trained_problem)

from lightning_msif import compute_multistage, compute_single_stage, multistage_influence, single_stage_influence
from lightning_msif.core.solvers.lissa import LissaOptions

DAMPING = 0.1
ALPHA = 1.0
MODES = ("fixed", "updated")

pytestmark = pytest.mark.usefixtures("single_thread")


def _case(mode: str):
    """The trained problem of ``mode`` and its brute-force scores (cached in ``reference``)."""
    return solved_case(mode, ALPHA, DAMPING)


def _multistage(pre, fine, pt, ft, q, mode, alpha, **kw):
    kw.setdefault("damping", DAMPING)
    return multistage_influence(pre, fine, loader(pt), loader(ft), loader(q), shared="backbone", mode=mode,
                                alpha=alpha, **kw)


def test_reference_scores_are_informative():
    """Guards the other tests against vacuity: scores are O(1), differ by mode, and per example."""
    fixed, updated = _case("fixed")[-1], _case("updated")[-1]
    assert fixed.shape == updated.shape == (13, 5)
    assert fixed.abs().max() > 0.1 and updated.abs().max() > 0.1
    assert rel_err(updated, fixed) > 0.05
    assert (fixed > 0).any() and (fixed < 0).any()


@pytest.mark.parametrize("mode", MODES)
def test_exact_matches_brute_force(mode):
    pre, fine, pt, ft, q, alpha, ref = _case(mode)
    scores = _multistage(pre, fine, pt, ft, q, mode, alpha, solver="exact")
    assert scores.shape == (len(pt), len(q))
    assert scores.dtype == torch.float64
    assert rel_err(scores, ref) <= 1e-8


@pytest.mark.parametrize("mode,alpha,damping", [("fixed", None, 1e-3), ("fixed", None, 0.5),
                                                ("updated", 0.3, 1e-3), ("updated", 3.0, 0.5)])
def test_exact_matches_brute_force_away_from_an_optimum(mode, alpha, damping):
    """The formulas hold at any parameters (here untrained ones), any α, small or large λ.

    (λ = 0 is left out: a softmax head's Hessian is singular, adding a constant to every logit does
    not change the loss, so the damping-free systems have no unique solution.)"""
    pre, fine, pt, ft, q = problem(seed=1)
    ref = brute_force(pre, fine, pt, ft, q, mode=mode, alpha=alpha, damping=damping)
    scores = _multistage(pre, fine, pt, ft, q, mode, alpha, damping=damping, solver="exact")
    assert rel_err(scores, ref) <= 1e-8


def test_exact_single_stage_matches_brute_force():
    model, _, train, _, q = trained_problem("fixed", None, DAMPING)
    ref = brute_force_single(model, train, q, damping=DAMPING)
    scores = single_stage_influence(model, loader(train), loader(q), damping=DAMPING, solver="exact")
    assert scores.shape == (len(train), len(q))
    assert scores.dtype == torch.float64
    assert rel_err(scores, ref) <= 1e-8
    # an untrained model, little damping: still the formula
    model = problem(seed=2)[0]
    ref = brute_force_single(model, train, q, damping=1e-3)
    assert rel_err(single_stage_influence(model, loader(train), loader(q), damping=1e-3), ref) <= 1e-8


@pytest.mark.parametrize("mode", MODES)
def test_cg_matches_brute_force(mode):
    pre, fine, pt, ft, q, alpha, ref = _case(mode)
    result = compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), shared="backbone", mode=mode,
                                alpha=alpha, damping=DAMPING, solver="cg", tol=1e-10)
    assert result.scores.dtype == torch.float64
    assert rel_err(result.scores, ref) <= 1e-5
    assert all(info["converged"] for info in result.info["solves"].values())


def test_cg_single_stage_matches_brute_force():
    model, _, train, _, q = trained_problem("fixed", None, DAMPING)
    ref = brute_force_single(model, train, q, damping=DAMPING)
    scores = single_stage_influence(model, loader(train), loader(q), damping=DAMPING, solver="cg", tol=1e-10)
    assert rel_err(scores, ref) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_lissa_minibatches_correlate_with_brute_force(mode):
    """Curvature from mini-batches of 8 of the 11–13 examples (lissa_batch_size=8, every other lissa_* option
    at its default): the averaged noise leaves the scores within 10 %, and a pretraining residual
    ‖Ax − b‖/‖b‖ (~0.035) above lissa_tol, which LiSSA reports."""
    pre, fine, pt, ft, q, alpha, ref = _case(mode)
    with pytest.warns(UserWarning, match=r"LiSSA on the pretraining Hessian .*mini-batches of 8 of 13 examples"):
        scores = multistage_influence(pre, fine, loader(pt, 8), loader(ft, 8), loader(q, 8), shared="backbone",
                                      mode=mode, alpha=alpha, damping=DAMPING, solver="lissa", lissa_batch_size=8)
    assert scores.dtype == torch.float64
    assert pearson(scores, ref) >= 0.99
    assert rel_err(scores, ref) <= 0.1


def test_lissa_full_batch_default_options_matches_brute_force():
    """Single stage, every lissa_* option at its default: 13 examples are fewer than the default
    lissa_batch_size, so the curvature is the full one, a deterministic Neumann series whose 1000 terms
    converge far below the tolerance here."""
    model, _, train, _, q = trained_problem("fixed", None, DAMPING)
    ref = brute_force_single(model, train, q, damping=DAMPING)
    scores = single_stage_influence(model, train, q, damping=DAMPING, solver="lissa")
    assert scores.dtype == torch.float64
    assert pearson(scores, ref) >= 0.99
    assert rel_err(scores, ref) <= 1e-6


def test_lissa_default_minibatch_does_not_depend_on_the_loaders_batch_size():
    """The default curvature sample is a number of examples, not the loader's batch (which sizes memory):
    loaders of batch 4 and 7 give the same scores, on 13 examples (all of them every step) and on 600
    (mini-batches of the default size, drawn by lissa_seed; two terms, a fixed scale, to stay fast)."""
    model, _, train, _, q = trained_problem("fixed", None, DAMPING)
    by_loader = [compute_single_stage(model, loader(train, b), loader(q), damping=DAMPING, solver="lissa",
                                      lissa_depth=100) for b in (4, 7)]
    assert rel_err(by_loader[0].scores, by_loader[1].scores) <= 1e-10
    assert [r.info["solves"]["pretrain"]["batch_size"] for r in by_loader] == [13, 13]
    big = blobs(600, 3, seed=7)
    default = LissaOptions().lissa_batch_size
    with pytest.warns(UserWarning, match=rf"LiSSA on the training Hessian .*mini-batches of {default} of 600"):
        by_loader = [compute_single_stage(model, loader(big, b), loader(q), damping=DAMPING, solver="lissa",
                                          lissa_depth=2, lissa_scale=5.0) for b in (4, 7)]
    assert rel_err(by_loader[0].scores, by_loader[1].scores) <= 1e-10
    assert [r.info["solves"]["pretrain"]["batch_size"] for r in by_loader] == [default, default] and default < 600


@pytest.mark.parametrize("mode", MODES + ("single",))
@pytest.mark.parametrize("n_query", [1, 5])
def test_grad_and_jvp_scoring_agree(mode, n_query):
    pre, fine, pt, ft, q, alpha, ref = _case("fixed" if mode == "single" else mode)
    q = torch.utils.data.TensorDataset(*(t[:n_query] for t in q.tensors))
    if mode == "single":
        ref = brute_force_single(pre, pt, q, damping=DAMPING)
        run = lambda scoring: single_stage_influence(pre, loader(pt), loader(q), damping=DAMPING, scoring=scoring)
    else:
        ref = ref[:, :n_query]
        run = lambda scoring: _multistage(pre, fine, pt, ft, q, mode, alpha, scoring=scoring)
    by = {s: run(s) for s in ("grad", "jvp", "auto")}
    for scoring, scores in by.items():
        assert scores.dtype == torch.float64
        assert rel_err(scores, ref) <= 1e-8, scoring
    assert rel_err(by["jvp"], by["grad"]) <= 1e-12
