"""lightning-msif: multi-stage influence functions for PyTorch Lightning."""
from .core.influence import (
    InfluenceResult,
    compute_multistage,
    compute_single_stage,
    multistage_influence,
    single_stage_influence,
)
from .errors import MSIFError

__version__ = "0.1.0"

__all__ = [
    "InfluenceResult",
    "MSIFError",
    "compute_multistage",
    "compute_single_stage",
    "multistage_influence",
    "single_stage_influence",
]
