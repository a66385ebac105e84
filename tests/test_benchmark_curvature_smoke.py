"""Smoke test of ``benchmarks/curvature_vs_peers.py`` on a tiny problem (a few seconds).

- our ``ekfac`` / ``kfac`` with the empirical Fisher equal kronfluence's (deterministic: same factors, same
  damping) once kronfluence's pairwise scores are negated and transposed — the documented ``−Sᵀ``;
- our exact-Hessian scores equal pyDVL's ``DirectInfluence`` (``influences(mode=Up)`` = ``−Sᵀ``), and our CG
  equals pyDVL's block CG where ``H + λI`` is positive definite;
- the table prints, also as markdown.

The peers are benchmark-only dependencies (``benchmarks/requirements.txt``): each test is skipped, saying
why, when its peer cannot be imported.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "curvature_vs_peers.py"

pytestmark = pytest.mark.usefixtures("single_thread")


def _bench():
    spec = importlib.util.spec_from_file_location("curvature_vs_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _bench()


def _args(*extra: str):
    return bench.parse_args(["--n-train", "60", "--n-query", "4", "--hidden", "4", "--train-epochs", "3",
                             "--batch-size", "20", "--repeats", "1", *extra])


@pytest.fixture(scope="module")
def problem():
    args = _args()
    return bench.make_problem(args), args


def _require(module: str) -> None:
    if bench.available(module) is None:
        pytest.skip(f"{module} is not importable: it is a benchmark-only dependency "
                    f"(pip install -c .venv/constraints.txt -r benchmarks/requirements.txt)")


def test_problem_and_table(problem, capsys) -> None:
    p, args = problem
    assert p.dim == 64 * 4 + 4 + 4 * 10 + 10
    assert len(p.train) == 60 and len(p.query) == 4
    rows, runs = bench.section_curvature(p, args, have_kron=False)
    ref = runs["ggn"].scores
    assert ref.dtype == torch.float64 and ref.shape == (60, 4)
    for key in ("ekfac", "ekfac_emp", "kfac", "kfac_emp"):
        assert runs[key].scores is not None and runs[key].scores.shape == (60, 4)
    bench.print_table(bench.table(rows), markdown=True)
    out = capsys.readouterr().out
    assert out.startswith("| section | library | method |") and "ekfac (empirical Fisher)" in out


def test_empirical_fisher_equals_kronfluence(problem) -> None:
    _require("kronfluence")
    p, args = problem
    for curvature in ("ekfac", "kfac"):
        ours = bench.run_ours(curvature, curvature, p, args, curvature=curvature, solver="direct", fisher="empirical",
                              relative_damping=0.0)
        theirs = bench.run_kronfluence("k", curvature, True, p, args)
        assert bench.rel_err(theirs.scores, ours.scores) < 1e-4, curvature
        assert bench.best_scale(theirs.scores, ours.scores) == pytest.approx(1.0, abs=1e-4)


def test_exact_and_cg_equal_pydvl(problem) -> None:
    _require("pydvl")
    p, args = problem
    ours = bench.run_ours("h", "exact", p, args, curvature="hessian", solver="exact")
    theirs = bench.run_pydvl("d", "direct", p, args)
    assert bench.rel_err(theirs.scores, ours.scores) < 1e-3
    assert bench.best_scale(theirs.scores, ours.scores) == pytest.approx(1.0, abs=1e-3)
    smallest = bench.hessian_spectrum(p)[0].item()  # the Hessian's smallest eigenvalue
    lam = 2 * max(-smallest, 0.0) + 0.1  # H + λI ≻ 0: CG's precondition (this barely trained model is far from it)
    ours_cg = bench.run_ours("c", "cg", p, args, damping=lam, curvature="hessian", solver="cg", tol=1e-6)
    theirs_cg = bench.run_pydvl("dc", "cg", p, args, damping=lam)
    assert ours_cg.scores is not None, ours_cg.info
    assert bench.rel_err(theirs_cg.scores, ours_cg.scores) < 1e-3
