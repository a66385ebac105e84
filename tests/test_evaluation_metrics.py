"""The evaluation metrics on cases with a known answer: a world where retraining is exactly linear in the
subset (LDS and leave-one-out of its true scores = 1, of their negation = −1) and hand-made rankings."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_msif.evaluation import FunctionRecipe, evaluate
from lightning_msif.evaluation.metrics import lds, loo_correlations

N, K = 20, 4
A = torch.randn(N, K, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


class Outcome(nn.Module):
    """A 'finetuned model' whose loss on query ``j`` is ``v[j]`` (the backbone is only there to be shared)."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        self.backbone = nn.Linear(1, 1).double()
        self.v = nn.Parameter(v)


def linear_world(indices, seed):
    """Training on a subset gives query losses ``Σ_{i ∈ subset} A[i] + seed``: exactly linear, and a seed
    only shifts every subset alike (which no rank correlation sees)."""
    keep = torch.zeros(N, dtype=torch.float64)
    keep[list(indices)] = 1.0
    return Outcome(torch.zeros(K, dtype=torch.float64)), Outcome(keep @ A + seed)


def linear_recipe() -> FunctionRecipe:
    return FunctionRecipe(linear_world, TensorDataset(torch.arange(N)), TensorDataset(torch.arange(3)),
                          TensorDataset(torch.arange(K)), finetune_loss=lambda model, batch: model.v[batch[0]],
                          name="linear-world")


def test_exactly_linear_retraining_gives_lds_and_loo_of_one_and_minus_one(tmp_path):
    result = evaluate(linear_recipe(), methods=["random"], extra_scores={"exact": A, "reversed": -A},
                      loo={"examples": 8}, lds={"subsets": 15, "fraction": 0.5, "seeds": [0, 1]}, warm_start=False,
                      out_dir=str(tmp_path), progress=False)
    rows = {r["method"]: r for r in result.rows}
    for name, sign in (("exact", 1.0), ("reversed", -1.0)):
        for key in ("loo_pearson", "loo_spearman", "lds_mean"):
            assert rows[name][key] == pytest.approx(sign, abs=1e-6), (name, key)
        assert rows[name]["lds_std"] == pytest.approx(0.0, abs=1e-6)
        assert result.lds_per_seed[name] == pytest.approx([sign, sign], abs=1e-6)
    assert abs(rows["random"]["lds_mean"]) < 0.4 and abs(rows["random"]["loo_pearson"]) < 0.4
    # measured leave-one-out changes are −A[i] exactly; the removal predicted from A is −A[i] / n
    torch.testing.assert_close(result.loo_actual, -A[result.loo_indices])
    torch.testing.assert_close(result.predicted("exact") * N, result.loo_actual)
    assert result.lds_losses.shape == (2, 15, K) and result.lds_masks.sum(1).eq(10).all()


def test_lds_is_the_mean_over_queries_of_a_rank_correlation():
    masks = torch.eye(6, dtype=torch.bool)  # subset m holds example m: its summed score is scores[m]
    scores = torch.arange(6.0)[:, None].repeat(1, 2)
    losses = torch.stack([scores[:, 0].exp(), -scores[:, 1]], 1)[None]  # query 0: monotone, query 1: reversed
    assert lds(scores, masks, losses).tolist() == pytest.approx([0.0])
    # a rank metric: the exp of query 0 changes nothing
    assert lds(scores[:, :1], masks, losses[..., :1]).tolist() == pytest.approx([1.0])
    two_seeds = torch.cat([losses[..., :1], -losses[..., :1]])
    assert lds(scores[:, :1], masks, two_seeds).tolist() == pytest.approx([1.0, -1.0])


def test_loo_correlations_pool_every_pair():
    predicted = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    actual = torch.tensor([[1.0, 4.0], [9.0, 16.0]])
    out = loo_correlations(predicted, actual)
    assert out["spearman"] == pytest.approx(1.0)
    expected = torch.corrcoef(torch.stack([predicted.flatten(), actual.flatten()]))[0, 1].item()
    assert out["pearson"] == pytest.approx(expected)
