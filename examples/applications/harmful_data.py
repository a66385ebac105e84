"""Harmful pretraining data: do the multi-stage scores point at the pretraining examples whose labels were corrupted?

Pretrain on digits 0–4 with 5 % of the labels replaced by wrong ones, finetune on 5–9 (backbone ``fixed``, or
``updated`` with a few α), score every pretraining example on every finetune val example, and rank the
pretraining set four ways: net harm to the val set ``Σ_j S[i, j]`` (removing i changes the total val loss by
``−Σ_j S[i, j] / n``), net help ``−Σ_j S``, net influence of either sign ``|Σ_j S|``, and influence
``Σ_j |S|``. Baselines: random, and three rankings that look at the pretraining model alone (its loss,
single-stage self-influence, single-stage harm to the pretraining val set) — single-stage influence of the
finetuned model cannot see pretraining examples at all.
Then the solvers (exact, CG, LiSSA) on the same scores.

    python examples/applications/harmful_data.py            # 3 seeds, about 6 minutes on 2 CPU cores
    python examples/applications/harmful_data.py --quick    # seconds
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import spearmanr

from common import (PROBLEMS, Problem, configs, detection, evaluate, finish, finetune, label, markdown_table,
                    mean_std, multistage, multistage_rankings, parser, plt, pretrain, recall_curve, save, show,
                    single_stage_rankings, start)

SINGLE = "pretraining model alone"
PLOTTED = (("fixed", "influential Σ_j |S|"), ("fixed", "harmful Σ_j S"), ("fixed", "helpful −Σ_j S"),
           (SINGLE, "single-stage self-influence"), (SINGLE, "pretraining loss"))


@dataclass
class Detection:
    """Per-seed results of ``detect``; keys of ``metrics``/``curves`` are (group, ranking)."""

    problem: str
    n: int = 0
    n_corrupted: int = 0
    metrics: Dict[Tuple[str, str], List[Dict[str, float]]] = field(default_factory=lambda: defaultdict(list))
    curves: Dict[Tuple[str, str], List[np.ndarray]] = field(default_factory=lambda: defaultdict(list))
    accuracy: Dict[str, List[Tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    net_harmful: Dict[str, List[Tuple[float, float, float]]] = field(default_factory=lambda: defaultdict(list))
    seconds: Dict[str, List[float]] = field(default_factory=lambda: defaultdict(list))
    totals: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # first seed, fixed: Σ_j S and the corrupted mask

    def record(self, group: str, rankings: Dict[str, torch.Tensor], corrupted: torch.Tensor) -> None:
        for name, ranking in rankings.items():
            self.metrics[group, name].append(detection(ranking, corrupted))
            self.curves[group, name].append(recall_curve(ranking, corrupted))


def detect(make: Callable[[int], Problem], seeds: Sequence[int], alphas: Sequence[float]) -> Detection:
    """Scores and rankings for every seed and mode."""
    det = Detection(make(seeds[0]).name)
    for seed in seeds:
        p = make(seed)
        bad = p.corrupted
        det.n, det.n_corrupted = len(p.pretrain), len(bad)
        pre = pretrain(p, seed)
        started = time.perf_counter()
        det.record(SINGLE, single_stage_rankings(p, pre), bad)
        det.seconds[SINGLE].append(time.perf_counter() - started)
        for config in configs(alphas):
            fine = finetune(p, pre, seed, *config)
            det.accuracy[label(config)].append((evaluate(fine, p.val)[1], evaluate(fine, p.test)[1]))
            result = multistage(p, pre, fine, *config)
            det.seconds[label(config)].append(sum(result.info["seconds"].values()))
            det.record(label(config), multistage_rankings(result.scores), bad)
            total = result.scores.sum(1)
            mask = torch.zeros(len(total), dtype=torch.bool)
            mask[bad] = True
            magnitude = total[mask].abs().median() / total[~mask].abs().median()
            det.net_harmful[label(config)].append(
                ((total[mask] > 0).double().mean().item(), (total[~mask] > 0).double().mean().item(), magnitude.item()))
            if det.totals is None:
                det.totals = (total, mask)
    return det


def detection_table(det: Detection) -> str:
    rate = det.n_corrupted / det.n
    rows = [["—", "random (expected)", f"{rate:.2f}", f"{2 * rate:.2f}", "0.50"]]
    for (group, name), runs in det.metrics.items():
        rows.append([group, name] + [mean_std([r[key] for r in runs]) for key in ("P@k", "R@2k", "AUC")])
    return markdown_table(["scores", "ranking (first = most suspicious)", "P@k = R@k", "R@2k", "AUC"], rows)


def split_table(det: Detection) -> str:
    rows = []
    for config, shares in det.net_harmful.items():
        acc = det.accuracy[config]
        rows.append([config, mean_std([a[0] for a in acc]), mean_std([a[1] for a in acc]),
                     mean_std([s[0] for s in shares]), mean_std([s[1] for s in shares]),
                     mean_std([s[2] for s in shares], 1), mean_std(det.seconds[config], 1)])
    return markdown_table(["finetuning", "val acc", "test acc", "corrupted with Σ_j S > 0", "clean with Σ_j S > 0",
                           "median |Σ_j S| corrupted / clean", "scoring s"], rows)


def plot(det: Detection, out: Path, name: str) -> None:
    """Recall of the corrupted examples in the top k of each ranking; Σ_j S of clean and corrupted examples."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    k = np.arange(1, det.n + 1)
    top = min(det.n, 4 * det.n_corrupted)
    for key in PLOTTED:
        curve = np.mean(det.curves[key], axis=0)
        left.plot(k[:top], curve[:top], label=f"{key[1]} ({key[0]})")
    left.plot(k[:top], k[:top] / det.n, "k:", label="random")
    left.axvline(det.n_corrupted, color="grey", lw=0.6)
    left.set(xlabel="k (pretraining examples inspected, most suspicious first)", ylabel="share of corrupted found",
             title=f"{det.problem}: corrupted labels in the top k", ylim=(0, 1.02))
    left.legend(fontsize=7, loc="lower right")
    total, mask = det.totals
    values = total.numpy()
    rng = np.random.default_rng(0)
    for row, (sel, color) in enumerate(((~mask, "#7f8c8d"), (mask, "#c0392b"))):
        v = values[sel.numpy()]
        right.scatter(v, row + rng.uniform(-0.25, 0.25, len(v)), s=6, color=color, alpha=0.6)
    right.set_xscale("symlog", linthresh=10.0 ** np.floor(np.log10(np.median(np.abs(values)))))
    right.axvline(0, color="black", lw=0.8)
    right.set(yticks=[0, 1], yticklabels=["clean", "corrupted"], xlabel="Σ_j S[i, j] over the finetune val set "
              "(left: helpful, right: harmful)", title="fixed mode, first seed: net influence of each example")
    fig.tight_layout()
    save(fig, out, name)


def solver_table(make: Callable[[int], Problem], seed: int, quick: bool) -> str:
    """Fixed mode, one seed: each solver against the exact solve (same damping)."""
    p = make(seed)
    pre = pretrain(p, seed)
    fine = finetune(p, pre, seed, "fixed")
    iters = 30 if quick else 1000
    variants = [("exact", {}, "dense"), ("exact", {"damping": p.weight_decay}, f"damping λ = {p.weight_decay:g} only"),
                ("cg", {"tol": 1e-3, "max_iter": iters}, "tol 1e-3"),
                ("lissa", {"lissa_depth": iters}, f"depth {iters}, scale auto")]
    rows, reference = [], None
    for solver, options, text in variants:
        started = time.perf_counter()
        result = multistage(p, pre, fine, "fixed", solver=solver, **options)
        seconds = time.perf_counter() - started
        s = result.scores
        reference = s if reference is None else reference
        rankings = multistage_rankings(s)
        rows.append([solver, text, f"{seconds:.1f}", f"{((s - reference).norm() / reference.norm()).item():.2g}",
                     f"{spearmanr(s.sum(1), reference.sum(1))[0]:.3f}",
                     f"{detection(rankings['harmful Σ_j S'], p.corrupted)['P@k']:.2f}",
                     f"{detection(rankings['influential Σ_j |S|'], p.corrupted)['AUC']:.3f}"])
    return markdown_table(["solver", "settings", "seconds", "‖S − S_exact‖ / ‖S_exact‖", "Spearman Σ_j S vs exact",
                           "P@k harmful", "AUC influential"], rows)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="updated-mode α values")
    p.add_argument("--corrupt", type=float, default=0.05, help="share of pretraining labels corrupted")
    p.add_argument("--problem", choices=sorted(PROBLEMS), default="digits")
    args = p.parse_args()
    started = start(args)
    alphas = args.alphas[:1] if args.quick else args.alphas
    make = lambda seed: PROBLEMS[args.problem](seed, args.corrupt, args.quick)  # noqa: E731
    det = detect(make, args.seeds, alphas)
    print(f"\n{det.problem}: n = {det.n} pretraining examples, {det.n_corrupted} corrupted; "
          f"seeds {args.seeds} (mean ± std)")
    show("Finding the corrupted pretraining labels (k = number corrupted)", detection_table(det))
    show("Where the corrupted examples fall: sign and size of their net influence on the val loss", split_table(det))
    plot(det, args.out, f"harmful_data_{args.problem}")
    show(f"Solvers (fixed mode, seed {args.seeds[0]})", solver_table(make, args.seeds[0], args.quick))
    finish(started)


if __name__ == "__main__":
    main()
