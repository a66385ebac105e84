"""The same questions on a second, different pair: breast-cancer diagnosis, pretrained on one population of
tumours and finetuned on another.

The pair (``common.cancer_problem``, scikit-learn's breast cancer data, no download) differs from digits in
every respect that matters here: 30 tabular measurements instead of pixels, two classes instead of five, the
*same* label in both stages (a population shift — smooth-textured tumours to rough-textured ones, whose
malignancy rate is higher — instead of new classes), and little data (257 pretraining, 28 finetuning
examples). 5 % of the pretraining diagnoses are flipped.

Reported: whether either pair is a transfer at all (finetune test accuracy with the pretrained backbone
against a random one and against training from scratch); finding the flipped diagnoses (as harmful_data.py);
removing the most harmful pretraining examples (as data_removal.py); and the 2×2 class-to-class table, whose
expected answer is known here (a diagnosis should help the same diagnosis).

    python examples/applications/second_pair.py            # 3 seeds, about 2 minutes
    python examples/applications/second_pair.py --quick    # seconds
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

import data_removal
import harmful_data
from class_influence import influence_matrix, square
from common import (MLP, DTYPE, PROBLEMS, Problem, Split, cancer_problem, configs, evaluate, finetune, finish, label,
                    markdown_table, mean_std, multistage, parser, pretrain, show, start)


def transfer_table(makers: Sequence[Callable[[int], Problem]], seeds: Sequence[int], alphas: Sequence[float]) -> str:
    """Finetune test accuracy: pretrained backbone (each mode), random backbone (fixed), and no pretraining at all."""
    rows = []
    for make in makers:
        accs: Dict[str, List[float]] = {}
        for seed in seeds:
            p = make(seed)
            pre = pretrain(p, seed)
            torch.manual_seed(seed)
            random = MLP(p.pretrain.x.shape[1], p.hidden, len(p.pretrain_classes)).to(DTYPE)
            runs = {f"pretrained, {label(c)}": finetune(p, pre, seed, *c) for c in configs(alphas)}
            runs["random backbone, fixed"] = finetune(p, random, seed, "fixed")
            runs["from scratch (all layers, no pretraining)"] = finetune(p, random, seed, "updated", 0.0)
            for name, model in runs.items():
                accs.setdefault(name, []).append(evaluate(model, p.test)[1])
        rows += [[p.name, name, mean_std(values)] for name, values in accs.items()]
    return markdown_table(["pair", "finetuned model", "test accuracy"], rows)


def class_table(seeds: Sequence[int], quick: bool) -> str:
    """Mean score of each pretraining diagnosis on each query diagnosis (clean labels), fixed and updated α=1."""
    per: Dict[str, List[np.ndarray]] = {}
    for seed in seeds:
        p = cancer_problem(seed, corrupt_fraction=0.0, quick=quick)
        queries = Split(torch.cat([p.val.x, p.test.x]), torch.cat([p.val.y, p.test.y]))
        pre = pretrain(p, seed)
        for config in configs([1.0]):
            scores = multistage(p, pre, finetune(p, pre, seed, *config), *config, queries=queries).scores
            per.setdefault(label(config), []).append(influence_matrix(scores, p.clean, queries.y, (2, 2)))
    classes = p.pretrain_classes
    parts = []
    for name, ms in per.items():
        contrast = ", ".join(f"{(m[0, 0] + m[1, 1] - m[0, 1] - m[1, 0]) / 2:+.3g}" for m in ms)
        parts.append(f"{name}:\n\n{square(classes, classes, np.mean(ms, axis=0), '{:+.3g}')}\n\nsame-diagnosis "
                     f"contrast (M[m,m] + M[b,b] − M[m,b] − M[b,m]) / 2 per seed (< 0: a diagnosis helps its own "
                     f"more than the other): {contrast}")
    return "\n\n".join(parts)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="updated-mode α values")
    p.add_argument("--corrupt", type=float, default=0.05, help="share of pretraining diagnoses flipped")
    args = p.parse_args()
    started = start(args)
    alphas: List[float] = args.alphas[:1] if args.quick else args.alphas
    make = lambda seed: cancer_problem(seed, args.corrupt, args.quick)  # noqa: E731
    digits = lambda seed: PROBLEMS["digits"](seed, args.corrupt, args.quick)  # noqa: E731
    show("Is it a transfer? Finetune test accuracy (mean ± std over seeds)",
         transfer_table([digits, make], args.seeds, alphas))
    det = harmful_data.detect(make, args.seeds, alphas)
    print(f"\n{det.problem}: n = {det.n} pretraining examples, {det.n_corrupted} flipped; seeds {args.seeds}")
    show("Finding the flipped pretraining diagnoses (k = number flipped)", harmful_data.detection_table(det))
    show("Where the flipped examples fall", harmful_data.split_table(det))
    harmful_data.plot(det, args.out, "second_pair_detection")
    data_removal.run(make, args.seeds, [1.0], [0.025] if args.quick else [0.025, 0.05, 0.1], 2 if args.quick else 4,
                     args.out, "second_pair_removal")
    show("Class to class: mean S of pretraining diagnosis (rows) on query diagnosis (columns), clean labels, "
         "mean over seeds (< 0 helpful)", class_table(args.seeds, args.quick))
    finish(started)


if __name__ == "__main__":
    main()
