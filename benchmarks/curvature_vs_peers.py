"""Benchmark of the single-stage curvatures and solvers against kronfluence and pyDVL on one small MLP.

Problem: scikit-learn digits (1797 × 64, inputs standardised with the training examples' mean and
std), a random split into ``--n-train`` training examples and ``--n-query`` queries, an MLP
64 → 32 → 10 (tanh; 2,410 parameters), float32, trained with Adam for ``--train-epochs`` epochs: well
fitted, but *not* at an exact minimum (the full-batch gradient norm and the Hessian's most negative
eigenvalue are printed). Damping λ = ``--damping`` (1e-2) everywhere. Every score is brought to this
library's convention ``S [n_train, n_query]`` (positive = harmful, no 1/n): kronfluence's pairwise
scores and pyDVL's ``influences(mode=Up)`` are ``−Sᵀ``.

1. **Kronecker-factored curvature** against the exact generalised Gauss-Newton score (ours,
   ``curvature="ggn", solver="exact"``, in float64 on a float64 copy of the model; checked against the
   same score rebuilt without the library from ``torch.func`` Jacobians): our ``ekfac`` and ``kfac``
   (true and empirical Fisher, ``solver="direct"``), kronfluence's EK-FAC and K-FAC (``Analyzer`` + a
   ``Task`` for this model, ``FactorArguments(strategy=..., use_empirical_fisher=...)``,
   ``ScoreArguments(damping_factor=λ)``). Pearson, Spearman and ``‖S − S_ref‖ / ‖S_ref‖`` over all
   (train, query) pairs, and wall time; the empirical-Fisher pairs of both libraries against each other
   (deterministic: they should agree to round-off); the true Fisher's spread over ``--fisher-seeds``
   draws of its sampled labels.
2. **Small-model solvers** against pyDVL (``pydvl.influence.torch``) on the exact Hessian: our
   ``solver="exact"`` against ``DirectInfluence``, our ``solver="cg"`` (``--cg-tol``) against
   ``CgInfluence`` (its block CG, with its stopping rule set to ours), each also against the exact
   Hessian score in float64; at λ and, when ``H + λI`` is not positive definite there (CG's
   precondition), again at the smallest of ``--cg-dampings`` where it is, with ``solver="block_cg"`` too
   (one Krylov space for all queries, as pyDVL's block CG). The Hessian's spectrum comes from an explicit
   float64 Hessian built here, outside the timings.
3. A compact table at the end (``--markdown``: also as markdown).

Run: ``.venv/bin/python benchmarks/curvature_vs_peers.py`` (about 2 minutes on 2 cores), or ``--quick``
for a smoke run (smaller model and data: its numbers are not the documented ones). The peers are
optional (``pip install -c .venv/constraints.txt -r benchmarks/requirements.txt``): a missing one
is reported and skipped. Accuracies are reported, not enforced; the exit status is 1 only when a
method of this library fails unexpectedly.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_msif import MSIFError, compute_single_stage

TARGET_PEARSON = 0.84  # kronfluence's EK-FAC against the exact GGN score on this model, an earlier measurement
SLOW_SECONDS = 5.0  # a method whose first run takes longer is not repeated


# -- problem --------------------------------------------------------------------------------------
def mlp(d_in: int, hidden: int, classes: int, activation: str) -> nn.Sequential:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, classes))


@dataclass
class Problem:
    """The trained float32 model, its data (float32) and what describes them."""

    model: nn.Module
    train: TensorDataset
    query: TensorDataset
    batch_size: int
    description: str
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def loaders(self, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, DataLoader, DataLoader]:
        """``(model, train loader, query loader)`` in ``dtype`` (a copy of the model unless float32)."""
        model = self.model if dtype == torch.float32 else copy.deepcopy(self.model).to(dtype)
        train, query = (TensorDataset(d.tensors[0].to(dtype), d.tensors[1]) for d in (self.train, self.query))
        return model, DataLoader(train, batch_size=self.batch_size), DataLoader(query, batch_size=len(query))


def digits() -> Tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)


def make_problem(args: argparse.Namespace) -> Problem:
    """Split, standardise, train with Adam (minibatches, shuffled, seeded); measure how far from a minimum."""
    x, y = digits()
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(x), generator=g)
    tr, q = perm[: args.n_train], perm[args.n_train : args.n_train + args.n_query]
    mean, std = x[tr].mean(0), x[tr].std(0)
    x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))  # constant pixels stay 0
    train, query = TensorDataset(x[tr], y[tr]), TensorDataset(x[q], y[q])
    torch.manual_seed(args.seed)
    model = mlp(x.shape[1], args.hidden, 10, args.activation)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(train, batch_size=args.train_batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    for _ in range(args.train_epochs):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x[tr]), y[tr])
    grad_norm = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).norm()
    with torch.no_grad():
        stats = {"train_loss": loss.item(), "grad_norm": grad_norm.item(),
                 "train_acc": (model(x[tr]).argmax(1) == y[tr]).float().mean().item(),
                 "query_loss": F.cross_entropy(model(x[q]), y[q]).item(),
                 "query_acc": (model(x[q]).argmax(1) == y[q]).float().mean().item()}
    what = (f"sklearn digits, standardised; {args.n_train} train / {args.n_query} queries (random split, seed "
            f"{args.seed}); MLP 64→{args.hidden}→10 {args.activation}; Adam lr {args.lr}, {args.train_epochs} epochs, "
            f"batch {args.train_batch_size}")
    return Problem(model, train, query, args.batch_size, what, stats)


# -- metrics ----------------------------------------------------------------------------------------
def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().flatten().numpy(), b.double().flatten().numpy())[0])


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖a − ref‖ / ‖ref‖`` (Frobenius, over all pairs)."""
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def best_scale(a: torch.Tensor, ref: torch.Tensor) -> float:
    """The ``c`` minimising ``‖c·a − ref‖``: 1 when the documented sign and scale conventions hold."""
    a, ref = a.double().flatten(), ref.double().flatten()
    return (a @ ref / (a @ a).clamp_min(1e-300)).item()


# -- measured methods -------------------------------------------------------------------------------
@dataclass
class Run:
    """One method's scores in our convention ``[n_train, n_query]`` (None if it failed) and its wall time."""

    key: str
    library: str
    method: str
    scores: Optional[torch.Tensor]
    seconds: float
    runs: int = 1
    note: str = ""
    info: Dict[str, Any] = field(default_factory=dict)


def timed(fn: Callable[[], Tuple[torch.Tensor, Dict[str, Any]]], repeats: int) -> Tuple[torch.Tensor, float, int, Dict]:
    """Best wall time of up to ``repeats`` calls (one when the first takes over ``SLOW_SECONDS``)."""
    best, out, info, runs = math.inf, None, {}, 0
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out, info = fn()
        best = min(best, time.perf_counter() - start)
        runs += 1
        if best > SLOW_SECONDS:
            break
    return out, best, runs, info


def ours(p: Problem, dtype: torch.dtype, damping: float, **kw: Any) -> Callable[[], Tuple[torch.Tensor, Dict]]:
    model, train, query = p.loaders(dtype)

    def call() -> Tuple[torch.Tensor, Dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a CG short of its tol warns; its measured residual is recorded
            r = compute_single_stage(model, train, query, damping=damping, **kw)
        return r.scores, r.info

    return call


def run_ours(key: str, method: str, p: Problem, args: argparse.Namespace, dtype: torch.dtype = torch.float32,
             damping: Optional[float] = None, expect_failure: bool = False, **kw: Any) -> Run:
    """One of our methods; an ``MSIFError`` is recorded as the result (it is the library's answer)."""
    lam = args.damping if damping is None else damping
    try:
        scores, seconds, runs, info = timed(ours(p, dtype, lam, **kw), args.repeats)
    except MSIFError as err:
        return Run(key, "lightning-msif", method, None, math.nan, note=f"refused: {str(err).split(':')[0]}",
                   info={"error": str(err), "expected": expect_failure})
    solve = info.get("solves", {}).get("pretrain", {})
    note = ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in solve.items()
                     if k in ("iterations", "relative_residual", "negative_eigenvalues") and isinstance(v, (int, float)))
    return Run(key, "lightning-msif", method, scores.detach(), seconds, runs, note, info)


# kronfluence ------------------------------------------------------------------------------------
def kronfluence_task():
    from kronfluence.task import Task

    class DigitsTask(Task):
        """Summed cross-entropy (kronfluence's convention); ``sample=True`` draws labels from the model (true Fisher)."""

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return DigitsTask()


def run_kronfluence(key: str, strategy: str, empirical: bool, p: Problem, args: argparse.Namespace,
                    seed: Optional[int] = None, repeats: Optional[int] = None) -> Run:
    """kronfluence's factors + pairwise scores on a copy of the model (``prepare_model`` wraps it in place)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    method = f"{strategy} ({'empirical' if empirical else 'true'} Fisher)"
    task = kronfluence_task()
    model = prepare_model(copy.deepcopy(p.model), task)
    with tempfile.TemporaryDirectory(prefix="msif-kronfluence-") as out:
        analyzer = Analyzer(analysis_name="digits", model=model, task=task, cpu=True, disable_tqdm=True,
                            output_dir=out, log_level=logging.WARNING)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical)
        score_args = ScoreArguments(damping_factor=args.damping)  # absolute λ on every layer's eigenvalues
        counter = [0]

        def call() -> Tuple[torch.Tensor, Dict]:
            counter[0] += 1
            torch.manual_seed(args.seed if seed is None else seed)  # the sampled labels of the true Fisher
            name = f"{strategy}_{int(empirical)}_{counter[0]}"
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                analyzer.fit_all_factors(factors_name=name, dataset=p.train, per_device_batch_size=p.batch_size,
                                         factor_args=factor_args, overwrite_output_dir=True)
                analyzer.compute_pairwise_scores(scores_name=name, factors_name=name, query_dataset=p.query,
                                                 train_dataset=p.train, per_device_query_batch_size=len(p.query),
                                                 per_device_train_batch_size=p.batch_size, score_args=score_args,
                                                 overwrite_output_dir=True)
                scores = analyzer.load_pairwise_scores(name)["all_modules"]  # [n_query, n_train]
            return -scores.T.contiguous(), {}

        scores, seconds, runs, _ = timed(call, args.repeats if repeats is None else repeats)
    return Run(key, "kronfluence", method, scores.detach(), seconds, runs, "damping_factor = λ")


# pyDVL ------------------------------------------------------------------------------------------
def run_pydvl(key: str, kind: str, p: Problem, args: argparse.Namespace, damping: Optional[float] = None) -> Run:
    """pyDVL's ``DirectInfluence`` / ``CgInfluence`` on the Hessian of the mean loss; ``influences(mode=Up)``."""
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence, DirectInfluence

    lam = args.damping if damping is None else damping
    x_tr, y_tr = p.train.tensors
    x_q, y_q = p.query.tensors
    loader = DataLoader(p.train, batch_size=p.batch_size)
    note, info = "", {}

    def call() -> Tuple[torch.Tensor, Dict]:
        if kind == "direct":
            model = DirectInfluence(p.model, F.cross_entropy, regularization=lam)
        elif kind == "cg":  # block CG; it stops when ‖r_j‖ ≤ max(rtol²·‖b_j‖, atol²): rtol = √tol, atol = 0 is ours
            model = CgInfluence(p.model, F.cross_entropy, regularization=lam, rtol=math.sqrt(args.cg_tol), atol=0.0,
                                maxiter=args.cg_max_iter, solve_simultaneously=True, warn_on_max_iteration=True)
        else:  # one CG per query; its per-query rtol is mis-indexed (column norms), so one absolute tol, as strict
            # as ours for the smallest right-hand side: ‖r_j‖ ≤ atol² = tol · min_j ‖b_j‖ (b_j = ∇f(q_j))
            model = CgInfluence(p.model, F.cross_entropy, regularization=lam, rtol=0.0,
                                atol=math.sqrt(args.cg_tol * query_grad_norms(p).min().item()),
                                maxiter=args.cg_max_iter, solve_simultaneously=False, warn_on_max_iteration=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = model.fit(loader)
            infl = model.influences(x_q, y_q, x_tr, y_tr, mode=InfluenceMode.Up)  # [n_query, n_train]
        flagged = [str(w.message) for w in caught if "max number of iterations" in str(w.message)]
        return -infl.T.detach().contiguous(), {"warnings": flagged}

    scores, seconds, runs, info = timed(call, args.repeats)
    if info.get("warnings"):
        achieved = re.search(r"Achieved (?:max )?residuum is\s*([0-9.eE+-]+|nan|inf)", info["warnings"][0])
        value = achieved.group(1).rstrip(".") if achieved else "nan"
        note = f"hit maxiter={args.cg_max_iter} short of its tol (warned; max ‖r‖ {float(value):.3g})"
    method = {"direct": "DirectInfluence", "cg": f"CgInfluence (block, tol {args.cg_tol:g})",
              "cg1": f"CgInfluence (one CG per query, tol {args.cg_tol:g})"}[kind]
    return Run(key, "pyDVL", method, scores, seconds, runs, note, info)


def query_grad_norms(p: Problem) -> torch.Tensor:
    """``‖∇f(q_j)‖`` of every query (mean-reduction cross-entropy of one example), the CG right-hand sides."""
    from torch.func import functional_call, grad, vmap

    params = {n: v.detach() for n, v in p.model.named_parameters()}

    def loss(prm: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(p.model, prm, (x[None],)), y[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, *p.query.tensors)
    return torch.cat([t.flatten(1) for t in g.values()], 1).norm(dim=1)


def available(module: str) -> Optional[str]:
    """The installed version of ``module``'s distribution, or None when it cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pyDVL's own deprecation notices at import
            __import__(module)
            if module == "pydvl":
                import pydvl.influence.torch  # noqa: F401  (needs the 'influence' extra: dask, distributed, zarr)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    for dist in {"pydvl": ("pyDVL", "pydvl")}.get(module, (module,)):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return "?"


def hessian_spectrum(p: Problem) -> torch.Tensor:
    """Eigenvalues (ascending, float64) of the exact Hessian of the mean training loss, built without the library:
    ``vmap`` of the gradient's pullback over the identity, on a float64 copy. CG needs ``H + λI ≻ 0``."""
    from torch.func import functional_call, grad, vjp, vmap

    model = copy.deepcopy(p.model).double()
    names = [n for n, _ in model.named_parameters()]
    params = {n: v.detach() for n, v in model.named_parameters()}
    x, y = p.train.tensors[0].double(), p.train.tensors[1]
    _, pull = vjp(grad(lambda prm: F.cross_entropy(functional_call(model, prm, (x,)), y)), params)
    sizes = [params[n].numel() for n in names]

    def column(v: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.reshape(params[n].shape) for n, t in zip(names, torch.split(v, sizes)))))
        out = pull(parts)[0]
        return torch.cat([out[n].reshape(-1) for n in names])

    h = vmap(column, chunk_size=64)(torch.eye(sum(sizes), dtype=torch.float64))
    return torch.linalg.eigvalsh((h + h.T) / 2)


# -- report -----------------------------------------------------------------------------------------
@dataclass
class Row:
    section: str
    run: Run
    against: str
    pearson: float = math.nan
    spearman: float = math.nan
    rel_err: float = math.nan
    scale: float = math.nan


def compare(section: str, run: Run, ref: Optional[Run], against: str) -> Row:
    row = Row(section, run, against)
    if run.scores is not None and ref is not None and ref.scores is not None:
        row.pearson, row.spearman = pearson(run.scores, ref.scores), spearman(run.scores, ref.scores)
        row.rel_err, row.scale = rel_err(run.scores, ref.scores), best_scale(run.scores, ref.scores)
    return row


def _f(v: float, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), Python {platform.python_version()}")


def table(rows: Sequence[Row]) -> List[List[str]]:
    head = ["section", "library", "method", "against", "Pearson", "Spearman", "rel. error", "scale", "wall s", "notes"]
    body = [[r.section, r.run.library, r.run.method, r.against, _f(r.pearson, ".4f"), _f(r.spearman, ".4f"),
             _f(r.rel_err, ".2e"), _f(r.scale, ".3f"),
             _f(r.run.seconds, ".3f") + (f" (best of {r.run.runs})" if r.run.runs > 1 else ""), r.run.note]
            for r in rows]
    return [head] + body


def print_table(cells: List[List[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(cells[0]) + " |")
        print("|" + "---|" * len(cells[0]))
        for row in cells[1:]:
            print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        return
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


# -- sections -------------------------------------------------------------------------------------
def independent_ggn_scores(p: Problem, damping: float) -> torch.Tensor:
    """The exact GGN score built without the library, in float64: ``G = (1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i``
    from ``torch.func`` Jacobians, a dense solve, ``S[i, j] = −∇ℓ(z_i)ᵀ (G + λI)⁻¹ ∇f(q_j)``: a check of the reference."""
    from torch.func import functional_call, grad, jacrev, vmap

    model = copy.deepcopy(p.model).double()
    params = {n: v.detach() for n, v in model.named_parameters()}

    def flat(d: Dict[str, torch.Tensor], k: int) -> torch.Tensor:
        return torch.cat([d[name].reshape(k, -1) for name in params], 1)

    x, y = p.train.tensors[0].double(), p.train.tensors[1]
    xq, yq = p.query.tensors[0].double(), p.query.tensors[1]

    def logits(prm: Dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, prm, (xi[None],))[0]

    def loss(prm: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(prm, xi)[None], yi[None])

    n, k = len(x), 10
    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, x)  # {name: [n, k, *shape]}
    j = torch.cat([jac[name].reshape(n, k, -1) for name in params], 2)  # [n, k, D]
    prob = torch.softmax(functional_call(model, params, (x,)), -1)
    lam_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # [n, k, k]
    g = j.reshape(n * k, -1).T @ torch.einsum("nkl,nld->nkd", lam_out, j).reshape(n * k, -1) / n
    g_train = flat(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y), n)
    g_query = flat(vmap(grad(loss), in_dims=(None, 0, 0))(params, xq, yq), len(xq))
    solved = torch.linalg.solve(g + damping * torch.eye(len(g), dtype=g.dtype), g_query.T)  # [D, m]
    return -(g_train @ solved)


def section_curvature(p: Problem, args: argparse.Namespace, have_kron: bool) -> Tuple[List[Row], Dict[str, Run]]:
    """1. Kronecker-factored curvatures against the exact GGN score (float64)."""
    runs: Dict[str, Run] = {}
    runs["ggn"] = run_ours("ggn", "ggn + exact (float64)", p, args, torch.float64, curvature="ggn", solver="exact")
    if runs["ggn"].scores is None:
        raise RuntimeError(f"the float64 GGN reference failed: {runs['ggn'].info['error']}")
    for key, method, kw in [("ekfac", "ekfac (true Fisher)", {}), ("ekfac_emp", "ekfac (empirical Fisher)",
                                                                     {"fisher": "empirical"}),
                            ("kfac", "kfac (true Fisher)", {}), ("kfac_emp", "kfac (empirical Fisher)",
                                                                {"fisher": "empirical"})]:
        curvature = key.split("_")[0]
        runs[key] = run_ours(key, method, p, args, curvature=curvature, solver="direct", relative_damping=0.0,
                             fisher_seed=args.seed, **kw)
    if have_kron:
        for key, strategy, emp in [("k_ekfac", "ekfac", False), ("k_ekfac_emp", "ekfac", True),
                                   ("k_kfac", "kfac", False), ("k_kfac_emp", "kfac", True)]:
            runs[key] = run_kronfluence(key, strategy, emp, p, args)
    rows = [compare("1", runs["ggn"], None, "(reference)")]
    rows += [compare("1", runs[k], runs["ggn"], "exact GGN f64") for k in runs if k != "ggn"]
    return rows, runs


def fisher_spread(p: Problem, args: argparse.Namespace, ref: torch.Tensor,
                  have_kron: bool) -> Dict[str, List[Tuple[float, float]]]:
    """(Pearson, rel. error) against the reference for ``--fisher-seeds`` draws of the true Fisher's labels."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    seeds = range(args.seed, args.seed + args.fisher_seeds)
    for curvature in ("ekfac", "kfac"):
        for seed in seeds:
            r = run_ours(curvature, curvature, p, argparse.Namespace(**{**vars(args), "repeats": 1}),
                         curvature=curvature, solver="direct", relative_damping=0.0, fisher_seed=seed)
            if r.scores is not None:
                out.setdefault(f"ours {curvature}", []).append((pearson(r.scores, ref), rel_err(r.scores, ref)))
    if have_kron:
        for seed in seeds:
            r = run_kronfluence("k", "ekfac", False, p, args, seed=seed, repeats=1)
            out.setdefault("kronfluence ekfac", []).append((pearson(r.scores, ref), rel_err(r.scores, ref)))
    return out


def section_solvers(p: Problem, args: argparse.Namespace, have_dvl: bool,
                    spectrum: torch.Tensor) -> Tuple[List[Row], Dict[str, Run]]:
    """2. Exact and CG solves of the Hessian against pyDVL, and each against the float64 exact Hessian score."""
    runs: Dict[str, Run] = {}
    rows: List[Row] = []
    runs["h64"] = run_ours("h64", "hessian + exact (float64)", p, args, torch.float64, curvature="hessian",
                           solver="exact")
    h_min = spectrum[0].item()
    lam_min = h_min + args.damping  # the smallest eigenvalue of H + λI
    runs["h_exact"] = run_ours("h_exact", "hessian + exact", p, args, curvature="hessian", solver="exact")
    cg_kw = {"curvature": "hessian", "solver": "cg", "tol": args.cg_tol, "max_iter": args.cg_max_iter}
    runs["h_cg"] = run_ours("h_cg", f"hessian + cg (tol {args.cg_tol:g})", p, args, expect_failure=lam_min <= 0,
                            **cg_kw)
    if have_dvl:
        runs["d_direct"] = run_pydvl("d_direct", "direct", p, args)
        runs["d_cg"] = run_pydvl("d_cg", "cg", p, args)
    ref = runs["h64"]
    rows.append(compare("2", ref, None, f"(reference, λ={args.damping:g})"))
    for k in ("h_exact", "d_direct", "h_cg", "d_cg"):
        if k in runs:
            rows.append(compare("2", runs[k], ref, "exact Hessian f64"))
    for ours_key, theirs_key in (("h_exact", "d_direct"), ("h_cg", "d_cg")):
        if theirs_key in runs and runs[ours_key].scores is not None:
            rows.append(compare("2", runs[theirs_key], runs[ours_key], f"ours: {runs[ours_key].method}"))
    # CG needs H + λI ≻ 0: where it is not at λ, repeat the CG pair at the smallest damping where it is
    if lam_min <= 0:
        lam2 = next((d for d in args.cg_dampings if d + h_min > 0.1 * d), None)
        if lam2 is not None:
            tag = f"λ={lam2:g}"
            runs["h64_2"] = run_ours("h64_2", f"hessian + exact (float64), {tag}", p, args, torch.float64,
                                     damping=lam2, curvature="hessian", solver="exact")
            runs["h_cg_2"] = run_ours("h_cg_2", f"hessian + cg (tol {args.cg_tol:g}), {tag}", p, args, damping=lam2,
                                      **cg_kw)
            runs["h_bcg_2"] = run_ours("h_bcg_2", f"hessian + block_cg (tol {args.cg_tol:g}), {tag}", p, args,
                                       damping=lam2, **{**cg_kw, "solver": "block_cg"})
            rows.append(compare("2b", runs["h64_2"], None, f"(reference, {tag})"))
            for key in ("h_cg_2", "h_bcg_2"):
                rows.append(compare("2b", runs[key], runs["h64_2"], "exact Hessian f64"))
            if have_dvl:
                for key, kind in (("d_cg_2", "cg"), ("d_cg1_2", "cg1")):
                    runs[key] = run_pydvl(key, kind, p, args, damping=lam2)
                    runs[key].method += f", {tag}"
                    rows.append(compare("2b", runs[key], runs["h64_2"], "exact Hessian f64"))
                if runs["h_bcg_2"].scores is not None:
                    rows.append(compare("2b", runs["d_cg_2"], runs["h_bcg_2"], "ours: block_cg"))
    return rows, runs


# -- entry point ----------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 200 train / 10 queries, hidden 8, 5 epochs, one repeat (not the documented numbers)")
    ap.add_argument("--seed", type=int, default=0, help="split, initialisation, minibatch order, sampled labels")
    ap.add_argument("--n-train", type=int, default=1000, help="training examples scored")
    ap.add_argument("--n-query", type=int, default=50, help="queries")
    ap.add_argument("--hidden", type=int, default=32, help="hidden width (32: 2,410 parameters)")
    ap.add_argument("--activation", choices=["tanh", "relu"], default="tanh")
    ap.add_argument("--train-epochs", type=int, default=30, help="Adam epochs (not to an exact minimum)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument("--train-batch-size", type=int, default=32, help="training minibatch")
    ap.add_argument("--batch-size", type=int, default=100, help="batch of every library's passes over the data")
    ap.add_argument("--damping", type=float, default=1e-2, help="λ, in every method")
    ap.add_argument("--cg-tol", type=float, default=1e-6, help="CG: stop at ‖b − Ax‖ ≤ tol·‖b‖ (ours and pyDVL's)")
    ap.add_argument("--cg-max-iter", type=int, default=500, help="CG iteration cap (ours and pyDVL's)")
    ap.add_argument("--cg-dampings", type=float, nargs="+", default=[2e-2, 5e-2, 1e-1, 2e-1, 5e-1, 1.0],
                    help="when H + λI is indefinite: CG again at the first of these where H + damping·I ≻ 0")
    ap.add_argument("--fisher-seeds", type=int, default=5,
                    help="true Fisher: Pearson/rel. error over this many label draws (ours: fisher_seed, kronfluence: torch seed)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip rebuilding the GGN reference without the library (torch.func Jacobians, float64)")
    ap.add_argument("--repeats", type=int, default=3,
                    help=f"timings: best of this many runs (one when the first takes over {SLOW_SECONDS:g} s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 keeps timings steady on a shared machine")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument("--no-kronfluence", action="store_true", help="skip kronfluence")
    ap.add_argument("--no-pydvl", action="store_true", help="skip pyDVL")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_query, args.hidden = min(args.n_train, 200), min(args.n_query, 10), min(args.hidden, 8)
        args.train_epochs, args.repeats, args.batch_size = min(args.train_epochs, 5), 1, min(args.batch_size, 50)
        args.fisher_seeds = min(args.fisher_seeds, 2)
    return args


def _spread(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    kron = None if args.no_kronfluence else available("kronfluence")
    dvl = None if args.no_pydvl else available("pydvl")
    p = make_problem(args)
    s = p.stats
    print("lightning-msif curvature benchmark against kronfluence and pyDVL (single stage, float32 unless noted)")
    print(f"hardware: {hardware()}")
    print(f"peers: kronfluence {kron or 'not available (skipped)'}, pyDVL {dvl or 'not available (skipped)'}")
    print(f"data/model: {p.description}; {p.dim:,} parameters")
    print(f"trained: train loss {s['train_loss']:.4f} (acc {s['train_acc']:.3f}), query loss {s['query_loss']:.4f} "
          f"(acc {s['query_acc']:.3f}), full-batch ‖∇L‖ = {s['grad_norm']:.2e} (not a minimum)")
    print(f"damping λ = {args.damping:g}; every library's passes in batches of {args.batch_size}; timings: best of up to "
          f"{args.repeats} runs, each a whole call (curvature/factors, solves, scores)")
    print("\ndamping, per library (all set to the same absolute λ on the mean-loss curvature: comparable):")
    print("  ours: S = −∇f(q)ᵀ (C + λI)⁻¹ ∇ℓ(z), C the curvature of the mean loss; kfac/ekfac add λ to every block's "
          "eigenvalues, relative_damping=0 (its default once λ > 0; 0.1 × each block's mean eigenvalue only at λ = 0)")
    print("  kronfluence: ScoreArguments(damping_factor=λ) adds λ to every layer's eigenvalues of its mean Fisher "
          "(damping_factor=None: 0.1 × each layer's mean eigenvalue; this version's default is 1e-8)")
    print("  pyDVL: regularization=λ adds λI to the Hessian of the mean loss (F.cross_entropy)")
    print("  signs: kronfluence's pairwise scores and pyDVL's influences(mode=Up) are −Sᵀ; negated and transposed here "
          "('scale': the least-squares c in c·S ≈ S_against, 1 when sign and scale agree)")

    failures: List[str] = []
    rows1, runs1 = section_curvature(p, args, kron is not None)
    ref1 = runs1["ggn"]
    spread = fisher_spread(p, args, ref1.scores, kron is not None) if args.fisher_seeds > 1 else {}
    check = None if args.no_check else rel_err(ref1.scores, independent_ggn_scores(p, args.damping))
    spectrum = hessian_spectrum(p)
    rows2, runs2 = section_solvers(p, args, dvl is not None, spectrum)
    for run in {**runs1, **runs2}.values():
        if run.scores is None and not run.info.get("expected"):
            failures.append(f"{run.method}: {run.info.get('error')}")

    ggn_solve = ref1.info["solves"]["pretrain"]
    print(f"\n1. Kronecker-factored curvatures against the exact GGN score (float64; G + λI "
          f"{'positive definite' if ggn_solve['positive_definite'] else 'indefinite'})")
    if check is not None:
        print(f"  reference check: the same score rebuilt without the library (torch.func Jacobians, dense solve, "
              f"float64) differs by {check:.1e}")
    if runs2["h64"].scores is not None:
        h = runs2["h64"].scores
        print(f"  context: the exact Hessian score (float64) against it: Pearson {pearson(h, ref1.scores):.4f}, "
              f"Spearman {spearman(h, ref1.scores):.4f}, rel. error {rel_err(h, ref1.scores):.2e}")
    for a, b in (("ekfac_emp", "k_ekfac_emp"), ("kfac_emp", "k_kfac_emp"), ("ekfac", "k_ekfac"), ("kfac", "k_kfac")):
        if a in runs1 and b in runs1 and runs1[a].scores is not None:
            ra, rb = runs1[a], runs1[b]
            print(f"  ours {ra.method} against kronfluence's: rel. error {rel_err(ra.scores, rb.scores):.2e}, "
                  f"Pearson {pearson(ra.scores, rb.scores):.6f}; time ours {ra.seconds:.3f} s, kronfluence "
                  f"{rb.seconds:.3f} s ({rb.seconds / ra.seconds:.0f}×)")
    for name, values in spread.items():
        print(f"  true Fisher, {len(values)} label draws: {name} Pearson {_spread([v[0] for v in values])}, "
              f"rel. error {_spread([v[1] for v in values])}")
    kr = next((x for x in rows1 if x.run.key == "k_ekfac"), None)
    mine = next(x for x in rows1 if x.run.key == "ekfac")
    print(f"  target: kronfluence's EK-FAC reached Pearson {TARGET_PEARSON} against the exact GGN score in an earlier "
          f"measurement; here (seed {args.seed}) kronfluence {_f(kr.pearson if kr else math.nan, '.3f')}, "
          f"ours {_f(mine.pearson, '.3f')}")

    h64 = runs2["h64"].info["solves"]["pretrain"]
    low, high = spectrum[0].item() + args.damping, spectrum[-1].item() + args.damping
    print(f"\n2. Solvers on the exact Hessian against pyDVL: spectrum of H + λI [{low:.3g}, {high:.3g}], "
          f"{int((spectrum + args.damping < 0).sum())} negative eigenvalues (our exact solver's L D Lᵀ inertia: "
          f"{h64['negative_eigenvalues']})" + (" — indefinite at this λ: CG's precondition fails" if low <= 0 else ""))
    for run in runs2.values():
        if run.scores is None:
            print(f"  {run.method}: {run.info['error']}")
    for a, b in (("h_exact", "d_direct"), ("h_cg", "d_cg"), ("h_cg_2", "d_cg1_2"), ("h_cg_2", "d_cg_2"),
                 ("h_bcg_2", "d_cg_2")):
        if a in runs2 and b in runs2 and runs2[a].scores is not None:
            ra, rb = runs2[a], runs2[b]
            print(f"  {ra.method}: {ra.seconds:.3f} s; pyDVL {rb.method}: {rb.seconds:.3f} s; ours / pyDVL = "
                  f"{ra.seconds / rb.seconds:.2f}×; rel. error between them {rel_err(rb.scores, ra.scores):.2e}")

    print(f"\nsummary (rel. error = ‖S − S_against‖/‖S_against‖ over all {args.n_train}×{args.n_query} pairs; "
          f"wall s: one whole call; total run {time.perf_counter() - start:.0f} s)")
    cells = table(rows1 + rows2)
    print_table(cells, markdown=False)
    if args.markdown:
        print()
        print_table(cells, markdown=True)
    if failures:
        print("\nUNEXPECTED FAILURES of this library:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
