"""lightning-msif: multi-stage influence functions for PyTorch Lightning.

Names are imported on first use, so the pure-torch core (and ``msif --help``) does not pay for
importing Lightning and W&B.
"""
from importlib import import_module
from typing import Any, List

from .version import __version__

_EXPORTS = {
    "MultiStageInfluence": ".callbacks",
    "PretrainingSnapshot": ".callbacks",
    "load_pretrained": ".callbacks",
    "MultiStageInfluenceConfig": ".config",
    "PretrainingSnapshotConfig": ".config",
    "register_configs": ".config",
    "InfluenceArguments": ".core.arguments",
    "ScoreArguments": ".core.arguments",
    "register_curvature": ".core.curvature",
    "Curvature": ".core.curvature",
    "register_solver": ".core.solvers",
    "Solver": ".core.solvers",
    "InfluenceResult": ".core.influence",
    "compute_multistage": ".core.influence",
    "compute_single_stage": ".core.influence",
    "multistage_influence": ".core.influence",
    "per_example_gradients": ".core.influence",
    "capture_gradient_index": ".core.influence",
    "GradientIndex": ".core.index",
    "MemoryIndexStore": ".core.index",
    "single_stage_influence": ".core.influence",
    "MSIFError": ".errors",
    "SnapshotDir": ".snapshots",
    "rescore": ".rescoring",
    "evaluate": ".evaluation",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_msif' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
