"""Data removal: retrain both stages without the pretraining examples the scores call most harmful.

Train both stages on all the pretraining data (digits 0–4 with 5 % corrupted labels → 5–9), score every
pretraining example on the finetune *val* set, then remove k examples and retrain both stages from the same
initialisation: the k most harmful (largest ``Σ_j S[i, j]``), the k most helpful, the k most influential
(``Σ_j |S|``), the k with the highest pretraining loss (classic data cleaning), k random ones (several
draws), and all the corrupted ones (an oracle). Reported: the change of the finetune *test* loss and accuracy
against the full-data model, and the change of the val loss next to its first-order prediction
``−Σ_{i removed} Σ_j S[i, j] / (n m)``.

    python examples/applications/data_removal.py             # 3 seeds, fixed and updated α=1, about 6 minutes
    python examples/applications/data_removal.py --quick     # seconds
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from common import (PROBLEMS, Config, Problem, complement, configs, evaluate, finish, label, markdown_table, mean_std,
                    multistage, parser, plt, random_choice, save, show, start, train_two_stage)

RANDOM, ORACLE = "random", "all corrupted (oracle)"
CHOSEN = ("harmful: top Σ_j S", "helpful: bottom Σ_j S", "influential: top Σ_j |S|", "highest pretraining loss")
STYLE = {CHOSEN[0]: "#c0392b", CHOSEN[1]: "#2471a3", CHOSEN[2]: "#8e44ad", CHOSEN[3]: "#d68910", RANDOM: "#7f8c8d",
         ORACLE: "#27ae60"}


def orders(problem: Problem, pre: torch.nn.Module, scores: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Pretraining indices, first to be removed first, for each targeted choice."""
    total = scores.sum(1)
    with torch.no_grad():
        loss = F.cross_entropy(pre(problem.pretrain.x), problem.pretrain.y, reduction="none")
    return dict(zip(CHOSEN, (total.argsort(descending=True), total.argsort(),
                             scores.abs().sum(1).argsort(descending=True), loss.argsort(descending=True))))


@dataclass
class Reference:
    """The full-data run of one seed and mode: what every retraining is compared with."""

    problem: Problem
    seed: int
    config: Config
    val_loss: float
    test_loss: float
    test_acc: float
    scores: torch.Tensor

    def without(self, choice: str, removed: torch.Tensor) -> Dict[str, float]:
        """Retrain both stages without ``removed``; the changes against the full-data run."""
        p, n = self.problem, len(self.problem.pretrain)
        _, refit = train_two_stage(p, self.seed, *self.config, keep=complement(n, removed))
        val, (test_loss, test_acc) = evaluate(refit, p.val)[0], evaluate(refit, p.test)
        predicted = -self.scores[removed].sum().item() / (n * self.scores.shape[1])
        return {"seed": self.seed, "k": len(removed), "choice": choice, "test_loss": test_loss - self.test_loss,
                "test_acc": test_acc - self.test_acc, "val_loss": val - self.val_loss, "predicted": predicted}


def removal(make: Callable[[int], Problem], seeds: Sequence[int], config: Config, fractions: Sequence[float],
            draws: int) -> List[Dict[str, float]]:
    """One row per retraining: seed, k, choice, Δ test loss/acc, Δ val loss and its prediction."""
    rows = []
    for seed in seeds:
        p = make(seed)
        n = len(p.pretrain)
        pre, fine = train_two_stage(p, seed, *config)
        scores = multistage(p, pre, fine, *config).scores
        ref = Reference(p, seed, config, evaluate(fine, p.val)[0], *evaluate(fine, p.test), scores)
        ranked = orders(p, pre, scores)
        for k in sorted({max(1, round(f * n)) for f in fractions}):
            rows += [ref.without(choice, order[:k]) for choice, order in ranked.items()]
            rows += [ref.without(RANDOM, random_choice(n, k, 1000 * seed + draw)) for draw in range(draws)]
        rows.append(ref.without(ORACLE, p.corrupted))
    return rows


def removal_table(rows: List[Dict[str, float]]) -> str:
    """Mean ± std of the changes per (k, choice)."""
    groups: Dict[Tuple[int, str], List[Dict[str, float]]] = defaultdict(list)
    for row in rows:
        groups[row["k"], row["choice"]].append(row)
    table = []
    for (k, choice), runs in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] == ORACLE)):
        cells = [mean_std([r[key] for r in runs], 3, signed=True)
                 for key in ("test_loss", "test_acc", "val_loss", "predicted")]
        table.append([k, choice, len(runs), *cells])
    return markdown_table(["k removed", "which", "runs", "Δ test loss", "Δ test accuracy", "Δ val loss",
                           "predicted Δ val loss"], table)


def prediction_table(rows: List[Dict[str, float]]) -> str:
    """How well ``−Σ_removed Σ_j S / (n m)`` predicts the retrained Δ val loss, per choice and over all runs."""
    groups = {choice: [r for r in rows if r["choice"] == choice] for choice in (*CHOSEN, RANDOM, ORACLE)}
    groups["all retrainings"] = rows
    table = []
    for choice, runs in groups.items():
        predicted, actual = np.array([r["predicted"] for r in runs]), np.array([r["val_loss"] for r in runs])
        r = np.corrcoef(predicted, actual)[0, 1] if len(runs) > 2 else float("nan")
        table.append([choice, len(runs), f"{r:+.2f}", f"{np.mean(np.sign(predicted) == np.sign(actual)):.2f}"])
    return markdown_table(["which", "retrainings", "Pearson r (predicted, actual)", "same sign"], table)


def plot(results: Dict[str, List[Dict[str, float]]], out: Path, name: str, title: str) -> None:
    """Per mode: Δ test loss against k for each choice (mean ± population std), and predicted against actual
    Δ val loss for every retraining."""
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.4 * len(results) + 0.5), squeeze=False)
    for (mode, rows), (left, right) in zip(results.items(), axes):
        for choice in (*CHOSEN, RANDOM, ORACLE):
            mine = [r for r in rows if r["choice"] == choice]
            ks = sorted({r["k"] for r in mine})
            mean = [np.mean([r["test_loss"] for r in mine if r["k"] == k]) for k in ks]
            std = [np.std([r["test_loss"] for r in mine if r["k"] == k]) for k in ks]
            kind = {"fmt": "*", "ms": 12} if choice == ORACLE else {"fmt": "-o", "ms": 4}
            left.errorbar(ks, mean, yerr=std, color=STYLE[choice], label=choice, capsize=3, **kind)
            right.scatter([r["predicted"] for r in mine], [r["val_loss"] for r in mine], s=12, color=STYLE[choice])
        left.axhline(0, color="black", lw=0.8)
        left.set(xlabel="k pretraining examples removed", ylabel="Δ finetune test loss (below 0: better)",
                 title=f"{mode}: both stages retrained without k examples")
        lim = max(abs(v) for r in rows for v in (r["predicted"], r["val_loss"])) * 1.1
        right.plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
        right.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="predicted Δ val loss  −Σ_removed Σ_j S / (n m)",
                  ylabel="actual Δ val loss", title=f"{mode}: first-order prediction vs retraining")
    fig.suptitle(title)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    save(fig, out, name)


def run(make: Callable[[int], Problem], seeds: Sequence[int], alphas: Sequence[float], fractions: Sequence[float],
        draws: int, out: Path, name: str) -> None:
    """Every mode: the table, then one figure for all modes."""
    results = {}
    for config in configs(alphas):
        results[label(config)] = removal(make, seeds, config, fractions, draws)
        over = "seeds and draws" if draws > 1 else "seeds"
        show(f"Removing pretraining examples, {label(config)} (mean ± std over {over}; Δ against the full-data model)",
             removal_table(results[label(config)]))
        show(f"First-order prediction of the val loss change, {label(config)}",
             prediction_table(results[label(config)]))
    plot(results, out, name, make(seeds[0]).name)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--alphas", type=float, nargs="*", default=[1.0], help="updated-mode α values (none: fixed only)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.025, 0.05, 0.1],
                   help="k as a share of the pretraining set")
    p.add_argument("--draws", type=int, default=4, help="random removals per k and seed")
    p.add_argument("--corrupt", type=float, default=0.05, help="share of pretraining labels corrupted")
    p.add_argument("--problem", choices=sorted(PROBLEMS), default="digits")
    args = p.parse_args()
    started = start(args)
    if args.quick:
        args.alphas, args.fractions, args.draws = args.alphas[:1], args.fractions[:1], 2
    run(lambda seed: PROBLEMS[args.problem](seed, args.corrupt, args.quick), args.seeds, args.alphas, args.fractions,
        args.draws, args.out, f"data_removal_{args.problem}")
    finish(started)


if __name__ == "__main__":
    main()
