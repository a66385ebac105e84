"""Bad input of a new user's kind (issue 11): each class is refused with an ``MSIFError`` naming the problem, the
dataset index where there is one, and the fix, before any expensive work; or, where it is sensible, supported."""
from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from reference import loader, trained_problem
from torch.utils.data import TensorDataset

from lightning_msif import MSIFError, multistage_influence, per_example_gradients, single_stage_influence
from lightning_msif.core.arguments import InfluenceArguments

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
    return {**{k: v for k, v in setting.items() if k in names}, "solver_options": solver, "curvature_options": curvature}


def test_every_entry_point_checks_chunk_size(case):
    pre, _fine, pt, _ft, q = case
    with _raises("chunk_size must be a positive integer", "got -1"):
        single_stage_influence(pre, loader(pt), loader(q), chunk_size=-1)
    with _raises("chunk_size must be a positive integer", "got 0"):
        per_example_gradients(pre, loader(pt), chunk_size=0)
