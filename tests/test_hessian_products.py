"""The exact Hessian's products (reverse-over-reverse, kept or rebuilt gradient graphs, any batching) against an
explicit float64 Hessian, and the exact solver's inertia (negative eigenvalues from its L D Lᵀ factorisation)."""
from __future__ import annotations

import pytest
import torch
from reference import _mean_hessian, loader, problem

from lightning_msif.core.curvature import HessianCurvature
from lightning_msif.core.curvature import hessian as hessian_module
from lightning_msif.core.data import ExampleSource
from lightning_msif.core.objective import Objective, cross_entropy_loss, evaluation
from lightning_msif.core.params import ParamSpace
from lightning_msif.core.solvers import solve
from lightning_msif.core.solvers.exact import ExactOptions, negative_eigenvalues

pytestmark = pytest.mark.usefixtures("single_thread")


def _setup(damping: float = 0.0):
    pre, _, pt, _, _ = problem(seed=1)  # untrained: the Hessian is indefinite
    obj = Objective(pre, cross_entropy_loss, ExampleSource(loader(pt, batch_size=4), "pretrain_data"), "pretraining")
    names = [n for n, _ in pre.named_parameters()]
    space = ParamSpace.of(obj.params, names)
    op = HessianCurvature.build(obj, space, range(len(pt)), damping=damping, shift=None,
                                options=HessianCurvature.Options())
    return pre, op, _mean_hessian(pre, names, pt)


@pytest.mark.parametrize("dense_bytes,kept_bytes", [(None, None), (None, 0), (1, 0)],
                         ids=["kept graphs, one batch", "rebuilt every product", "loader batches, one column"])
def test_hessian_products_equal_the_explicit_hessian(monkeypatch, dense_bytes, kept_bytes):
    if dense_bytes is not None:
        monkeypatch.setattr(hessian_module, "DENSE_BYTES", dense_bytes)
    if kept_bytes is not None:
        monkeypatch.setattr(hessian_module, "KEPT_BYTES", kept_bytes)
    pre, op, explicit = _setup()
    v = torch.randn(5, op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with evaluation(pre):
        first, again = op.matmat(v), op.matmat(2 * v)  # the second reuses the first's graphs when kept
        dense = op.dense(10_000)
    assert torch.allclose(first, v @ explicit, rtol=1e-10, atol=1e-12)
    assert torch.allclose(again, 2 * first, rtol=1e-10, atol=1e-12)
    assert torch.allclose(dense, explicit, rtol=1e-10, atol=1e-12)
    assert bool(op._kept) == (kept_bytes is None)
    batches = hessian_module.product_batch(op, 5)
    assert batches == (4 if dense_bytes is not None else len(op.indices))  # loader's batch, else all 13 examples


def test_negative_eigenvalues_count_the_1x1_and_2x2_pivots():
    g = torch.Generator().manual_seed(0)
    two_by_two = 0
    for n in (1, 2, 3, 9, 40):
        for _ in range(10):
            a = torch.randn(n, n, generator=g, dtype=torch.float64)
            a = (a + a.T) / 2
            a.diagonal().mul_(0.01)  # small diagonal: Bunch-Kaufman takes 2×2 pivots
            ld, pivots, _ = torch.linalg.ldl_factor_ex(a)
            two_by_two += int((pivots < 0).sum())
            assert negative_eigenvalues(ld, pivots) == int((torch.linalg.eigvalsh(a) < 0).sum())
    assert two_by_two > 50


@pytest.mark.parametrize("damping", [1e-3, 10.0])
def test_exact_solver_records_whether_the_system_is_positive_definite(damping):
    pre, op, explicit = _setup(damping)
    rhs = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with evaluation(pre):
        x, info = solve(op, rhs, "exact", ExactOptions())
    system = explicit + damping * torch.eye(op.dim, dtype=torch.float64)
    assert torch.allclose(x, torch.linalg.solve(system, rhs.T).T, rtol=1e-8, atol=1e-10)
    expected = int((torch.linalg.eigvalsh(system) < 0).sum())
    assert info["negative_eigenvalues"] == expected and info["positive_definite"] == (expected == 0)
    assert (expected > 0) == (damping < 1)  # both cases are exercised
