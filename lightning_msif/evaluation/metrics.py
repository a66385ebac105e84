"""How well scores predict retraining: leave-one-out correlations and the linear datamodeling score.

Sign and scale follow docs/math.md: removing pretraining example ``i`` changes query ``j``'s loss by
about ``−S[i, j] / n``, so training on a subset moves the loss by about ``Σ_{i ∈ subset} S[i, j] / n``
plus a constant: the summed scores of a subset should rise with its measured query losses.
"""
from __future__ import annotations

from typing import Dict

import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef


def loo_correlations(predicted: torch.Tensor, actual: torch.Tensor) -> Dict[str, float]:
    """Pearson and Spearman correlation of predicted and measured loss changes ``[examples, queries]``,
    over all (removed example, query) pairs."""
    p, a = predicted.reshape(-1).double(), actual.reshape(-1).double()
    return {"pearson": float(pearson_corrcoef(p, a)), "spearman": float(spearman_corrcoef(p, a))}


def lds(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Linear datamodeling score per seed ``[seeds]``.

    ``scores`` ``[n, queries]``; ``masks`` ``[subsets, n]`` (True: the example was trained on);
    ``losses`` ``[seeds, subsets, queries]`` measured after each retraining. For each seed: the mean over
    queries of the Spearman correlation, across subsets, of the subset's summed scores with the loss.
    """
    predicted = masks.double() @ scores.double()  # [subsets, queries]
    per_query = [spearman_corrcoef(predicted, seed.double()) for seed in losses]
    return torch.stack([q.reshape(-1).nanmean() for q in per_query])
