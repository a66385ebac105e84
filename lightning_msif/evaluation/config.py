"""The settings of an evaluation (``evaluate`` and ``msif evaluate``); how scores are computed comes from ``ScoreArguments``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..core.arguments import ScoreArguments, setting, settings_schema

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


EvaluationConfig = settings_schema(
    "EvaluationConfig",
    [
        ("out_dir", str, setting("msif-eval", "where evaluation.csv, evaluation.html, loo_scatter.png go")),
        ("cache_dir", Optional[str], setting(None, "retraining cache, reused by later evaluations (null: "
                                                   "<out_dir>/retrains)")),
        ("methods", List[str], setting(lambda: list(METHODS), "[multistage,single_stage,grad_dot,random] or a subset",
                                       factory=True)),
        ("loo", LOOConfig, setting(LOOConfig, "leave-one-out: loo.examples=50 (0: none) loo.indices=[3,17] "
                                              "loo.seeds=[0]", factory=True)),
        ("lds", LDSConfig, setting(LDSConfig, "linear datamodeling: lds.subsets=50 (0: none) lds.fraction=0.5 "
                                              "lds.seeds=[0,1,2]", factory=True)),
        ("warm_start", bool, setting(True, "retrain from the full-data models (true) or from the seed's "
                                           "initialisation (false)")),
        ("seed", int, setting(0, "seed of the scored models, of the removed examples and subsets, of random scores")),
        ("progress", bool, setting(True, "progress bars on rank 0")),
    ],
    base=ScoreArguments,
    defaults={"solver": (str, "cg"), "damping": (Optional[float], None)},
    doc="What ``evaluate`` (and ``msif evaluate``) measures, then how the scores are computed (ScoreArguments' "
        "fields; damping null: the recipe's L2 penalty).",
)
