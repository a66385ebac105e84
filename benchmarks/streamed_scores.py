"""Streamed score matrices: peak memory and time of scoring 1,000 queries against a gradient index and reporting
the result, with the matrix gathered in memory or streamed to disk block by block (``stream_scores``).

What runs is the part of a scoring run that grows with ``n × k``: each block of the index times the projected
queries (``index_scores``), the blocks written (streamed) or gathered and written as one matrix, then the report
(top-k tables, removal candidates, class tables, histogram, HTML page) from what was written. The index is random
rows of the given width on disk, so its capture (``benchmarks/gradient_index.py``) is not in the figures. Each
(n, layout) runs in a fresh process, so the peak resident memory is its own.

    python benchmarks/streamed_scores.py                      # n = 100,000 and 400,000, 1,000 queries
    python benchmarks/streamed_scores.py --n 20000 --queries 100   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import torch

from lightning_msif.core.comm import LocalComm
from lightning_msif.core.index import block_key, index_scores
from lightning_msif.core.scoring import blocks
from lightning_msif.reports.publish import report_scores
from lightning_msif.snapshots import IndexFiles, SnapshotDir

BLOCK = 4096


def one(n: int, k: int, width: int, stream: bool) -> Dict[str, Any]:
    """Score and report once in this process; seconds per phase and the peak resident memory."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = IndexFiles(root / "index")
        index.folder.mkdir(parents=True)
        for start, stop in blocks(n, BLOCK):
            index.put(block_key(start, stop), torch.randn(stop - start, width))
        projected = torch.randn(k, width)
        snapshots = SnapshotDir(root / "snap")
        work = snapshots.work("bench")
        record = {"mode": "fixed", "info": {}}
        t0 = time.perf_counter()
        scores = index_scores(index, n, projected, LocalComm(), BLOCK, scores=work if stream else None, stream=stream)
        if stream:
            snapshots.write_score_blocks(work, (n, k), record)
        else:
            snapshots.write_scores(scores, record)
        t1 = time.perf_counter()
        matrix = snapshots.score_matrix()[0] if stream else scores
        del scores
        report_scores(matrix, record, snapshots.report_dir, top_k=10, max_queries=50)
        t2 = time.perf_counter()
        work.clear()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "queries": k, "width": width, "layout": "streamed" if stream else "gathered",
            "matrix_mb": n * k * 4 / 2**20, "score_s": t1 - t0, "report_s": t2 - t1,
            "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--width", type=int, default=512, help="index row width (the projected gradient's length)")
    parser.add_argument("--one", choices=["streamed", "gathered"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(one(args.n[0], args.queries, args.width, args.one == "streamed")))
        return
    print(f"{'n':>8} {'layout':>9} {'matrix MB':>10} {'score s':>8} {'report s':>9} {'peak RSS MB':>12}")
    for n in args.n:
        for layout in ("streamed", "gathered"):
            out = subprocess.run([sys.executable, __file__, "--one", layout, "--n", str(n), "--queries",
                                  str(args.queries), "--width", str(args.width)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>8} {layout:>9} {r['matrix_mb']:>10.0f} {r['score_s']:>8.1f} {r['report_s']:>9.1f} "
                  f"{r['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
