"""Curvatures and solvers as plug-ins, and one arguments object from every entry point to the solver.

- every registered solver against every registered curvature it supports, on the explicit matrix;
- a toy curvature and a toy solver, one class each, used by name through the public API and the callback;
- a setting (damping) followed from the functional API, the callback, ``msif score`` and ``evaluate`` to the
  curvature the solver sees;
- the schemas (Hydra, CLI, evaluation) are generated from the arguments' fields, defaults included.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import List, Tuple

import pytest
import torch
from lightning_fixtures import TinyDataModule, TinyModule, trainer
from reference import brute_force_single, loader, rel_err, trained_problem

from lightning_msif import (InfluenceArguments, MSIFError, MultiStageInfluence, MultiStageInfluenceConfig,
                            PretrainingSnapshot, ScoreArguments, compute_multistage, compute_single_stage,
                            load_pretrained, multistage_influence, per_example_gradients, single_stage_influence)
from lightning_msif.cli import COMMANDS, main, usage
from lightning_msif.core.curvature import CURVATURES, Curvature, HessianCurvature, register_curvature
from lightning_msif.core.data import ExampleSource
from lightning_msif.core.objective import Objective, cross_entropy_loss, evaluation
from lightning_msif.core.params import ParamSpace
from lightning_msif.core.solvers import SOLVERS, Solver, register_solver, solve
from lightning_msif.evaluation import EvaluationConfig

pytestmark = pytest.mark.usefixtures("single_thread")

DAMPING = 0.1


# -- toy plug-ins: one class each, nothing edited elsewhere --------------------------------------------------
@dataclass(frozen=True)
class ScaledIdentityOptions:
    toy_scale: float = 2.0  # C = toy_scale · I

    def __post_init__(self) -> None:
        if not self.toy_scale > 0:
            raise MSIFError(f"toy_scale must be > 0, got {self.toy_scale!r}.")


@dataclass(frozen=True)
class ScaledIdentity(Curvature):
    """``C = c·I``: with it, influence is the gradient dot product divided by ``c + λ``."""

    name = "toy_scaled_identity"
    Options = ScaledIdentityOptions

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.options.toy_scale * vectors


@dataclass(frozen=True)
class RichardsonOptions:
    toy_steps: int = 400
    toy_step_size: float = 0.2

    def __post_init__(self) -> None:
        if not self.toy_steps >= 1:
            raise MSIFError(f"toy_steps must be a positive integer, got {self.toy_steps!r}.")


class Richardson(Solver):
    """``x ← x + ω (b − A x)``: converges for a positive-definite A with ω below 2 / its largest eigenvalue."""

    name = "toy_richardson"
    Options = RichardsonOptions

    def steps(self, options: RichardsonOptions) -> int:
        return options.toy_steps

    def run(self, op, rhs, options, progress):
        x = torch.zeros_like(rhs)
        for _ in range(options.toy_steps):
            x = x + options.toy_step_size * (rhs - op.matmat(x))
        residual = ((op.matmat(x) - rhs).norm() / rhs.norm()).item()
        return x, {"relative_residual": residual}


@pytest.fixture(autouse=True, scope="module")
def toy_plug_ins():
    """Registered as a user would (``register_solver(cls)``, or the same as a class decorator); removed after
    this module, so other tests see the built-in plug-ins only."""
    register_curvature(ScaledIdentity)
    register_curvature(RecordingHessian)
    register_solver(Richardson)
    yield
    for name in ("toy_scaled_identity", "test_recording_hessian"):
        CURVATURES.remove(name)
    SOLVERS.remove("toy_richardson")


_ALL_SOLVERS = ("exact", "cg", "block_cg", "lissa", "direct", "toy_richardson")
_ALL_CURVATURES = ("hessian", "ggn", "kfac", "ekfac", "toy_scaled_identity")


# -- every solver × every curvature it supports ------------------------------------------------------------
def _operator(kind: type, damping: float = 1.0) -> Curvature:
    pre, _, pt, _, _ = trained_problem("fixed", None, DAMPING)
    obj = Objective(pre, cross_entropy_loss, ExampleSource(loader(pt), "pretrain_data"), "pretraining")
    names = [n for n, p in pre.named_parameters() if p.requires_grad]
    space = ParamSpace.of(obj.params, names)
    options = CURVATURES.options_of(kind, {})
    return kind.build(obj, space, range(len(pt)), damping=damping, shift=None, options=options)


# The operators have damping 1: eigenvalues in [0.9, 1.9] for the Hessian, so few steps converge.
_SOLVER_OPTIONS = {"cg": {"tol": 1e-12, "max_iter": 200}, "block_cg": {"tol": 1e-12, "max_iter": 200},
                   "lissa": {"lissa_depth": 120, "lissa_batch_size": 10**6},
                   "toy_richardson": {"toy_steps": 80, "toy_step_size": 0.5}}
_BOUND = {"lissa": 1e-8, "toy_richardson": 1e-8}


def _supported_pairs() -> List[Tuple[str, str]]:
    """(solver, curvature) pairs where the curvature class has every method the solver needs (read from the
    plug-in classes at collection time, before the toy ones are registered)."""
    solvers = {name: Richardson if name == "toy_richardson" else SOLVERS.get(name) for name in _ALL_SOLVERS}
    curves = {name: ScaledIdentity if name == "toy_scaled_identity" else CURVATURES.get(name) for name in _ALL_CURVATURES}
    return [(s, c) for s in _ALL_SOLVERS for c in _ALL_CURVATURES
            if all(callable(getattr(curves[c], need, None)) for need in solvers[s].needs)]


@pytest.mark.parametrize("solver, curvature", _supported_pairs())
def test_every_solver_on_every_curvature_it_supports(solver, curvature):
    impl, kind = SOLVERS.get(solver), CURVATURES.get(curvature)
    op = _operator(kind)
    assert impl.supports(op)
    with evaluation(op.objective.bound):
        rhs = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        dense = op.dense(10_000).double()
        x, info = solve(op, rhs, solver, SOLVERS.options_of(impl, _SOLVER_OPTIONS.get(solver, {})))
    expected = torch.linalg.solve(dense, rhs.T).T
    assert info["solver"] == solver and info["rhs"] == 3
    assert rel_err(x, expected) <= _BOUND.get(solver, 1e-8)


def test_the_matrix_holds_every_pair_but_the_closed_form_solver_on_curvatures_without_one():
    missing = {(s, c) for s in _ALL_SOLVERS for c in _ALL_CURVATURES} - set(_supported_pairs())
    assert missing == {("direct", c) for c in ("hessian", "ggn", "toy_scaled_identity")}


def test_every_plug_in_is_in_the_matrix_above():
    assert set(SOLVERS.names()) == set(_ALL_SOLVERS) and set(CURVATURES.names()) == {*_ALL_CURVATURES,
                                                                                     "test_recording_hessian"}
    assert SOLVERS.names()[:3] == ("exact", "cg", "lissa")
    assert CURVATURES.names()[0] == "hessian" and CURVATURES.get("hessian") is HessianCurvature


# -- the toy plug-ins through the public API ----------------------------------------------------------------
def test_a_toy_curvature_and_solver_work_by_name_everywhere():
    pre, fine, pt, ft, q = trained_problem("fixed", None, DAMPING)
    scores = single_stage_influence(pre, loader(pt), loader(q), damping=DAMPING, curvature="toy_scaled_identity",
                                    solver="toy_richardson", toy_scale=3.0)
    g_train, _ = per_example_gradients(pre, loader(pt))
    g_query, _ = per_example_gradients(pre, loader(q))
    expected = -(g_train @ g_query.T) / (3.0 + DAMPING)
    assert rel_err(scores, expected) <= 1e-10
    exact = single_stage_influence(pre, loader(pt), loader(q), damping=1.0, solver="toy_richardson",
                                   toy_steps=80, toy_step_size=0.6)
    assert rel_err(exact, brute_force_single(pre, pt, q, damping=1.0)) <= 1e-8  # toy solver, Hessian curvature
    args = InfluenceArguments(curvature="toy_scaled_identity", solver="toy_richardson",
                              curvature_options={"toy_scale": 5.0}, solver_options={"toy_steps": 10})
    assert args.curvature_options_of("toy_scaled_identity").toy_scale == 5.0
    assert args.solver_options_of("toy_richardson").toy_steps == 10
    with pytest.raises(MSIFError, match=r"toy_scale must be > 0"):
        InfluenceArguments(curvature_options={"toy_scale": -1.0})
    with pytest.raises(MSIFError, match=r"Unknown curvature 'nope'.*'auto', 'hessian'.*'toy_scaled_identity'"):
        InfluenceArguments(curvature="nope")


def test_toy_plug_ins_in_the_callback(tmp_path):
    d = tmp_path / "msif"
    pre_module, dm = TinyModule(), TinyDataModule()
    trainer(callbacks=[PretrainingSnapshot(d)]).fit(pre_module, datamodule=dm)
    fine = load_pretrained(TinyModule(classes=2, freeze_backbone=True, init_seed=1), d)
    ft_dm = TinyDataModule(n=11, classes=2, seed=5)
    cb = MultiStageInfluence(d, curvature="toy_scaled_identity", solver="toy_richardson", damping=DAMPING,
                             curvature_options={"toy_scale": 4.0}, progress=False, report=False)
    trainer(callbacks=[cb]).fit(fine, datamodule=ft_dm)
    ref = multistage_influence(pre_module, fine, dm.train_set, ft_dm.train_set, ft_dm.val_set, shared="backbone",
                               damping=DAMPING, curvature="toy_scaled_identity", solver="toy_richardson", toy_scale=4.0)
    assert rel_err(cb.scores, ref) <= 1e-10
    assert cb.info["solves"]["pretrain"]["solver"] == "toy_richardson"


# -- one setting followed from each entry point to the curvature ----------------------------------------------
@dataclass(frozen=True)
class RecordingHessian(HessianCurvature):
    """The exact Hessian, recording the damping of every operator built (what the solver will see)."""

    name = "test_recording_hessian"

    @classmethod
    def build(cls, objective, space, indices, *, damping, shift, options):
        RECORDED.append((objective.role, damping))
        return super().build(objective, space, indices, damping=damping, shift=shift, options=options)


RECORDED: List[Tuple[str, float]] = []


def _dampings() -> List[float]:
    """The damping of every inverted operator built since the last call (off-diagonal blocks have none)."""
    out = [d for _, d in RECORDED if d != 0.0]
    RECORDED.clear()
    return out


def test_damping_reaches_the_solver_from_every_entry_point(tmp_path):
    pre, fine, pt, ft, q = trained_problem("fixed", None, DAMPING)
    RECORDED.clear()
    multistage_influence(pre, fine, loader(pt), loader(ft), loader(q), shared="backbone", damping=0.37,
                         curvature="test_recording_hessian")
    assert _dampings() == [0.37, 0.37]  # finetune (W) and pretraining (θ, U) solves

    d = tmp_path / "msif"
    trainer(callbacks=[PretrainingSnapshot(d)]).fit(TinyModule(), datamodule=TinyDataModule())
    tuned = load_pretrained(TinyModule(classes=2, freeze_backbone=True, init_seed=1), d)
    cb = MultiStageInfluence(d, damping=0.41, curvature="test_recording_hessian", progress=False, report=False)
    trainer(callbacks=[cb]).fit(tuned, datamodule=TinyDataModule(n=11, classes=2, seed=5))
    assert _dampings() == [0.41, 0.41] and cb.arguments.damping == 0.41

    (d / "scores.safetensors").unlink()
    assert main(["score", f"snapshot_dir={d}", "damping=0.43", "report=false", "progress=false"]) == 0
    assert _dampings() == [0.43, 0.43]  # the curvature came from the last run's scores.yaml, damping from the CLI
    assert main(["score", f"snapshot_dir={d}", "report=false", "progress=false"]) == 0
    assert _dampings() == [0.43, 0.43]  # and now damping too

    from test_evaluation import tiny_recipe

    from lightning_msif.evaluation import evaluate

    evaluate(tiny_recipe(), out_dir=str(tmp_path / "eval"), methods=["multistage"], loo={"examples": 2},
             lds={"subsets": 0}, solver="exact", curvature="test_recording_hessian", damping=0.47, progress=False)
    assert _dampings() == [0.47, 0.47]


# -- the schemas are generated from the arguments' fields -----------------------------------------------------
def _field_defaults(cls: type) -> dict:
    from dataclasses import MISSING

    return {f.name: (f.default_factory() if f.default is MISSING else f.default) for f in fields(cls)}


@pytest.mark.parametrize("function, arguments", [(compute_multistage, InfluenceArguments),
                                                 (compute_single_stage, ScoreArguments)])
def test_functional_keywords_match_the_arguments(function, arguments):
    params = inspect.signature(function).parameters
    for name, default in _field_defaults(arguments).items():
        assert name in params, name
        given = params[name].default
        if name == "shared":
            assert given is inspect.Parameter.empty  # required in the functional API
        elif name.endswith("_options"):
            assert given is None
        else:
            assert given == default, name
    wrapper = multistage_influence if function is compute_multistage else single_stage_influence
    assert list(inspect.signature(wrapper).parameters) == list(params)  # help() shows every keyword


def test_schemas_hold_every_argument_with_its_default_and_help():
    hydra = _field_defaults(MultiStageInfluenceConfig)
    for name, default in _field_defaults(InfluenceArguments).items():
        assert hydra[name] == default and _field_defaults(COMMANDS["score"])[name] == default
    evaluation = _field_defaults(EvaluationConfig)
    for name, default in _field_defaults(ScoreArguments).items():
        expected = {"solver": "cg", "damping": None}.get(name, default)
        assert evaluation[name] == expected and _field_defaults(COMMANDS["evaluate"])[name] == expected
    text = usage()
    for f in fields(InfluenceArguments):
        assert f.metadata["help"] in text


def test_arguments_are_frozen_and_recorded_in_full():
    args = InfluenceArguments(mode="fixed", alpha=0.5, curvature="hessian", solver="cg", solver_options={"tol": 1e-9})
    with pytest.raises(AttributeError):
        args.damping = 1.0  # type: ignore[misc]
    record = args.record()
    assert record["alpha"] is None  # α does not apply in fixed mode
    assert record["solver_options"] == {"tol": 1e-9, "max_iter": 500}
    assert record["curvature_options"] == {"rhs_chunk_size": None}  # None: sized by memory
    assert InfluenceArguments.from_mapping(record).solver_options_of("cg").tol == 1e-9
    assert InfluenceArguments().record()["solver_options"] == {}  # auto: the chosen solver is in the run's info
    with pytest.raises(MSIFError, match=r"Unknown setting\(s\) \['bogus'\]"):
        InfluenceArguments.from_mapping({**record, "bogus": 1})


def test_a_solver_that_needs_what_a_curvature_lacks_is_refused():
    @register_solver
    class NeedsInverse(Solver):
        name = "test_needs_inverse"
        needs = ("inverse_matmat",)

        def run(self, op, rhs, options, progress):
            return op.inverse_matmat(rhs), {}

    try:
        pre, _, pt, _, q = trained_problem("fixed", None, DAMPING)
        with pytest.raises(MSIFError, match=r"solver='test_needs_inverse' needs a curvature with \['inverse_matmat'\]"):
            single_stage_influence(pre, loader(pt), loader(q), damping=DAMPING, solver="test_needs_inverse")
    finally:
        SOLVERS.remove("test_needs_inverse")
