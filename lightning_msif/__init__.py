"""lightning-msif: multi-stage influence functions for PyTorch Lightning."""
from .callback import MultiStageInfluence, load_pretrained
from .config import CallbackConfig, InfluenceConfig, register_configs
from .core.influence import (
    InfluenceResult,
    compute_multistage,
    compute_single_stage,
    multistage_influence,
    single_stage_influence,
)
from .errors import MSIFError
from .scoring_job import rescore
from .version import __version__

__all__ = [
    "CallbackConfig",
    "InfluenceConfig",
    "InfluenceResult",
    "MSIFError",
    "MultiStageInfluence",
    "__version__",
    "compute_multistage",
    "compute_single_stage",
    "load_pretrained",
    "multistage_influence",
    "register_configs",
    "rescore",
    "single_stage_influence",
]
