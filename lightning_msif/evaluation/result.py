"""What an evaluation produced: the table of one row per method and everything it was computed from."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

COLUMNS = ("method", "loo_pearson", "loo_spearman", "lds_mean", "lds_std", "score_seconds")


@dataclass
class EvaluationResult:
    """The table (one row per method, ``COLUMNS``) and everything it was computed from.

    ``loo_actual[e, j]``: measured change of query ``j``'s loss when ``loo_indices[e]`` is removed (mean
    over seeds); ``lds_losses[s, m, j]``: query ``j``'s loss after training on subset ``lds_masks[m]`` with
    ``lds.seeds[s]``. ``retrained`` / ``reused``: runs trained now / found in the cache.
    """

    rows: List[Dict[str, Any]]
    scores: Dict[str, torch.Tensor]
    loo_indices: torch.Tensor
    loo_actual: torch.Tensor
    lds_masks: torch.Tensor
    lds_losses: torch.Tensor
    lds_per_seed: Dict[str, List[float]]
    settings: Dict[str, Any]
    retrained: int
    reused: int
    files: Dict[str, Any] = field(default_factory=dict)

    def predicted(self, method: str) -> torch.Tensor:
        """``[examples, queries]``: the loss changes ``method`` predicts for the leave-one-out removals."""
        return -self.scores[method][self.loo_indices] / self.settings["n_pretrain"]

    def table(self) -> str:
        """The rows as aligned text."""
        lines = [f"{'method':<14}{'LOO pearson':>13}{'LOO spearman':>14}{'LDS (mean ± std)':>20}{'score s':>10}"]
        for r in self.rows:
            lds_text = f"{_signed(r['lds_mean'])} ± {_signed(r['lds_std']).lstrip('+')}"
            lines.append(f"{r['method']:<14}{_signed(r['loo_pearson']):>13}{_signed(r['loo_spearman']):>14}{lds_text:>20}"
                         f"{r['score_seconds']:>10.2f}")
        return "\n".join(lines)


def _signed(v: Optional[float]) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:+.3f}"
