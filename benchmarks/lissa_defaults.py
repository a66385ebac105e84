"""LiSSA with its default options against the exact solve, on problems the defaults were not tuned on.

For each problem and each curvature mini-batch size (``--batches``; ``default`` is ``LissaOptions()``'s),
the scores of ``solver='lissa'`` (every other lissa_* option at its default) are compared with
``solver='exact'`` on the same model, data and damping: Pearson correlation, relative error
``‖S − S_exact‖ / ‖S_exact‖``, the largest residual ``‖Ax − b‖/‖b‖`` the solver measured on the full
curvature, and the time. Problems:

- ``reference-fixed`` / ``reference-updated``: the two-stage problems of ``tests/reference.py`` (13
  pretraining, 11 finetune examples) at their exact optimum, loader batch 4 and 7;
- ``mlp-single``: a random 10 → 16 → 5 tanh MLP, 2000 examples, L2 = damping = 0.1, loader batch 250;
- ``mlp-fixed``: a random two-stage 8 → 10 (shared) → 4 / 2 problem, 1500 pretraining and 800 finetune
  examples, L2 = damping = 0.1, loader batch 64;
- ``mlp-updated``: a random two-stage 20 → 12 (shared) → 8 / 3 problem, 2000 pretraining and 1200
  finetune examples, L2 = damping = 0.05, α = 1, loader batch 100. Its pretraining optimum is
  ill-conditioned (eigenvalues of H + λI in [0.0016, 0.96]): 1000 terms do not converge there, whatever
  the batch (``--depth`` sets lissa_depth to separate that bias from the mini-batch noise).

Run: ``.venv/bin/python benchmarks/lissa_defaults.py`` (about 15 minutes on 2 cores; ``--problems`` and
``--batches`` for a part). The numbers are quoted next to ``LissaOptions.lissa_batch_size``.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reference import blobs, trained_problem  # noqa: E402

from lightning_msif import compute_multistage, compute_single_stage  # noqa: E402
from lightning_msif.core.solvers.lissa import LissaOptions  # noqa: E402

Scorer = Callable[..., Tuple[torch.Tensor, dict]]


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, classes: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _fit(model: nn.Module, data: TensorDataset, l2: float, params: Optional[List[nn.Parameter]] = None,
         anchor: Optional[Dict[str, torch.Tensor]] = None, alpha: float = 0.0) -> None:
    """L-BFGS to (near) the optimum of mean cross-entropy + l2/2‖·‖² (+ α/2‖θ − anchor‖²)."""
    x, y = data.tensors
    params = params or [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=2000, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + l2 / 2 * sum(p.pow(2).sum() for p in params)
        if anchor:
            named = dict(model.named_parameters())
            loss = loss + alpha / 2 * sum((named[n] - a).pow(2).sum() for n, a in anchor.items())
        loss.backward()
        return loss

    opt.step(closure)


def _loader(data: TensorDataset, batch: int) -> DataLoader:
    return DataLoader(data, batch_size=batch)


def reference(mode: str, batch: int) -> Scorer:
    alpha = 1.0 if mode == "updated" else None
    pre, fine, pt, ft, q = trained_problem(mode, alpha, 0.1)

    def run(**kw: object) -> Tuple[torch.Tensor, dict]:
        r = compute_multistage(pre, fine, _loader(pt, batch), _loader(ft, batch), _loader(q, batch),
                               shared="backbone", mode=mode, alpha=alpha, damping=0.1, **kw)
        return r.scores, r.info

    return run


def mlp_single() -> Scorer:
    torch.manual_seed(10)
    model = MLP(10, 16, 5).double()
    train, q = blobs(2000, 5, d=10, seed=11), blobs(8, 5, d=10, seed=12)
    _fit(model, train, 0.1)

    def run(**kw: object) -> Tuple[torch.Tensor, dict]:
        r = compute_single_stage(model, _loader(train, 250), _loader(q, 250), damping=0.1, **kw)
        return r.scores, r.info

    return run


def mlp_fixed() -> Scorer:
    torch.manual_seed(30)
    pre, fine = MLP(8, 10, 4).double(), MLP(8, 10, 2).double()
    pt, ft, q = blobs(1500, 4, d=8, seed=31), blobs(800, 2, d=8, seed=32), blobs(6, 2, d=8, seed=33)
    _fit(pre, pt, 0.1)
    fine.backbone.load_state_dict(pre.backbone.state_dict())
    _fit(fine, ft, 0.1, params=list(fine.head.parameters()))

    def run(**kw: object) -> Tuple[torch.Tensor, dict]:
        r = compute_multistage(pre, fine, _loader(pt, 64), _loader(ft, 64), _loader(q, 64), shared="backbone",
                               mode="fixed", damping=0.1, **kw)
        return r.scores, r.info

    return run


def mlp_updated() -> Scorer:
    torch.manual_seed(20)
    pre, fine = MLP(20, 12, 8).double(), MLP(20, 12, 3).double()
    pt, ft, q = blobs(2000, 8, d=20, seed=21), blobs(1200, 3, d=20, seed=22), blobs(6, 3, d=20, seed=23)
    _fit(pre, pt, 0.05)
    fine.backbone.load_state_dict(pre.backbone.state_dict())
    anchor = {n: p.detach().clone() for n, p in pre.named_parameters() if n.startswith("backbone.")}
    _fit(fine, ft, 0.05, anchor=anchor, alpha=1.0)

    def run(**kw: object) -> Tuple[torch.Tensor, dict]:
        r = compute_multistage(pre, fine, _loader(pt, 100), _loader(ft, 100), _loader(q, 100), shared="backbone",
                               mode="updated", alpha=1.0, damping=0.05, **kw)
        return r.scores, r.info

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="8,32,128,512,1024,default",
                        help="lissa_batch_size values: numbers, 'default' (LissaOptions'), 'all' (None)")
    parser.add_argument("--problems", default="reference-fixed,reference-updated,mlp-single,mlp-fixed,mlp-updated")
    parser.add_argument("--depth", type=int, default=LissaOptions.lissa_depth, help="lissa_depth")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problems: Dict[str, Callable[[], List[Tuple[str, Scorer]]]] = {
        "reference-fixed": lambda: [(f"loader batch {b}", reference("fixed", b)) for b in (4, 7)],
        "reference-updated": lambda: [(f"loader batch {b}", reference("updated", b)) for b in (4, 7)],
        "mlp-single": lambda: [("loader batch 250", mlp_single())],
        "mlp-fixed": lambda: [("loader batch 64", mlp_fixed())],
        "mlp-updated": lambda: [("loader batch 100", mlp_updated())],
    }
    print(f"LissaOptions defaults: {LissaOptions()}; lissa_depth={args.depth}")
    print(f"{'problem':<18} {'loader':<15} {'lissa_batch_size':>16} {'pearson':>9} {'rel err':>9} "
          f"{'residual':>9} {'seconds':>8}")
    for name in args.problems.split(","):
        for loader_name, run in problems[name]():
            exact, _ = run(solver="exact")
            for b in args.batches.split(","):
                kw = {} if b == "default" else {"lissa_batch_size": None if b == "all" else int(b)}
                kw["lissa_depth"] = args.depth
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scores, info = run(solver="lissa", **kw)
                seconds = time.perf_counter() - start
                residual = max(s["relative_residual"] for s in info["solves"].values())
                pearson = torch.corrcoef(torch.stack([scores.reshape(-1), exact.reshape(-1)]))[0, 1].item()
                rel = ((scores - exact).norm() / exact.norm()).item()
                print(f"{name:<18} {loader_name:<15} {b:>16} {pearson:>9.6f} {rel:>9.2e} {residual:>9.2e} "
                      f"{seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
