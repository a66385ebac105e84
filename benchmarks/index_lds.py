"""Does the gradient index still predict retraining? LDS and leave-one-out of index scores on the digits recipe.

``DigitsRecipe`` with 50 finetune examples (as docs/results.md §7), fixed mode, scored with EK-FAC (the curvature
the index is balanced by) three ways: the exact scoring pass, and gradient indexes (eigen and random projections)
of a few sizes per side of each layer; plus grad-dot as the no-curvature floor. The index scores go to
``evaluate`` as extra scores, so every row is measured against the same retraining runs.

    python benchmarks/index_lds.py            # about 4 minutes on 2 cores
    python benchmarks/index_lds.py --arch cnn # the convolutional recipe
    python benchmarks/index_lds.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_msif import MemoryIndexStore, capture_gradient_index  # noqa: E402
from lightning_msif.core.arguments import InfluenceArguments  # noqa: E402
from lightning_msif.core.influence import multistage_scores  # noqa: E402
from lightning_msif.demo.digits_recipe import DigitsRecipe  # noqa: E402
from lightning_msif.evaluation import EvaluationConfig, LDSConfig, LOOConfig, evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 removals, 4 subsets × 2 seeds")
    ap.add_argument("--dims", default="2,4,8", help="index sizes per side of each layer")
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--arch", default="mlp", choices=["mlp", "cnn"], help="the recipe's backbone (results.md §7.1)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = DigitsRecipe(hidden=args.hidden, finetune_limit=50, arch=args.arch)
    n = len(recipe.pretrain_data)
    pre, fine = recipe(range(n), 0)  # the models `evaluate` scores (its seed 0, all examples)
    settings = InfluenceArguments(shared=recipe.shared, mode=recipe.mode, alpha=recipe.alpha, damping=recipe.damping,
                                  curvature="ekfac")
    data = (recipe.pretrain_data, recipe.finetune_data, recipe.query_data)
    extra, sizes = {}, {}
    for projection in ("eigen", "random"):
        for dim in [int(d) for d in args.dims.split(",")]:
            index = capture_gradient_index(pre, recipe.pretrain_data, MemoryIndexStore(), shared=recipe.shared, dim=dim,
                                           projection=projection, arguments=settings)
            name = f"index, {projection}, dim {dim}"
            extra[name] = multistage_scores(pre, fine, *data, settings, index=index).scores
            sizes[name] = index.projection["out_dim"]
    quick = args.quick
    with tempfile.TemporaryDirectory() as out:
        config = EvaluationConfig(out_dir=out, loo=LOOConfig(examples=5 if quick else 100),
                                  lds=LDSConfig(subsets=4 if quick else 40, seeds=[0, 1] if quick else [0, 1, 2]),
                                  progress=False)
        start = time.perf_counter()
        result = evaluate(recipe, config, curvature="ekfac", solver="direct", methods=["multistage", "grad_dot"],
                          extra_scores=extra)
    dim = sum(p.numel() for n_, p in pre.named_parameters() if p.requires_grad)
    print(f"digits recipe ({args.arch}), {n} pretraining examples, {len(recipe.query_data)} queries, {dim} pretraining "
          f"parameters; EK-FAC; evaluation {time.perf_counter() - start:.0f} s")
    print("| method | numbers per example | LOO Pearson | LOO Spearman | LDS (mean ± std) |")
    print("|---|---|---|---|---|")
    for row in result.rows:
        size = sizes.get(row["method"], dim if row["method"] == "multistage" else "")
        std = f" ± {row['lds_std']:.3f}" if row.get("lds_std") is not None else ""
        print(f"| {row['method']} | {size} | {row['loo_pearson']:.3f} | {row['loo_spearman']:.3f} | "
              f"{row['lds_mean']:.3f}{std} |")


if __name__ == "__main__":
    main()
