"""Hydra: the demo's YAML composes against the registered schema and instantiates the callbacks."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import ValidationError

from lightning_msif import (MSIFError, MultiStageInfluence, MultiStageInfluenceConfig, PretrainingSnapshot,
                            register_configs)

CONF = Path(__file__).parents[1] / "examples" / "digits" / "conf"


def _compose(tmp_path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=[f"snapshot_dir={tmp_path}", *overrides])


def test_compose_and_instantiate_both_callbacks(tmp_path):
    cfg = _compose(tmp_path, "mode=updated", "alpha=0.3", "solver=lissa", "+callbacks.finetune.hessian_samples=100")
    pre = instantiate(cfg.callbacks.pretrain, _convert_="all")
    ft = instantiate(cfg.callbacks.finetune, enforce_proximal=True, _convert_="all")
    assert isinstance(pre, PretrainingSnapshot) and pre.shared == "backbone" and pre.snapshot_dir == tmp_path
    assert isinstance(ft, MultiStageInfluence) and ft.arguments.mode == "updated" and ft.arguments.alpha == 0.3
    assert ft.arguments.solver == "lissa" and ft.arguments.hessian_samples == 100 and ft.enforce_proximal
    assert ft.arguments.solver_options["tol"] == pytest.approx(1e-5) and ft.snapshot_dir == tmp_path
    assert ft.arguments.curvature_options["rhs_chunk_size"] == 128


def test_schema_rejects_a_wrongly_typed_value(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(tmp_path, "callbacks.finetune.damping=lots")
    assert isinstance(err.value.__cause__, ValidationError) and "callbacks.finetune.damping" in str(err.value.__cause__)


def test_validation_names_the_key_and_allowed_values(tmp_path):
    cfg = _compose(tmp_path, "solver=newton")
    allowed = r"\['auto', 'exact', 'cg', 'lissa', 'direct', 'block_cg'\]"
    with pytest.raises(InstantiationException, match=rf"solver='newton' is not allowed; choose one of {allowed}"):
        instantiate(cfg.callbacks.finetune, _convert_="all")


def test_structured_config_defaults_build_a_callback(tmp_path):
    cb = instantiate(MultiStageInfluenceConfig(snapshot_dir=str(tmp_path), mode="updated", alpha=1.0))
    assert isinstance(cb, MultiStageInfluence) and cb.arguments.alpha == 1.0
    with pytest.raises(MSIFError, match="alpha"):
        MultiStageInfluence(tmp_path, mode="updated")
