"""Block CG: the same solutions as a dense solve, fewer iterations than independent CG recurrences, no breakdown
when right-hand sides are dependent or converge at different times, and the same refusal of an indefinite system."""
from __future__ import annotations

import pytest
import torch
from reference import loader, rel_err, trained_problem

from lightning_msif import MSIFError, compute_single_stage
from lightning_msif.core.curvature import HessianCurvature
from lightning_msif.core.data import ExampleSource
from lightning_msif.core.objective import Objective, cross_entropy_loss, evaluation
from lightning_msif.core.params import ParamSpace
from lightning_msif.core.solvers import SOLVERS, solve
from lightning_msif.core.solvers.cg import CGOptions

pytestmark = pytest.mark.usefixtures("single_thread")


def _op(damping: float):
    pre, _, pt, _, _ = trained_problem("fixed", None, 0.1)
    obj = Objective(pre, cross_entropy_loss, ExampleSource(loader(pt), "pretrain_data"), "pretraining")
    space = ParamSpace.of(obj.params, [n for n, _ in pre.named_parameters()])
    return pre, HessianCurvature.build(obj, space, range(len(pt)), damping=damping, shift=None,
                                       options=HessianCurvature.Options())


def test_block_cg_solves_dependent_right_hand_sides_in_fewer_iterations():
    pre, op = _op(0.3)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, op.dim, generator=g, dtype=torch.float64)
    rhs = torch.cat([base, 2 * base[:1], base[1:2] + base[2:3], 1e-6 * base[3:]])  # dependent, tiny
    options = CGOptions(tol=1e-10, max_iter=300)
    with evaluation(pre):
        dense = op.dense(10_000).double()
        x_block, info_block = solve(op, rhs, "block_cg", options)
        x_cg, info_cg = solve(op, rhs, "cg", options)
    expected = torch.linalg.solve(dense, rhs.T).T
    for x in (x_block, x_cg):
        assert ((x - expected).norm(dim=1) / expected.norm(dim=1)).max() <= 1e-8
    assert info_block["converged"] and info_block["relative_residual"] <= 1e-10
    assert info_block["iterations"] < info_cg["iterations"]


def test_block_cg_through_the_api_and_its_refusal_of_an_indefinite_system():
    pre, _, pt, _, q = trained_problem("fixed", None, 0.1)
    a = compute_single_stage(pre, loader(pt), loader(q), damping=0.3, solver="block_cg", tol=1e-11)
    b = compute_single_stage(pre, loader(pt), loader(q), damping=0.3, solver="exact")
    assert rel_err(a.scores, b.scores) <= 1e-8 and a.info["solves"]["pretrain"]["solver"] == "block_cg"
    _, op = _op(-0.5)  # a negative "damping" makes H + λI indefinite here
    with pytest.raises(MSIFError, match="CG met non-positive curvature"), evaluation(pre):
        SOLVERS.get("block_cg").run(op, torch.ones(2, op.dim, dtype=torch.float64), CGOptions(), None)
