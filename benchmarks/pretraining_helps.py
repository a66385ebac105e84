"""Does the pretrained backbone help the finetune task? The digits recipe's query loss after finetuning (fixed
mode, both stages at the recipe's exact optimum) with the pretrained backbone and with a random one.

    python benchmarks/pretraining_helps.py                          # MLP, full and 50-example finetune sets
    python benchmarks/pretraining_helps.py --arch cnn               # the CNN backbone (seconds per training)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_msif.demo.digits_recipe import DigitsRecipe  # noqa: E402
from lightning_msif.evaluation.retrain import query_losses, recipe_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--arch", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--limits", default="none,50", help="finetune-set sizes, comma-separated ('none': all)")
    ap.add_argument("--hidden", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for text in args.limits.split(","):
        limit = None if text == "none" else int(text)
        recipe = DigitsRecipe(arch=args.arch, finetune_limit=limit, hidden=args.hidden)
        start = time.perf_counter()
        _, fine = recipe(list(range(len(recipe.pretrain_data))), 0)
        seconds = time.perf_counter() - start
        pretrained = query_losses(fine, recipe.query_data, recipe_loss(recipe, "finetune", fine)).mean().item()
        random_fine = recipe.without_pretraining(0)  # the same seed's initial backbone
        random = query_losses(random_fine, recipe.query_data, recipe_loss(recipe, "finetune", random_fine)).mean().item()
        print(f"{args.arch}, {len(recipe.finetune_data)} finetune examples, {len(recipe.query_data)} queries: query loss "
              f"{pretrained:.3f} with the pretrained backbone, {random:.3f} with a random one "
              f"(both stages trained in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
