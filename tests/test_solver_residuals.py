"""Iterative solves measure ``‖Ax − b‖/‖b‖`` on the full operator once they stop, report it, and warn above tol.

The reference residual is computed here from the curvature's dense matrix; LiSSA draws mini-batches, so a
residual taken on one of them would not match it.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Tuple

import pytest
import torch
from reference import loader, trained_problem

from lightning_msif import InfluenceArguments, MSIFError, compute_single_stage
from lightning_msif.core.curvature import CURVATURES, Curvature
from lightning_msif.core.data import ExampleSource
from lightning_msif.core.objective import Objective, cross_entropy_loss, evaluation
from lightning_msif.core.params import ParamSpace
from lightning_msif.core.solvers import SOLVERS, solve
from lightning_msif.core.solvers.lissa import LissaOptions

pytestmark = pytest.mark.usefixtures("single_thread")

_NUMBER = r"(\d\.?\d*(?:e[-+]\d+)?)"


def _operator(curvature: str = "hessian", damping: float = 1.0, dtype: torch.dtype = torch.float64) -> Curvature:
    pre = trained_problem("fixed", None, 0.1)[0].to(dtype)
    pt = trained_problem("fixed", None, 0.1)[2]
    obj = Objective(pre, cross_entropy_loss, ExampleSource(loader(pt, 13), "pretrain_data"), "training")
    kind = CURVATURES.get(curvature)
    space = ParamSpace.of(obj.params, [n for n, p in pre.named_parameters() if p.requires_grad])
    return kind.build(obj, space, range(len(pt)), damping=damping, shift=None, options=CURVATURES.options_of(kind, {}))


def _solve(op: Curvature, solver: str, **options: Any) -> Tuple[dict, float, list]:
    """The solver's info, the residual measured here on the dense matrix, and the user warnings it gave."""
    with evaluation(op.objective.bound), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rhs = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(0), dtype=op.objective.dtype)
        x, info = solve(op, rhs, solver, SOLVERS.options_of(SOLVERS.get(solver), options))
        dense = op.dense(10_000).double()
    residual = ((x.double() @ dense - rhs.double()).norm(dim=1) / rhs.double().norm(dim=1)).max().item()
    return info, residual, [str(w.message) for w in caught if w.category is UserWarning]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("solver,options", [("cg", {"max_iter": 3}), ("cg", {"tol": 1e-12}),
                                            ("lissa", {"lissa_depth": 30, "lissa_batch_size": 5}),
                                            ("lissa", {"lissa_depth": 200})])
def test_reported_residual_is_the_full_operators(curvature, solver, options):
    info, residual, _ = _solve(_operator(curvature), solver, **options)
    tol = options.get("tol", 1e-7) if solver == "cg" else LissaOptions.lissa_tol
    assert info["relative_residual"] == pytest.approx(residual, rel=1e-6, abs=1e-14)
    assert info["converged"] == (residual <= tol)
    if "max_iter" in options or "lissa_batch_size" in options:
        assert residual > tol  # these stop early: the test sees a residual worth measuring


def test_cg_stopped_by_max_iter_warns_with_the_measured_residual():
    info, residual, messages = _solve(_operator(), "cg", max_iter=1)
    [message] = messages
    found = re.fullmatch(rf"CG on the training Hessian did not converge in max_iter=1 iterations: largest relative "
                         rf"residual ‖Ax − b‖/‖b‖ = {_NUMBER} > tol=1e-07\. Raise max_iter or damping\.", message)
    assert found, message
    assert float(found.group(1)) == pytest.approx(residual, rel=5e-3) and info["iterations"] == 1


def test_cg_whose_running_residual_drifts_below_tol_warns_with_the_true_one():
    """float32 and tol=1e-9: the recursive residual keeps shrinking, the true one stalls near float32's precision."""
    info, residual, messages = _solve(_operator(dtype=torch.float32), "cg", tol=1e-9, max_iter=200)
    assert info["iterations"] < 200 and residual > 1e-9 and not info["converged"]
    [message] = messages
    found = re.fullmatch(rf"CG on the training Hessian stopped on its running residual after \d+ iterations, but "
                         rf"rounding kept the true one higher: largest relative residual ‖Ax − b‖/‖b‖ = {_NUMBER} > "
                         r"tol=1e-09\. Raise tol to what this precision reaches \(or use float64\), or raise damping\.",
                         message)
    assert found, message
    assert float(found.group(1)) == pytest.approx(residual, rel=0.5)  # float32 products vs the float64 check


def test_converged_solves_do_not_warn():
    for solver, options in (("cg", {}), ("lissa", {"lissa_depth": 200})):
        info, residual, messages = _solve(_operator(), solver, **options)
        assert not messages and info["converged"] and residual < 1e-7


def test_lissa_with_too_few_terms_warns_with_the_measured_residual():
    info, residual, messages = _solve(_operator(), "lissa", lissa_depth=3)
    [message] = messages
    found = re.fullmatch(rf"LiSSA on the training Hessian \(3 terms × 1 repeats, curvature mini-batches of 13 of "
                         rf"13 examples\) stopped at largest relative residual ‖Ax − b‖/‖b‖ = {_NUMBER} > "
                         r"lissa_tol=0\.01\. Raise lissa_depth \(terms\), lissa_batch_size or lissa_repeats "
                         r"\(less mini-batch noise\), or damping; or use solver='cg'\.", message)
    assert found, message
    assert float(found.group(1)) == pytest.approx(residual, rel=5e-3) and not info["converged"]


def test_lissa_tol_only_decides_the_warning():
    loose, residual, messages = _solve(_operator(), "lissa", lissa_depth=3, lissa_tol=0.9)
    assert not messages and loose["converged"] and loose["relative_residual"] == pytest.approx(residual, rel=1e-6)
    with pytest.raises(MSIFError, match=r"lissa_tol must be a finite number > 0, got 0"):
        InfluenceArguments(solver="lissa", solver_options={"lissa_tol": 0})


def test_the_public_api_records_and_warns():
    model, _, train, _, q = trained_problem("fixed", None, 0.1)
    with pytest.warns(UserWarning, match=r"LiSSA on the training Hessian .* > lissa_tol=0\.01"):
        result = compute_single_stage(model, loader(train), loader(q), damping=0.1, solver="lissa", lissa_depth=5)
    solve_info = result.info["solves"]["pretrain"]
    assert solve_info["relative_residual"] > 0.01 and not solve_info["converged"] and solve_info["batch_size"] == 13
