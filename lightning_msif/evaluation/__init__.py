"""Ground truth for the scores: retrain small two-stage models and measure what the scores predicted.

``evaluate(recipe, ...)`` runs leave-one-out and linear-datamodeling evaluations of the multi-stage
scores and of baselines (``msif evaluate`` on the command line); see ``evaluate.py``. Names are
imported on first use, so the settings (``config.py``) stay cheap for the CLI.
"""
from importlib import import_module
from typing import Any, List

_EXPORTS = {
    "METHODS": ".config",
    "EvaluationConfig": ".config",
    "LDSConfig": ".config",
    "LOOConfig": ".config",
    "EvaluationResult": ".result",
    "evaluate": ".evaluate",
    "RECIPES": ".recipe",
    "FunctionRecipe": ".recipe",
    "TwoStageRecipe": ".recipe",
    "build_recipe": ".recipe",
}

__all__ = ["METHODS", "RECIPES", "EvaluationConfig", "EvaluationResult", "FunctionRecipe", "LDSConfig", "LOOConfig",
           "TwoStageRecipe", "build_recipe", "evaluate"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_msif.evaluation' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
