"""Benchmark of the scoring pass against a training epoch and a naive per-example loop.

Two-stage problem on digits-sized data (sklearn ``load_digits``, 1797 × 64; random data of the same
size when scikit-learn is missing): an MLP ``backbone`` (64 → H → H, tanh, shared θ) with a 10-class
pretraining head (U) and a 2-class finetune head (W), float32, ``mode='fixed'``. Printed:

- one plain forward + backward epoch over the pretraining set (same loader, same batch size);
- for 1, 8 and 32 queries: the solves (CG with a fixed number of iterations on a Hessian subsample)
  and the scoring pass with ``scoring='grad'``, ``'jvp'`` and ``'auto'``;
- a naive baseline: a per-example ``torch.autograd.grad`` loop computing the same ``−s · ∇ℓ_i``;
- the ratios pass / epoch and naive / pass, and the largest relative difference to the naive scores;
- the arithmetic floor of a pass (k queries need at least k forward passes' worth of multiply-adds);
- the peak memory of the scoring pass at n and 4n pretraining examples, in fresh subprocesses.

Run: ``.venv/bin/python benchmarks/scoring_pass.py`` (a minute or two on 2 cores), or ``--quick``
for a smoke run. Exits 1 when some method's scores differ from the naive ones by more than
``--tol``; the performance targets are only reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_msif import InfluenceResult, compute_multistage

METHODS = ("grad", "jvp", "auto")
TARGET_EPOCHS = 2.0  # scoring pass ≤ 2 epochs ...
TARGET_MAX_QUERIES = 32  # ... for ≤ 32 queries
TARGET_SPEEDUP = 20.0  # ≥ 20× faster than the naive loop
TARGET_MEMORY_RATIO = 1.25  # peak at 4n ≤ 1.25 × peak at n: independent of n up to noise


# -- problem --------------------------------------------------------------------------------------
class Net(nn.Module):
    """``backbone`` (shared θ: two tanh layers) → ``head`` (U in pretraining, W in finetuning)."""

    def __init__(self, d_in: int, hidden: int, classes: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def digits() -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``(x [1797, 64] float32 in [0, 1], y [1797], description)``; random blobs without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (1797,), generator=g)
        x = (torch.randn(10, 64, generator=g)[y] + torch.randn(1797, 64, generator=g)).sigmoid()
        return x, y, "random blobs 1797×64 (scikit-learn not installed)"
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target), "sklearn digits 1797×64"


@dataclass
class Problem:
    """Both stages' models and data (pretraining labels: digit; finetune and query labels: parity)."""

    pre: Net
    fine: Net
    pretrain: TensorDataset
    finetune: TensorDataset
    queries: TensorDataset
    batch_size: int
    description: str

    def loader(self, data: TensorDataset) -> DataLoader:
        return DataLoader(data, batch_size=self.batch_size)

    @property
    def scored_names(self) -> List[str]:
        """θ then U: the order of the library's flat pretraining vectors."""
        names = [n for n, _ in self.pre.named_parameters()]
        return [n for n in names if n.startswith("backbone.")] + [n for n in names if not n.startswith("backbone.")]

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.pre.parameters())


def make_problem(hidden: int, batch_size: int, n_pretrain: Optional[int], repeat: int, n_finetune: int,
                 n_queries: int, train_epochs: int, seed: int = 0) -> Problem:
    """Both models, trained briefly: pretraining, then the finetune head on the frozen backbone.

    The pretraining set is the first ``n_pretrain`` digits (all by default) repeated ``repeat`` times;
    the queries are the last ``n_queries`` digits, outside the finetune set.
    """
    x, y, what = digits()
    torch.manual_seed(seed)
    pre, fine = Net(x.shape[1], hidden, 10), Net(x.shape[1], hidden, 2)
    pt_x, pt_y = (x, y) if n_pretrain is None else (x[:n_pretrain], y[:n_pretrain])
    finetune = TensorDataset(x[:n_finetune], y[:n_finetune] % 2)
    _train(pre, TensorDataset(pt_x, pt_y), train_epochs, batch_size)
    fine.backbone.load_state_dict(pre.backbone.state_dict())
    fine.backbone.requires_grad_(False)
    _train(fine, finetune, train_epochs, batch_size)
    return Problem(pre, fine, TensorDataset(pt_x.repeat(repeat, 1), pt_y.repeat(repeat)), finetune,
                   TensorDataset(x[-n_queries:], y[-n_queries:] % 2), batch_size, what)


def _train(model: nn.Module, data: TensorDataset, epochs: int, batch_size: int) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.zero_grad(set_to_none=True)


# -- measured pieces ------------------------------------------------------------------------------
class SolutionStore:
    """A ``ScoreStore`` keeping only the solved vectors ``s``: a rerun skips the solves, never the pass."""

    def __init__(self, solution: Optional[torch.Tensor] = None):
        self.solution = solution

    def get(self, key: str) -> Optional[torch.Tensor]:
        return self.solution if key.startswith("solution") else None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if key.startswith("solution"):
            self.solution = tensor


def influence(p: Problem, queries: TensorDataset, scoring: str, store: SolutionStore,
              args: argparse.Namespace) -> InfluenceResult:
    """``compute_multistage`` with the benchmark's solver settings (CG for a fixed number of iterations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG stops at max_iter on purpose
        return compute_multistage(
            p.pre, p.fine, p.loader(p.pretrain), p.loader(p.finetune), p.loader(queries),
            shared="backbone", mode="fixed", damping=args.damping, solver="cg", tol=1e-12,
            max_iter=args.cg_iters, hessian_samples=args.hessian_samples, scoring=scoring, store=store,
        )


def epoch_seconds(p: Problem) -> float:
    """One plain training epoch without optimizer: forward, mean loss, backward, batch by batch."""
    start = time.perf_counter()
    for xb, yb in p.loader(p.pretrain):
        p.pre.zero_grad(set_to_none=True)
        F.cross_entropy(p.pre(xb), yb).backward()
    elapsed = time.perf_counter() - start
    p.pre.zero_grad(set_to_none=True)
    return elapsed


def naive_scores(p: Problem, s: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """``S[i, j] = −s_j · ∇ℓ(z_i)`` with one ``torch.autograd.grad`` call per example, and its seconds."""
    named = dict(p.pre.named_parameters())
    params = [named[n] for n in p.scored_names]
    x, y = p.pretrain.tensors
    out = torch.empty(len(x), s.shape[0], dtype=s.dtype)
    p.pre.eval()
    start = time.perf_counter()
    for i in range(len(x)):
        loss = F.cross_entropy(p.pre(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        out[i] = -(s @ torch.cat([g.reshape(-1) for g in grads]))
    return out, time.perf_counter() - start


def matmul_gflops(size: int = 512, repeats: int = 20) -> float:
    """Best sustained float32 GEMM rate of this process (its threads), in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |a − ref| / max |ref|``."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@dataclass
class Row:
    """One (number of queries, method) measurement."""

    k: int
    method: str
    ran: str  # the method that ran ('auto' resolved)
    pass_s: float
    naive_s: float
    err: float


@dataclass
class Solves:
    """Seconds of every phase but the scoring pass (query gradients, finetune and pretrain solves)."""

    k: int
    phases: Dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def measure_queries(p: Problem, k: int, args: argparse.Namespace, epochs: List[float]) -> Tuple[Solves, List[Row]]:
    """Solve once for ``k`` queries, then time each method's scoring pass and the naive loop.

    Passes are the best of ``args.repeats`` rounds after a warm-up round; each round runs every method
    and one epoch (appended to ``epochs``), so a busy machine slows them alike.
    """
    queries = TensorDataset(*(t[:k] for t in p.queries.tensors))
    store = SolutionStore()
    first = influence(p, queries, "auto", store, args)
    solves = Solves(k, {n: v for n, v in first.info["seconds"].items() if n != "score_pass"})
    s = store.solution
    assert s is not None and s.shape[0] == k
    naive, naive_s = naive_scores(p, s)
    for _ in range(args.naive_repeats - 1):
        naive_s = min(naive_s, naive_scores(p, s)[1])
    best: Dict[str, float] = {}
    last: Dict[str, InfluenceResult] = {}
    for round_ in range(args.repeats + 1):
        for method in METHODS:
            last[method] = influence(p, queries, method, SolutionStore(s), args)
            if round_:
                best[method] = min(best.get(method, float("inf")), last[method].info["seconds"]["score_pass"])
        epochs.append(epoch_seconds(p))
    return solves, [Row(k, m, last[m].info["scoring"], best[m], naive_s, rel_err(last[m].scores, naive))
                    for m in METHODS]


# -- peak memory ----------------------------------------------------------------------------------
def _status_kib(name: str) -> int:
    match = re.search(rf"{name}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def _reset_peak() -> bool:
    """Reset the peak resident set size to the current one (Linux ``clear_refs``); False if unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe_memory(args: argparse.Namespace, repeat: int) -> Dict[str, float]:
    """In this process: peak resident memory (MiB) added by one scoring pass over ``repeat`` × the data."""
    p = make_problem(args.hidden, args.batch_size, args.n_pretrain, repeat, args.n_finetune, args.probe_k,
                     train_epochs=0)  # the weights do not change the memory
    s = torch.randn(args.probe_k, p.dim, generator=torch.Generator().manual_seed(0))
    influence(p, p.queries, args.probe_method, SolutionStore(s), args)  # warm-up: one-time allocations
    if _reset_peak():
        before = _status_kib("VmRSS")
        influence(p, p.queries, args.probe_method, SolutionStore(s), args)
        peak, how = _status_kib("VmHWM") - before, "VmHWM"
    else:  # peak since start: the warm-up already set it, so this only bounds the pass from below
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        influence(p, p.queries, args.probe_method, SolutionStore(s), args)
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "ru_maxrss"
    return {"n": len(p.pretrain), "peak_mib": peak / 1024, "how": how}


def memory_in_subprocess(args: argparse.Namespace, method: str, repeats: Sequence[int]) -> List[Dict[str, float]]:
    """``probe_memory`` for each of ``repeats``, one after the other, in a fresh interpreter.

    Blocks over 128 KiB go to ``mmap`` there, so what a pass frees leaves the resident set.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", "--probe-method", method,
           "--probe-repeat", *map(str, repeats), "--probe-k", str(args.memory_queries), "--hidden", str(args.hidden),
           "--batch-size", str(args.batch_size), "--n-finetune", str(args.n_finetune), "--threads", str(args.threads),
           "--cg-iters", str(args.cg_iters), "--hessian-samples", str(args.hessian_samples),
           "--damping", str(args.damping)]
    if args.n_pretrain is not None:
        cmd += ["--n-pretrain", str(args.n_pretrain)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_memory(args: argparse.Namespace) -> Dict[str, List[Dict[str, float]]]:
    """Per method, the pass's peak at n and ``memory_repeat`` × n: a fresh process each (one with --quick)."""
    sizes = (1, args.memory_repeat)
    if args.quick:
        return {m: memory_in_subprocess(args, m, sizes) for m in args.memory_methods}
    return {m: [memory_in_subprocess(args, m, [r])[0] for r in sizes] for m in args.memory_methods}


# -- report ---------------------------------------------------------------------------------------
def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(p: Problem, args: argparse.Namespace, epoch_s: float, gflops: float, solves: Sequence[Solves],
           rows: Sequence[Row], memory: Dict[str, List[Dict[str, float]]]) -> float:
    """Print every table; return the largest relative error to the naive scores."""
    n, dim, h = len(p.pretrain), p.dim, args.hidden
    theta = sum(v.numel() for name, v in p.pre.named_parameters() if name.startswith("backbone."))
    forward_gflop = 2 * n * dim / 1e9  # multiply-adds of one forward pass over the set (an MLP uses each weight once)
    print(f"lightning-msif scoring-pass benchmark  (torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), float32)")
    print(f"data: {p.description}; pretraining n={n}, finetune {len(p.finetune)}, queries up to {len(p.queries)}; "
          f"batch {p.batch_size}")
    print(f"model: backbone 64→{h}→{h} (θ {theta:,}) + heads →10 (U {dim - theta:,}) / →2 (W); "
          f"scored parameters θ+U = {dim:,}")
    print(f"solver: cg, {args.cg_iters} iterations, hessian_samples={args.hessian_samples}, damping={args.damping}")
    rounds = args.repeats * len(solves)
    print(f"\nepoch (forward + backward, no optimizer, n={n}, batch {p.batch_size}, best of {rounds}): "
          f"{epoch_s * 1e3:.1f} ms")
    print(f"arithmetic: one forward over n = {forward_gflop:.3f} GFLOP (an epoch ≈ 3 forwards); float32 GEMM here "
          f"≈ {gflops:.0f} GFLOP/s")

    print("\nsolves (s):  k " + "".join(f"{name:>18}" for name in solves[0].phases) + f"{'total':>10}")
    for sv in solves:
        print(f"            {sv.k:>3}" + "".join(f"{v:>18.3f}" for v in sv.phases.values()) + f"{sv.total:>10.3f}")

    print(f"\nscoring pass (best of {args.repeats}; naive loop best of {args.naive_repeats}):")
    head = (f"{'k':>3}  {'method':<11}{'pass ms':>9}{'pass/epoch':>12}{'floor ms':>10}{'naive ms':>10}"
            f"{'naive/pass':>12}{'max rel err':>13}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        name = r.method if r.method != "auto" else f"auto→{r.ran}"
        floor_ms = (r.k + 1) * forward_gflop / gflops * 1e3
        print(f"{r.k:>3}  {name:<11}{r.pass_s * 1e3:>9.1f}{r.pass_s / epoch_s:>12.2f}{floor_ms:>10.1f}"
              f"{r.naive_s * 1e3:>10.1f}{r.naive_s / r.pass_s:>12.1f}{r.err:>13.2e}")
    print("(floor: (k + 1) forwards' multiply-adds at that GEMM rate: a forward, then ∑_layers δᵀ S_j a per query,\n"
          " the least any exact method does; 'grad' adds writing n × dim gradients, 'jvp' does ≈ 2k + 1 forwards)")

    if memory:
        first = next(iter(memory.values()))
        where = "one process per method" if args.quick else "a fresh process each"
        print(f"\npeak memory added by the scoring pass (k={args.memory_queries}, {where}, {first[0]['how']}):")
        print(f"{'method':<8}" + "".join(f"{'n=' + str(int(m['n'])):>12}" for m in first) + f"{'ratio':>8}")
        for method, ms in memory.items():
            print(f"{method:<8}" + "".join(f"{m['peak_mib']:>8.1f} MiB" for m in ms)
                  + f"{ms[-1]['peak_mib'] / max(ms[0]['peak_mib'], 1e-9):>8.2f}")

    print("\ntargets:")
    for method in METHODS:
        mine = [r for r in rows if r.method == method and r.k <= TARGET_MAX_QUERIES]
        epochs = [r.pass_s / epoch_s for r in mine]
        speedups = [r.naive_s / r.pass_s for r in mine]
        print(f"  {method:<5} pass ≤ {TARGET_EPOCHS:g} epochs (k ≤ {TARGET_MAX_QUERIES}): "
              f"{_mark(max(epochs) <= TARGET_EPOCHS)}  ("
              + ", ".join(f"k={r.k}: {e:.2f}" for r, e in zip(mine, epochs)) + ")")
        print(f"  {method:<5} ≥ {TARGET_SPEEDUP:g}× faster than naive: {_mark(min(speedups) >= TARGET_SPEEDUP)}  ("
              + ", ".join(f"k={r.k}: {x:.1f}×" for r, x in zip(mine, speedups)) + ")")
    if memory:
        ratios = [ms[-1]["peak_mib"] / max(ms[0]["peak_mib"], 1e-9) for ms in memory.values()]
        print(f"  peak memory independent of n (×{args.memory_repeat} n → ≤ {TARGET_MEMORY_RATIO:g}× peak): "
              f"{_mark(max(ratios) <= TARGET_MEMORY_RATIO)}")
    err = max(r.err for r in rows)
    print(f"\nequality check: max relative error vs naive = {err:.3e} (tol {args.tol:g}): "
          f"{'ok' if err <= args.tol else 'FAILED'}")
    return err


# -- entry point ----------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 examples, k ∈ {1, 4}, one repeat")
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 8, 32], help="numbers of queries k")
    ap.add_argument("--hidden", type=int, default=256, help="backbone width H")
    ap.add_argument("--batch-size", type=int, default=64, help="loader batch size (epoch and scoring pass)")
    ap.add_argument("--n-pretrain", type=int, default=None, help="first N digits as pretraining set (default all)")
    ap.add_argument("--n-finetune", type=int, default=600, help="finetune examples (parity labels)")
    ap.add_argument("--train-epochs", type=int, default=20, help="Adam epochs of each stage before measuring")
    ap.add_argument("--repeats", type=int, default=5, help="passes and epochs: best of this many rounds")
    ap.add_argument("--naive-repeats", type=int, default=2, help="naive loop: best of this many runs")
    ap.add_argument("--cg-iters", type=int, default=5, help="CG iterations (all of them: tol is tiny)")
    ap.add_argument("--hessian-samples", type=int, default=256, help="examples in the Hessian subsample")
    ap.add_argument("--damping", type=float, default=0.01, help="λ added to both Hessians")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 keeps timings steady on a shared machine")
    ap.add_argument("--memory-queries", type=int, default=8, help="k of the peak-memory runs")
    ap.add_argument("--memory-repeat", type=int, default=4, help="larger pretraining set = this × n (repeated data)")
    ap.add_argument("--memory-methods", nargs="*", default=["grad", "jvp"],
                    help="methods whose peak memory is measured (none: skip)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest accepted relative error vs the naive scores")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe-method", default="grad", help=argparse.SUPPRESS)
    ap.add_argument("--probe-repeat", type=int, nargs="+", default=[1], help=argparse.SUPPRESS)
    ap.add_argument("--probe-k", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.queries = [1, 4]
        args.n_pretrain = args.n_pretrain or 256
        args.n_finetune = min(args.n_finetune, 128)
        args.train_epochs = min(args.train_epochs, 2)
        args.repeats = args.naive_repeats = 1
        args.cg_iters = min(args.cg_iters, 2)
        args.hessian_samples = min(args.hessian_samples, 64)
        args.memory_queries = min(args.memory_queries, 4)
        args.memory_methods = args.memory_methods[:1]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps([probe_memory(args, r) for r in args.probe_repeat]))
        return 0
    p = make_problem(args.hidden, args.batch_size, args.n_pretrain, 1, args.n_finetune, max(args.queries),
                     args.train_epochs)
    epochs = [epoch_seconds(p)]  # warm-up, not counted
    solves, rows = [], []
    for k in args.queries:
        sv, rs = measure_queries(p, k, args, epochs)
        solves.append(sv)
        rows.extend(rs)
    gflops = max(matmul_gflops() for _ in range(3))
    err = report(p, args, min(epochs[1:]), gflops, solves, rows, peak_memory(args))
    return 0 if err <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
