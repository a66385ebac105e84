"""What the application experiments share: the two pretraining/finetuning pairs, the model, deterministic
two-stage training, the scores, ranking metrics and the markdown/PNG output.

Training is full-batch L-BFGS in float64 from a seeded initialisation, stopped at max |gradient| ≤ ``tol``,
on exactly the objectives docs/math.md differentiates (L2 penalty λ; the influence damping is λ + ``EXTRA_DAMPING``):

- pretraining ``(1/n) Σ_{i kept} ℓ_i + λ/2 ‖(θ, U)‖²`` — n is the size of the *whole* pretraining set, so
  removing an example sets its weight to 0 (ε = −1/n, what ``−S/n`` predicts);
- finetuning ``fixed``: W only on the pretrained θ; ``updated``: (θ, W) with ``+ α/2 ‖θ − θ̂‖²``.

``lightning_msif.demo.digits_recipe`` trains the same objectives (with a Newton polish) but only on digits
and ~20× slower per retraining at this width, so these experiments keep their own loop.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from lightning_msif import compute_multistage, compute_single_stage
from lightning_msif.core.influence import InfluenceResult
from lightning_msif.demo import DigitsDataModule

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DTYPE = torch.float64
# Added to λ in the influence damping: L-BFGS stops where the regularised pretraining Hessian still has a few
# flat directions (digits: smallest eigenvalue about −5e-5), which an undamped solve would blow up.
EXTRA_DAMPING = 1e-3
IMG_DIR = Path(__file__).resolve().parents[2] / "docs" / "img"


@dataclass(frozen=True)
class Split:
    """Inputs ``x [N, d]`` (float64) and integer labels ``y [N]``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, rows: torch.Tensor) -> "Split":
        return Split(self.x[rows], self.y[rows])

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)


@dataclass(frozen=True)
class Problem:
    """A pretraining/finetuning pair. ``pretrain.y`` are the labels trained on, ``clean`` the true ones."""

    name: str
    pretrain: Split
    clean: torch.Tensor
    pretrain_val: Split
    finetune: Split
    val: Split
    test: Split
    pretrain_classes: Tuple[str, ...]
    finetune_classes: Tuple[str, ...]
    hidden: int
    weight_decay: float

    @property
    def damping(self) -> float:
        return self.weight_decay + EXTRA_DAMPING

    @property
    def corrupted(self) -> torch.Tensor:
        """Pretraining indices whose label was deliberately corrupted."""
        return (self.pretrain.y != self.clean).nonzero().flatten()


def digits_problem(seed: int, corrupt_fraction: float = 0.05, quick: bool = False) -> Problem:
    """sklearn digits: pretrain on 0–4 (``corrupt_fraction`` of labels wrong), finetune on 5–9 (20 % val, 20 % test)."""
    limit = 200 if quick else None
    pre = DigitsDataModule(task="pretrain", corrupt_fraction=corrupt_fraction, seed=seed, limit=limit)
    fine = DigitsDataModule(task="finetune", seed=seed, val_fraction=0.2, test_fraction=0.2, limit=limit)
    split = lambda d: Split(d.x.to(DTYPE), d.targets)  # noqa: E731
    return Problem(
        "digits 0–4 → 5–9", split(pre.train_dataset), pre.train_dataset.clean_targets, split(pre.dataset("val")),
        split(fine.train_dataset), split(fine.dataset("val")), split(fine.dataset("test")),
        tuple(pre.class_names), tuple(fine.class_names), hidden=8 if quick else 32, weight_decay=1e-2,
    )


def cancer_problem(seed: int, corrupt_fraction: float = 0.05, quick: bool = False) -> Problem:
    """sklearn breast cancer (569 tumours, 30 features), malignant vs benign, split into two populations by
    ``mean texture``: pretrain on the smoother half (90 % train, ``corrupt_fraction`` of the diagnoses
    flipped), finetune on the rougher half (10 % train, 45 % val, 45 % test). Features are standardised
    with the pretraining set's statistics."""
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer()
    x, y = torch.as_tensor(raw.data, dtype=DTYPE), torch.as_tensor(raw.target, dtype=torch.long)
    texture = x[:, list(raw.feature_names).index("mean texture")]
    g = torch.Generator().manual_seed(seed)
    smooth = texture <= texture.median()
    halves = [rows[torch.randperm(len(rows), generator=g)]
              for rows in (smooth.nonzero()[:, 0], (~smooth).nonzero()[:, 0])]
    if quick:
        halves = [rows[:100] for rows in halves]
    pre, fine = halves
    n_val = round(0.1 * len(pre))
    pre_train, pre_val = pre[n_val:], pre[:n_val]
    mean, std = x[pre_train].mean(0), x[pre_train].std(0)
    x = (x - mean) / std
    clean = y[pre_train]
    labels = clean.clone()
    flip = torch.randperm(len(pre_train), generator=g)[: round(corrupt_fraction * len(pre_train))]
    labels[flip] = 1 - labels[flip]
    n_ft, n_v = round(0.1 * len(fine)), round(0.45 * len(fine))
    part = lambda rows: Split(x[rows], y[rows])  # noqa: E731
    return Problem(
        "breast cancer, smooth → rough texture", Split(x[pre_train], labels), clean, part(pre_val),
        part(fine[:n_ft]), part(fine[n_ft : n_ft + n_v]), part(fine[n_ft + n_v :]),
        tuple(raw.target_names), tuple(raw.target_names), hidden=4 if quick else 16, weight_decay=1e-2,
    )


PROBLEMS = {"digits": digits_problem, "cancer": cancer_problem}
Config = Tuple[str, Optional[float]]  # (mode, α)


def configs(alphas: Sequence[float]) -> List[Config]:
    """Fixed mode, then updated mode with each α."""
    return [("fixed", None)] + [("updated", a) for a in alphas]


def label(config: Config) -> str:
    return "fixed" if config[0] == "fixed" else f"updated α={config[1]:g}"


class MLP(nn.Module):
    """``backbone`` (d → hidden → hidden, tanh, the shared θ) then ``head`` (a linear classifier)."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def fit(model: MLP, data: Split, weight_decay: float, n: Optional[int] = None, anchor: Optional[MLP] = None,
        alpha: float = 0.0, tol: float = 1e-6, max_iter: int = 20_000) -> int:
    """Minimise ``(1/n) Σ ℓ + λ/2 ‖trainable‖² (+ α/2 ‖θ − θ_anchor‖²)`` with L-BFGS; returns the iterations.

    Stops at max |gradient| ≤ ``tol``, after ``max_iter`` iterations, or when a round of 200 iterations
    starts no lower than the previous one (a stall)."""
    params = [p for p in model.parameters() if p.requires_grad]
    centre = [p.detach().clone() for p in anchor.backbone.parameters()] if anchor is not None else []
    scale = 1.0 / (n or len(data))
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=200, max_eval=400, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = scale * F.cross_entropy(model(data.x), data.y, reduction="sum")
        loss = loss + weight_decay / 2 * sum(p.pow(2).sum() for p in params)
        if alpha:
            loss = loss + alpha / 2 * sum((p - c).pow(2).sum() for p, c in zip(model.backbone.parameters(), centre))
        loss.backward()
        return loss

    steps, last = 0, float("inf")
    while steps < max_iter:
        loss = opt.step(objective).item()
        steps = opt.state[params[0]]["n_iter"]
        objective()
        if max(p.grad.abs().max().item() for p in params) <= tol or loss >= last:
            break
        last = loss
    return steps


def pretrain(problem: Problem, seed: int, keep: Optional[torch.Tensor] = None) -> MLP:
    """The pretraining model on all pretraining examples, or only on the indices ``keep``."""
    torch.manual_seed(seed)
    model = MLP(problem.pretrain.x.shape[1], problem.hidden, len(problem.pretrain_classes)).to(DTYPE)
    data = problem.pretrain if keep is None else problem.pretrain.subset(keep)
    fit(model, data, problem.weight_decay, n=len(problem.pretrain))
    return model


def finetune(problem: Problem, pretrained: MLP, seed: int, mode: str, alpha: Optional[float] = None) -> MLP:
    """A new head on the pretrained backbone: frozen (``fixed``) or tied by α/2‖θ − θ̂‖² (``updated``; α = 0
    trains every layer freely from the given backbone)."""
    torch.manual_seed(seed + 1)
    model = MLP(problem.finetune.x.shape[1], problem.hidden, len(problem.finetune_classes)).to(DTYPE)
    model.backbone.load_state_dict(pretrained.backbone.state_dict())
    if mode == "fixed":
        model.backbone.requires_grad_(False)
        fit(model, problem.finetune, problem.weight_decay)
    else:
        fit(model, problem.finetune, problem.weight_decay, anchor=pretrained, alpha=float(alpha))
    return model


def train_two_stage(problem: Problem, seed: int, mode: str, alpha: Optional[float] = None,
                    keep: Optional[torch.Tensor] = None) -> Tuple[MLP, MLP]:
    """Both stages, the pretraining one on ``keep`` only if given."""
    pre = pretrain(problem, seed, keep)
    return pre, finetune(problem, pre, seed, mode, alpha)


@torch.no_grad()
def evaluate(model: MLP, data: Split) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    logits = model(data.x)
    return F.cross_entropy(logits, data.y).item(), (logits.argmax(1) == data.y).double().mean().item()


def multistage(problem: Problem, pre: MLP, fine: MLP, mode: str, alpha: Optional[float] = None,
               solver: str = "exact", queries: Optional[Split] = None, damping: Optional[float] = None,
               **options: float) -> InfluenceResult:
    """``S [n_pretrain, n_query]`` on the finetune val set (or ``queries``); damping ``problem.damping`` by default."""
    return compute_multistage(
        pre, fine, problem.pretrain.dataset(), problem.finetune.dataset(), (queries or problem.val).dataset(),
        shared="backbone", mode=mode, alpha=alpha if mode == "updated" else None,
        damping=problem.damping if damping is None else damping,
        solver=solver, **{"rhs_chunk_size": 256, **options},
    )


def single_stage_rankings(problem: Problem, pre: MLP) -> Dict[str, torch.Tensor]:
    """Rankings that look at the pretraining model alone (higher = more suspicious).

    - pretraining loss ``ℓ(z_i)``;
    - single-stage self-influence ``∇ℓ_iᵀ (H + λI)⁻¹ ∇ℓ_i`` (Koh & Liang's mislabel detector);
    - single-stage harm to the *pretraining* val set ``Σ_j S_single[i, j]``.
    """
    train, n = problem.pretrain, len(problem.pretrain)
    queries = Split(torch.cat([train.x, problem.pretrain_val.x]), torch.cat([train.y, problem.pretrain_val.y]))
    scores = compute_single_stage(pre, train.dataset(), queries.dataset(), damping=problem.damping,
                                  solver="exact", rhs_chunk_size=256).scores
    with torch.no_grad():
        loss = F.cross_entropy(pre(train.x), train.y, reduction="none")
    return {"pretraining loss": loss, "single-stage self-influence": -scores[:, :n].diagonal(),
            "single-stage harm to pretraining val": scores[:, n:].sum(1)}


def multistage_rankings(scores: torch.Tensor) -> Dict[str, torch.Tensor]:
    """From ``S [n, k]`` (higher = ranked first): net harm ``Σ_j S``, net help ``−Σ_j S``, net influence of
    either sign ``|Σ_j S|``, and influence on each query whatever its sign ``Σ_j |S|``."""
    total = scores.sum(1)
    return {"harmful Σ_j S": total, "helpful −Σ_j S": -total, "net-influential |Σ_j S|": total.abs(),
            "influential Σ_j |S|": scores.abs().sum(1)}


def detection(ranking: torch.Tensor, corrupted: torch.Tensor) -> Dict[str, float]:
    """P@k = R@k with k = #corrupted, recall in the top 2k, and the ROC AUC of the ranking."""
    k, n = len(corrupted), len(ranking)
    label = torch.zeros(n, dtype=torch.bool)
    label[corrupted] = True
    order = ranking.argsort(descending=True)
    return {"P@k": label[order[:k]].double().mean().item(), "R@2k": label[order[: 2 * k]].double().sum().item() / k,
            "AUC": float(roc_auc_score(label.numpy(), ranking.double().numpy()))}


def recall_curve(ranking: torch.Tensor, corrupted: torch.Tensor) -> np.ndarray:
    """Fraction of the corrupted examples found among the top 1, 2, …, n of ``ranking``."""
    label = torch.zeros(len(ranking))
    label[corrupted] = 1.0
    return (label[ranking.argsort(descending=True)].cumsum(0) / len(corrupted)).numpy()


def mean_std(values: Sequence[float], digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    a = np.asarray(values, dtype=float)
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return fmt.format(a.mean()) + (f" ± {a.std(ddof=1):.{digits}f}" if len(a) > 1 else "")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (``|`` inside cells escaped)."""
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def show(title: str, table: str) -> None:
    print(f"\n### {title}\n\n{table}\n", flush=True)


def save(fig: Figure, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"saved {path}", flush=True)
    return path


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every experiment takes: ``--seeds``, ``--quick``, ``--out``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="data split, label corruption and initialisation seeds")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run on a small subset (one seed)")
    p.add_argument("--out", type=Path, default=IMG_DIR, help="folder for the PNG plots")
    return p


def start(args: argparse.Namespace) -> float:
    """One torch thread (tiny matrices); ``--quick`` keeps the first seed only. Returns the start time."""
    torch.set_num_threads(1)
    if args.quick:
        args.seeds = args.seeds[:1]
    print(f"hardware: {hardware()}", flush=True)
    return time.perf_counter()


def hardware() -> str:
    """CPU model, core count, torch version and threads."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s)"


def finish(started: float) -> None:
    print(f"\nwall time: {time.perf_counter() - started:.0f} s", flush=True)


def random_choice(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``range(n)`` drawn without replacement, reproducibly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def complement(n: int, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().flatten()

