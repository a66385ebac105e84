"""The built-in digits recipe: both stages re-optimised to machine precision, so removing one pretraining
example moves the query losses as the exact multi-stage scores predict, in both modes."""
from __future__ import annotations

import pytest
import torch

from lightning_msif import MSIFError
from lightning_msif.demo.digits_recipe import DigitsRecipe
from lightning_msif.evaluation import evaluate


@pytest.mark.parametrize("mode, alpha", [("fixed", None), ("updated", 1.0)])
def test_leave_one_out_follows_the_exact_scores(tmp_path, mode, alpha):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = evaluate(DigitsRecipe(mode=mode, alpha=alpha, queries=20), methods=["multistage", "random"],
                          solver="exact", loo={"examples": 8}, lds={"subsets": 0}, out_dir=str(tmp_path),
                          progress=False)
    finally:
        torch.set_num_threads(before)
    rows = {r["method"]: r for r in result.rows}
    assert rows["multistage"]["loo_pearson"] >= 0.95 and rows["multistage"]["loo_spearman"] >= 0.95, result.table()
    assert abs(rows["random"]["loo_pearson"]) < 0.3, result.table()
    assert result.retrained == 1 + 8 and result.settings["damping"] == pytest.approx(1e-2)


def test_settings_that_do_not_fit_are_refused():
    with pytest.raises(MSIFError, match="mode='updated' with alpha > 0"):
        DigitsRecipe(mode="updated")
    with pytest.raises(MSIFError, match="weight_decay=0.0 must be > 0"):
        DigitsRecipe(weight_decay=0.0)


def test_recipe_variants_a_small_finetune_set_and_a_convolutional_backbone():
    from lightning_msif.demo import DigitsClassifier

    small = DigitsRecipe(finetune_limit=20)
    assert len(small.finetune_data) == 20 and small.identity()["finetune_limit"] == 20
    assert "finetune_limit" not in DigitsRecipe().identity()  # older recipes keep their identity (and cache)
    cnn = DigitsClassifier(hidden=8, arch="cnn")
    assert any(isinstance(m, torch.nn.Conv2d) for m in cnn.backbone.modules())
    assert cnn(torch.zeros(3, 64)).shape == (3, 5)
    assert "Conv2d" in DigitsRecipe(arch="cnn").identity()["backbone"]  # a changed CNN does not reuse cached retrains


def test_cnn_recipe_reaches_the_optimum_of_both_stages_and_pretraining_helps():
    from torch.func import grad

    from lightning_msif.evaluation.retrain import query_losses, recipe_loss

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = DigitsRecipe(arch="cnn", finetune_limit=50, limit=400)
        every = torch.arange(len(recipe.pretrain_data))
        pre, fine = recipe(every.tolist(), 0)
        random = recipe.without_pretraining(0)
    finally:
        torch.set_num_threads(before)
    assert any(isinstance(m, torch.nn.Conv2d) for m in pre.backbone.modules())
    for space, objective, model in ((*recipe._pretrain_objective(pre, every), pre),
                                    (*recipe._finetune_objective(fine, pre), fine)):
        assert grad(objective)(space.flatten(dict(model.named_parameters()))).abs().max() <= recipe.tol
    loss = {name: query_losses(m, recipe.query_data, recipe_loss(recipe, "finetune", m)).mean().item()
            for name, m in (("pretrained", fine), ("random", random))}
    assert loss["pretrained"] < 0.8 * loss["random"], loss
