"""The gradient index on models shaped like the ones people pretrain: capture cost, query cost, accuracy.

The models and data of ``multistage_real.py`` (a ResNet-9-shaped CNN on CIFAR-shaped images, n = 10,000, and a
GPT-2-shaped text classifier, n = 5,000), pretrained one epoch with Adam, finetuned in updated mode. For each
projection (``eigen``: the leading eigenvectors of each layer's Kronecker factors; ``random``: seeded Gaussian) and
size ``dim`` (per side of each layer):

- capture: one dedicated pass over the pretraining set (``capture_gradient_index``, balanced by the pretraining
  EK-FAC, which the callbacks fit anyway and which is reused here), in epochs of plain forward+backward training,
  and the index's size;
- query cost once the index exists: the scoring step alone (one product per block of the index) for 32 and for
  1,000 queries, in epochs; and the whole finetune-stage computation for 32 queries with the pretraining
  curvature already fitted (as the callbacks run it);
- accuracy: Pearson / Spearman / relative error of the index's scores against the exact scoring pass's.

And, without an index, the scoring pass with low-rank queries (``scoring="lowrank"``, ``query_rank``) for 32 and
1,000 queries, against the exact pass for the same queries.

    python benchmarks/gradient_index.py            # both models
    python benchmarks/gradient_index.py --quick    # n = 1,000: a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))

from multistage_real import (GPT2Classifier, ResNet9, Tokens, _Memory, adam, agreement,  # noqa: E402
                             epoch_seconds, images)

from lightning_msif import MemoryIndexStore, capture_gradient_index  # noqa: E402
from lightning_msif.core.arguments import InfluenceArguments  # noqa: E402
from lightning_msif.core.influence import multistage_scores  # noqa: E402


def run(kind: str, n: int, dims: List[int], projections: List[str], ranks: List[int], batch_size: int,
        autocast: Any = None, balance: bool = True) -> List[Dict[str, Any]]:
    torch.manual_seed(0)
    if kind == "cnn":
        pre, fine = ResNet9(10), ResNet9(2)
        pt, ft, q32, q1000 = images(n, 10, 0), images(n // 5, 2, 1), images(32, 2, 2), images(1000, 2, 3)
    else:
        pre, fine = GPT2Classifier(4), GPT2Classifier(2)
        pt, ft, q32, q1000 = Tokens(n, 4, 0), Tokens(n // 5, 2, 1), Tokens(32, 2, 2), Tokens(1000, 2, 3)
    adam(pre, DataLoader(pt, batch_size=batch_size, shuffle=True))
    fine.backbone.load_state_dict(pre.backbone.state_dict())
    adam(fine, DataLoader(ft, batch_size=batch_size, shuffle=True))
    epoch = epoch_seconds(pre, DataLoader(pt, batch_size=batch_size))
    loaders = [DataLoader(d, batch_size=batch_size) for d in (pt, ft)]
    args = InfluenceArguments(shared="backbone", mode="updated", alpha=1.0)
    factors = _Memory()

    def scores(queries: Any, index: Any = None, **settings: Any) -> Any:
        return multistage_scores(pre, fine, *loaders, DataLoader(queries, batch_size=batch_size),
                                 dataclasses.replace(args, **settings), factors=factors, index=index)

    exact = scores(q32)  # also fits the pretraining factors once, into `factors`
    rows = [{"model": kind, "n": n, "dim": "exact (scoring pass)", "epoch_s": epoch,
             "score_32_epochs": exact.info["seconds"]["score_pass"] / epoch,
             "whole_32_epochs": sum(v for k, v in exact.info["seconds"].items() if k != "pretrain_curvature") / epoch}]
    for rank in ranks:  # no index: the scoring pass with each query's vector at rank `rank` per layer
        got, many = scores(q32, scoring="lowrank", query_rank=rank), scores(q1000, scoring="lowrank", query_rank=rank)
        rows.append({"model": kind, "n": n, "projection": f"lowrank queries, rank {rank}", "epoch_s": epoch,
                     "score_32_epochs": got.info["seconds"]["score_pass"] / epoch,
                     "score_1000_epochs": many.info["seconds"]["score_pass"] / epoch,
                     "accuracy": agreement(got.scores, exact.scores)})
    exact_many = scores(q1000)
    rows.append({"model": kind, "n": n, "dim": "exact, 1,000 queries", "epoch_s": epoch,
                 "score_1000_epochs": exact_many.info["seconds"]["score_pass"] / epoch})
    for projection, dim in [(p, d) for p in projections for d in dims]:
        start = time.perf_counter()
        index = capture_gradient_index(pre, loaders[0], MemoryIndexStore(), shared="backbone", dim=dim,
                                       projection=projection, arguments=args, factors=factors,  # balanced by them
                                       autocast=autocast, balance=balance)
        capture = time.perf_counter() - start
        size_mb = sum(t.numel() * t.element_size() for t in index.store.values()) / 2**20
        start = time.perf_counter()
        got = scores(q32, index)
        whole = time.perf_counter() - start
        many = scores(q1000, index)
        label = projection + (f", {autocast}" if autocast else "") + ("" if balance else ", not balanced")
        rows.append({"model": kind, "n": n, "projection": label, "dim": dim,
                     "out_dim": index.projection["out_dim"], "epoch_s": epoch, "capture_epochs": capture / epoch,
                     "index_mb": size_mb,
                     "score_32_epochs": got.info["seconds"]["score_pass"] / epoch,
                     "score_1000_epochs": many.info["seconds"]["score_pass"] / epoch,
                     "whole_32_epochs": whole / epoch, "accuracy": agreement(got.scores, exact.scores)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 1,000 instead of 10,000 (CNN) / 5,000 (text)")
    parser.add_argument("--models", default="cnn,gpt2")
    parser.add_argument("--dims", default="8,32,128")
    parser.add_argument("--projections", default="eigen,random")
    parser.add_argument("--ranks", default="1,8", help="scoring='lowrank' query ranks (no index)")
    parser.add_argument("--autocast", default=None, help="capture the indexes under torch.autocast (bfloat16)")
    parser.add_argument("--no-balance", action="store_true", help="indexes without the curvature's change of basis")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    cols = ["model", "n", "projection", "dim", "out_dim", "epoch_s", "capture_epochs", "index_mb", "score_32_epochs",
            "score_1000_epochs", "whole_32_epochs", "accuracy"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for kind in args.models.split(","):
        n = 1000 if args.quick else (10_000 if kind == "cnn" else 5_000)
        dims = [int(d) for d in args.dims.split(",") if d]
        ranks = [int(r) for r in args.ranks.split(",") if r]
        projections = [p for p in args.projections.split(",") if p]
        for r in run(kind, n, dims, projections, ranks, args.batch_size, args.autocast, not args.no_balance):
            print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                    for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
