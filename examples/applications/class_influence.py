"""Which pretraining digits feed which finetune digits, and does that follow how alike the digits look?

Pretrain on clean digits 0–4, finetune on 5–9, score every pretraining example on every finetune val and test
example, and average the scores over (pretraining digit a, query digit b): ``M[a, b] = mean S[i, j]``
(negative = digit a helps digit b). Visual similarity is the correlation of the two digits' mean 8×8
images. Reported: ``M``, the similarity, their Spearman correlation over the 25 cells (helpfulness ``−M``
against similarity), the same within each query digit (both matrices minus their column means) and for the
interaction alone (minus row and column means), each with an exact permutation p-value over the 120
relabellings of the pretraining digits.

    python examples/applications/class_influence.py            # 3 seeds, fixed and updated α=1, about 2 minutes
    python examples/applications/class_influence.py --quick    # seconds
"""
from __future__ import annotations

from itertools import combinations, permutations
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import spearmanr

from common import (Problem, Split, configs, digits_problem, finetune, finish, label, markdown_table, multistage,
                    parser, plt, pretrain, save, show, start)


def class_means(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.stack([x[y == c].mean(0) for c in range(classes)])


def influence_matrix(scores: torch.Tensor, pre_y: torch.Tensor, query_y: torch.Tensor,
                     shape: Tuple[int, int]) -> np.ndarray:
    """``M[a, b]``: mean score of pretraining class a on query class b."""
    return np.array([[scores[pre_y == a][:, query_y == b].mean().item() for b in range(shape[1])]
                     for a in range(shape[0])])


def similarities(p: Problem) -> Dict[str, np.ndarray]:
    """Pearson correlation of the mean images of each (pretraining digit, finetune digit) pair: as they are,
    and ``centred`` (minus the mean of all ten digits, so the stroke mass every digit shares does not count)."""
    means = torch.cat([class_means(p.pretrain.x, p.clean, len(p.pretrain_classes)),
                       class_means(p.finetune.x, p.finetune.y, len(p.finetune_classes))]).numpy()
    a = len(p.pretrain_classes)
    return {name: np.corrcoef(m)[:a, a:] for name, m in (("centred", means - means.mean(0)), ("raw", means))}


SCOPES = {"all 25 cells": "", "within each query digit": "columns", "interaction": "both"}


def centre(a: np.ndarray, how: str) -> np.ndarray:
    """``a`` minus its column means (``columns``), or minus row and column means (``both``: the interaction)."""
    if how == "columns":
        return a - a.mean(0)
    if how == "both":
        return a - a.mean(0) - a.mean(1, keepdims=True) + a.mean()
    return a


def agreement(m: np.ndarray, sim: np.ndarray) -> Dict[str, Tuple[float, float]]:
    """Spearman ρ of helpfulness −M with similarity per scope, with an exact p-value: the share of the row
    permutations of the similarity (relabellings of the pretraining digits) that correlate at least as well."""
    out = {}
    for name, how in SCOPES.items():
        rhos = [spearmanr(-centre(m, how).ravel(), centre(sim[list(order)], how).ravel())[0]
                for order in permutations(range(len(sim)))]
        out[name] = (rhos[0], float(np.mean(np.array(rhos) >= rhos[0] - 1e-12)))  # rhos[0]: the identity order
    return out


def stability(matrices: Sequence[np.ndarray], how: str) -> List[float]:
    """Spearman ρ between the (centred) matrices of every pair of seeds."""
    return [spearmanr(centre(a, how).ravel(), centre(b, how).ravel())[0] for a, b in combinations(matrices, 2)]


def heatmap(ax: plt.Axes, m: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, diverging: bool) -> None:
    limit = float(np.abs(m).max())
    im = ax.imshow(m, cmap="RdBu_r" if diverging else "viridis", vmin=-limit if diverging else None,
                   vmax=limit if diverging else None)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel="finetune (query) digit", ylabel="pretraining digit", title=title)
    middle = (m.max() + m.min()) / 2
    for (r, c), v in np.ndenumerate(m):
        dark = abs(v) > 0.6 * limit if diverging else v < middle
        ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    plt.colorbar(im, ax=ax, shrink=0.75)


def square(rows: Sequence[str], cols: Sequence[str], m: np.ndarray, fmt: str) -> str:
    body = [[r, *(fmt.format(v) for v in line)] for r, line in zip(rows, m)]
    return markdown_table(["pretraining \\ query", *cols], body)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--alphas", type=float, nargs="*", default=[1.0], help="updated-mode α values (none: fixed only)")
    args = p.parse_args()
    started = start(args)
    modes = configs(args.alphas[:1] if args.quick else args.alphas)
    names = [label(config) for config in modes]
    per_seed: Dict[str, List[np.ndarray]] = {name: [] for name in names}
    sims: Dict[str, List[np.ndarray]] = {"centred": [], "raw": []}
    for seed in args.seeds:
        problem = digits_problem(seed, corrupt_fraction=0.0, quick=args.quick)
        queries = Split(torch.cat([problem.val.x, problem.test.x]), torch.cat([problem.val.y, problem.test.y]))
        pre = pretrain(problem, seed)
        for kind, value in similarities(problem).items():
            sims[kind].append(value)
        shape = (len(problem.pretrain_classes), len(problem.finetune_classes))
        for name, config in zip(names, modes):
            scores = multistage(problem, pre, finetune(problem, pre, seed, *config), *config, queries=queries).scores
            per_seed[name].append(influence_matrix(scores, problem.clean, queries.y, shape))
    rows, cols = problem.pretrain_classes, problem.finetune_classes
    sim = {kind: np.mean(values, axis=0) for kind, values in sims.items()}
    for kind, value in sim.items():
        show(f"Visual similarity ({kind}): correlation of the mean images", square(rows, cols, value, "{:+.2f}"))
    summary = []
    for name in names:
        m = np.mean(per_seed[name], axis=0)
        show(f"Mean influence M[a, b] of pretraining digit a on query digit b, {name} (mean over {len(args.seeds)} "
             "seed(s); < 0 helpful, > 0 harmful)", square(rows, cols, m, "{:+.3g}"))
        show(f"Most helpful vs most similar (centred) pretraining digit per query digit, {name}", markdown_table(
            ["query digit", "most helpful (lowest M)", "most harmful (highest M)", "most similar"],
            [[c, rows[int(m[:, j].argmin())], rows[int(m[:, j].argmax())], rows[int(sim["centred"][:, j].argmax())]]
             for j, c in enumerate(cols)]))
        for kind, value in sim.items():
            for scope, (rho, pval) in agreement(m, value).items():
                seeds = [agreement(s, s_sim)[scope][0] for s, s_sim in zip(per_seed[name], sims[kind])]
                summary.append([name, kind, scope, f"{rho:+.2f}", f"{pval:.3f}", ", ".join(f"{r:+.2f}" for r in seeds)])
    show("Does helpfulness follow visual similarity? (Spearman ρ of −M with the similarity)", markdown_table(
        ["finetuning", "similarity", "compared", "ρ (seed mean)", "permutation p", "ρ per seed"], summary))
    show("Is M itself reproducible? Spearman ρ of M between two seeds (data split and initialisation)", markdown_table(
        ["finetuning", *(f"{scope}, per seed pair" for scope in SCOPES)],
        [[name, *(", ".join(f"{rho:+.2f}" for rho in stability(per_seed[name], how)) or "— (one seed)"
                  for how in SCOPES.values())]
         for name in names]))
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.4 * (len(names) + 1), 3.8))
    for ax, name in zip(axes, names):
        heatmap(ax, np.mean(per_seed[name], axis=0), rows, cols, f"mean S, {name}\n(blue: helpful, red: harmful)", True)
    heatmap(axes[-1], sim["centred"], rows, cols, "visual similarity (centred\ncorrelation of mean images)", False)
    fig.tight_layout()
    save(fig, args.out, "class_influence")
    finish(started)


if __name__ == "__main__":
    main()
