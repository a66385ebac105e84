"""The settings of an evaluation (``evaluate`` and ``msif evaluate``): plain dataclasses, cheap to import."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

METHODS = ("multistage", "single_stage", "grad_dot", "random")


@dataclass
class LOOConfig:
    """Leave-one-out: remove one pretraining example at a time, retrain both stages, compare with ``−S/n``."""

    examples: int = 50  # examples drawn at random (0: no leave-one-out)
    indices: Optional[List[int]] = None  # remove these examples instead of a random draw
    seeds: List[int] = field(default_factory=lambda: [0])  # the measured change is averaged over these seeds


@dataclass
class LDSConfig:
    """Linear datamodeling score: retrain on random subsets, rank-correlate summed scores with the losses."""

    subsets: int = 50  # random subsets (0: no LDS)
    fraction: float = 0.5  # of the pretraining set kept in each subset, in (0, 1)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  # LDS is reported as mean ± std over these


@dataclass
class EvaluationConfig:
    """What ``evaluate`` (and ``msif evaluate``) measures and how the scores are computed."""

    out_dir: str = "msif-eval"  # evaluation.csv, evaluation.html, loo_scatter.png, evaluation.safetensors
    cache_dir: Optional[str] = None  # retraining outcomes (default <out_dir>/retrains): reuse it across evaluations
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    loo: LOOConfig = field(default_factory=LOOConfig)
    lds: LDSConfig = field(default_factory=LDSConfig)
    warm_start: bool = True  # retrain from the full-data models of the same seed (False: from the seed's init)
    seed: int = 0  # seed of the scored models; draws of removed examples and subsets; random scores
    damping: Optional[float] = None  # influence damping λ (null: the recipe's L2 penalty)
    solver: str = "cg"  # exact | cg | lissa
    solver_options: Dict[str, Any] = field(default_factory=dict)
    hessian_samples: Optional[int] = None
    chunk_size: Optional[int] = None
    scoring: str = "auto"
    progress: bool = True
