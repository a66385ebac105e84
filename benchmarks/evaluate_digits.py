"""Do the scores predict retraining? Leave-one-out and LDS on the digits recipe, against the baselines.

``DigitsRecipe`` (``lightning_msif.demo.digits_recipe``): pretrain an MLP (64 → H → H → 5, tanh; ``--arch cnn``:
a 3×3 convolution, average pooling, a linear layer to H) on digits 0–4 with 5% of the labels corrupted,
finetune a new head on digits 5–9 (``mode=fixed``), float64, both stages solved to max |gradient| ≤ 1e-9
with an L2 penalty λ that is also the influence damping. Printed: the settings, the table (leave-one-out
Pearson/Spearman of ``−S/n`` with the measured loss changes over all (removed example, query) pairs; LDS
mean ± std over seeds) and the wall time of the evaluation; then the same evaluation with a second solver
and with other curvatures (Gauss-Newton, K-FAC, EK-FAC), whose retraining runs all come from the cache.

Run: ``.venv/bin/python benchmarks/evaluate_digits.py`` (about three minutes on 2 cores; docs/results.md §7 adds
``--finetune-limit 50``, and ``--arch cnn`` for its CNN table), ``--procs 2`` to share the retraining runs
between two processes (gloo), ``--quick`` for a smoke run.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_msif.demo.digits_recipe import DigitsRecipe  # noqa: E402
from lightning_msif.evaluation import EvaluationConfig, LDSConfig, LOOConfig, evaluate  # noqa: E402


def run(rank: int, args: argparse.Namespace, port: int) -> None:
    """One process: both evaluations (rank 0 prints)."""
    if args.procs > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=args.procs)
    torch.set_num_threads(args.threads)
    say = print if rank == 0 else (lambda *a, **k: None)
    recipe = DigitsRecipe(mode=args.mode, alpha=args.alpha, hidden=args.hidden, weight_decay=args.weight_decay,
                          queries=args.queries, arch=args.arch, finetune_limit=args.finetune_limit)
    n, k = len(recipe.pretrain_data), len(recipe.query_data)
    say(f"digits recipe: n = {n} pretraining examples (5% corrupted labels), {len(recipe.finetune_data)} finetune, "
        f"{k} queries; {args.arch}, hidden {args.hidden}, λ = {args.weight_decay}, mode {args.mode}; "
        f"{args.procs} process(es) × {args.threads} thread(s)")
    say(f"leave-one-out: {args.loo} random examples; LDS: {args.subsets} subsets of {args.fraction:.0%} × seeds "
        f"{list(range(args.seeds))}; warm start: {not args.cold}\n")
    lds = LDSConfig(subsets=args.subsets, fraction=args.fraction, seeds=list(range(args.seeds)))
    config = EvaluationConfig(out_dir=args.out, loo=LOOConfig(examples=args.loo), lds=lds, warm_start=not args.cold,
                              progress=False)
    runs = [("hessian", args.solver), ("hessian", args.second_solver)]
    runs += [tuple(r.split(":")) for r in args.curvatures.split(",") if r]  # type: ignore[misc]
    for i, (curvature, solver) in enumerate(runs):
        start = time.perf_counter()
        methods = {} if i == 0 else {"methods": ["multistage"]}  # the baselines do not change with the curvature
        result = evaluate(recipe, config, solver=solver, curvature=curvature, **methods)
        say(f"curvature={curvature} solver={solver}: {time.perf_counter() - start:.1f} s, retraining runs: "
            f"{result.retrained} trained, {result.reused} from the cache")
        say(result.table() + "\n")
    say(f"files: {args.out}/evaluation.html, evaluation.csv, loo_scatter.png")
    if args.procs > 1:
        torch.distributed.destroy_process_group()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 removals, 4 subsets × 2 seeds, 20 queries")
    ap.add_argument("--loo", type=int, default=100, help="pretraining examples removed one at a time")
    ap.add_argument("--subsets", type=int, default=40, help="LDS subsets")
    ap.add_argument("--fraction", type=float, default=0.5, help="fraction of the pretraining set in each LDS subset")
    ap.add_argument("--seeds", type=int, default=3, help="LDS retraining seeds (0, 1, ...)")
    ap.add_argument("--hidden", type=int, default=8, help="backbone width H")
    ap.add_argument("--weight-decay", type=float, default=1e-2, help="L2 penalty λ of both stages = influence damping")
    ap.add_argument("--mode", default="fixed", choices=["fixed", "updated"])
    ap.add_argument("--alpha", type=float, default=None, help="proximal strength (mode=updated)")
    ap.add_argument("--queries", type=int, default=None, help="first Q finetune validation examples (default all)")
    ap.add_argument("--solver", default="exact", help="solver of the first evaluation")
    ap.add_argument("--second-solver", default="cg", help="solver of the second evaluation (reuses every retrain)")
    ap.add_argument("--arch", default="mlp", choices=["mlp", "cnn"],
                    help="backbone: the MLP or a small CNN (one 3×3 convolution, average pooling; ``backbone_of``)")
    ap.add_argument("--finetune-limit", type=int, default=None,
                    help="first N finetune examples only (e.g. 50: a task where the pretrained backbone helps)")
    ap.add_argument("--curvatures", default="ggn:exact,kfac:direct,ekfac:direct",
                    help="more evaluations of the multistage scores, curvature:solver, comma-separated (cached retrains)")
    ap.add_argument("--cold", action="store_true", help="retrain from the seed's initialisation, not warm")
    ap.add_argument("--procs", type=int, default=1, help="processes sharing the retraining runs (gloo)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest for this size)")
    ap.add_argument("--out", default=None, help="output and cache folder (default: a new temporary folder)")
    args = ap.parse_args(argv)
    if args.quick:
        args.loo, args.subsets, args.seeds, args.queries = 5, 4, 2, 20
    args.out = args.out or tempfile.mkdtemp(prefix="msif-eval-")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.procs > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(run, args=(args, port), nprocs=args.procs)
    else:
        run(0, args, 0)
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
