"""The public functional API: ``multistage_influence`` and ``single_stage_influence``.

Both compose the same three steps (docs/math.md, "How it is computed"):

1. a finetune-side solve per query → ``g_j`` (skipped in single stage: ``g_j = ∇f(q_j)``);
2. a pretrain-side solve per query → ``s_j = (H_pt + λI)⁻¹ [g_j; 0_U]``, all queries as one block;
3. one streaming pass over the pretraining data: ``S[i, j] = −s_j · ∇ℓ_pt(z_i)``.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MSIFError
from .comm import Communicator, LocalComm
from .curvature import HessianOperator
from .data import ExampleSource
from .objective import LossFn, Objective, cross_entropy_loss, evaluation
from .params import ParamSpace, check_fixed_backbone, check_same_shared, split_shared
from .scoring import ScoreStore, cached, resolve_method, score_pass
from .solvers import SOLVERS, SolverOptions, solve

MODES = ("fixed", "updated")
SCORING = ("auto", "grad", "jvp")


@dataclass
class InfluenceResult:
    """Scores ``[n_train, n_query]`` and how they were computed (sizes, solver convergence, timings)."""

    scores: torch.Tensor
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class _Settings:
    damping: float
    solver: str
    options: SolverOptions
    hessian_samples: Optional[int]
    scoring: str
    progress: bool
    comm: Communicator
    store: Optional[ScoreStore]
    info: Dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.info.setdefault("seconds", {})[name] = time.perf_counter() - start

    def bar(self, total: int, desc: str, unit: str = "ex") -> Optional[tqdm]:
        if not self.progress or self.comm.rank != 0:
            return None
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)  # None: off when not a TTY

    def hessian_indices(self, n: int) -> Sequence[int]:
        if self.hessian_samples is None or self.hessian_samples >= n:
            return range(n)
        g = torch.Generator().manual_seed(0)
        return sorted(torch.randperm(n, generator=g)[: self.hessian_samples].tolist())

    def operator(self, obj: Objective, space: ParamSpace, shift: Optional[torch.Tensor] = None, damping: Optional[float] = None) -> HessianOperator:
        return HessianOperator(
            obj, space, self.hessian_indices(len(obj.source)),
            damping=self.damping if damping is None else damping,
            shift=shift, rhs_chunk=self.options.rhs_chunk_size,
        )

    def solve(self, name: str, op: HessianOperator, rhs: torch.Tensor) -> torch.Tensor:
        steps = {"cg": self.options.max_iter, "lissa": self.options.lissa_depth * self.options.lissa_repeats}
        bar = self.bar(steps[self.solver], f"{name} solve ({self.solver})", "it") if self.solver in steps else None
        with self.phase(name):
            x, info = solve(op, rhs, self.solver, self.options, bar)
        if bar is not None:
            bar.close()
        self.info.setdefault("solves", {})[name] = info
        return x


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the device allocator's on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _settings(damping: float, solver: str, solver_options: Dict[str, Any], hessian_samples: Optional[int],
              scoring: str, progress: bool, comm: Optional[Communicator], store: Optional[ScoreStore]) -> _Settings:
    if not isinstance(damping, (int, float)) or not damping >= 0:
        raise MSIFError(f"damping must be a number ≥ 0 (it is added to every inverted Hessian), got {damping!r}.")
    if solver not in SOLVERS:
        raise MSIFError(f"Unknown solver {solver!r}; choose one of {list(SOLVERS)}.")
    if scoring not in SCORING:
        raise MSIFError(f"Unknown scoring {scoring!r}; choose one of {list(SCORING)}.")
    if hessian_samples is not None and int(hessian_samples) < 1:
        raise MSIFError(f"hessian_samples must be a positive integer or None (all data), got {hessian_samples!r}.")
    opts = SolverOptions.from_kwargs(solver_options)
    return _Settings(float(damping), solver, opts, hessian_samples, scoring, progress, comm or LocalComm(), store)


def _score_pass(obj: Objective, space: ParamSpace, s: torch.Tensor, st: _Settings) -> torch.Tensor:
    """Step 3: one streaming pass over the training examples (resumable through ``st.store``)."""
    method = resolve_method(st.scoring, s.shape[0])
    st.info["scoring"] = method
    bar = st.bar(len(obj.source), f"scoring {obj.role} examples")
    with st.phase("score_pass"):
        scores = score_pass(obj, space, s, method, st.store, bar)
    if bar is not None:
        bar.close()
    return scores


def _gradients(obj: Objective, space: ParamSpace, st: _Settings) -> torch.Tensor:
    """Per-example gradients of every example of ``obj`` (queries, or a stored pretraining set)."""
    bar = st.bar(len(obj.source), f"{obj.role} gradients")
    with st.phase(f"{obj.role}_gradients"):
        g = obj.gradients(space, bar)
    if bar is not None:
        bar.close()
    return g


def _solve_and_score(pt: Objective, space: ParamSpace, rhs: Callable[[], torch.Tensor], st: _Settings,
                     gradients: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Steps 2 and 3: ``s = (H_pt + λI)⁻¹ rhs()``, then the scoring pass; ``s`` is reused on resume.

    With stored per-example ``gradients`` ``[n, dim]`` (in ``space`` order) step 3 is one product.
    """
    if gradients is not None and tuple(gradients.shape) != (len(pt.source), space.dim):
        raise MSIFError(
            f"The stored pretraining gradients have shape {tuple(gradients.shape)}, but the pretraining set and "
            f"parameters give ({len(pt.source)}, {space.dim}): they were taken on other data or another model. "
            "Store them again, or leave them out."
        )
    like = torch.empty(0, device=pt.device, dtype=pt.dtype)
    s = cached(st.store, st.comm, "solution", lambda: st.solve("pretrain", st.operator(pt, space), rhs()), like)
    st.info["s_norm"] = s.norm(dim=1).tolist()
    if gradients is not None:
        st.info["scoring"] = "stored_gradients"
        with st.phase("score_pass"):
            return -(gradients.to(s.device, s.dtype) @ s.T)
    return _score_pass(pt, space, s, st)


def per_example_gradients(model: nn.Module, data: Any, *, shared: Optional[str] = None,
                          loss_fn: Optional[LossFn] = None, chunk_size: Optional[int] = None,
                          progress: bool = False, comm: Optional[Communicator] = None) -> Tuple[torch.Tensor, List[str]]:
    """``[n, dim]`` per-example loss gradients over the trainable parameters (shared ones first), and their names.

    The order is the one ``multistage_influence`` uses for the pretraining model, so the result can
    stand in for its scoring pass (``pretrain_gradients=``).
    """
    st = _settings(0.0, "exact", {}, None, "grad", progress, comm, None)
    with evaluation(model):
        obj = Objective(model, loss_fn or cross_entropy_loss, ExampleSource(data, "data"), "pretraining", st.comm, chunk_size)
        if shared is None:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
        else:
            theta, rest = split_shared(model, shared, "pretraining")
            names = theta + rest
        space = ParamSpace.of(obj.params, names)
        return _gradients(obj, space, st), names


def compute_multistage(
    pretrain_model: nn.Module,
    finetune_model: nn.Module,
    pretrain_data: Any,
    finetune_data: Any,
    query_data: Any,
    *,
    shared: str,
    mode: str = "fixed",
    alpha: Optional[float] = None,
    damping: float = 0.0,
    solver: str = "exact",
    loss_fn: Optional[LossFn] = None,
    pretrain_loss_fn: Optional[LossFn] = None,
    finetune_loss_fn: Optional[LossFn] = None,
    query_fn: Optional[LossFn] = None,
    hessian_samples: Optional[int] = None,
    chunk_size: Optional[int] = None,
    scoring: str = "auto",
    progress: bool = False,
    comm: Optional[Communicator] = None,
    store: Optional[ScoreStore] = None,
    pretrain_gradients: Optional[torch.Tensor] = None,
    **solver_options: Any,
) -> InfluenceResult:
    """``multistage_influence`` with the convergence and timing record kept (see its docstring)."""
    if mode not in MODES:
        raise MSIFError(f"Unknown mode {mode!r}; choose 'fixed' (embedding frozen while finetuning) or 'updated'.")
    if mode == "updated" and (alpha is None or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise MSIFError(
            f"mode='updated' needs alpha > 0, the strength of the proximal term α/2‖θ − θ̂‖² that ties the "
            f"finetuned embedding to the pretrained one; got alpha={alpha!r}. Pass e.g. alpha=0.1."
        )
    if mode == "fixed" and alpha is not None:
        warnings.warn(f"alpha={alpha} is ignored in mode='fixed' (it is the proximal strength of mode='updated').",
                      stacklevel=2)
    st = _settings(damping, solver, solver_options, hessian_samples, scoring, progress, comm, store)
    loss = loss_fn or cross_entropy_loss
    theta, u, w = check_same_shared(pretrain_model, finetune_model, shared)
    if mode == "fixed":
        check_fixed_backbone(pretrain_model, finetune_model, theta)
    sources = [ExampleSource(d, name) for d, name in
               ((pretrain_data, "pretrain_data"), (finetune_data, "finetune_data"), (query_data, "query_data"))]
    with evaluation(pretrain_model, finetune_model):
        pt = Objective(pretrain_model, pretrain_loss_fn or loss, sources[0], "pretraining", st.comm, chunk_size)
        ft = Objective(finetune_model, finetune_loss_fn or loss, sources[1], "finetune", st.comm, chunk_size)
        q = Objective(finetune_model, query_fn or finetune_loss_fn or loss, sources[2], "query", st.comm, chunk_size)
        ft_space, pt_space = ParamSpace.of(ft.params, theta + w), ParamSpace.of(pt.params, theta + u)
        theta_dim = ParamSpace.of(pt.params, theta).dim
        st.info.update(mode=mode, alpha=alpha, n_pretrain=len(sources[0]), n_finetune=len(sources[1]),
                       n_query=len(sources[2]), dim_theta=theta_dim, dim_u=pt_space.dim - theta_dim,
                       dim_w=ft_space.dim - theta_dim)

        def finetune_side() -> torch.Tensor:
            """Step 1: ``g_j`` for every query, padded with zeros on U."""
            grads = _gradients(q, ft_space, st)  # [k, θ+W]
            if mode == "fixed":
                g = grads[:, :theta_dim]
                if w:
                    w_space = ParamSpace.of(ft.params, w)
                    a = st.solve("finetune", st.operator(ft, w_space), grads[:, theta_dim:])
                    # H_θW a: the (θ, W) Hessian times [0; a], θ rows; no damping on an off-diagonal block.
                    cross = st.operator(ft, ft_space, damping=0.0).matmat(torch.cat([torch.zeros_like(g), a], 1))
                    g = g - cross[:, :theta_dim]
            else:
                shift = torch.zeros(ft_space.dim, device=grads.device, dtype=grads.dtype)
                shift[:theta_dim] = alpha
                g = alpha * st.solve("finetune", st.operator(ft, ft_space, shift=shift), grads)[:, :theta_dim]
            return torch.cat([g, g.new_zeros(g.shape[0], pt_space.dim - theta_dim)], 1)

        scores = _solve_and_score(pt, pt_space, finetune_side, st, pretrain_gradients)
    st.info["peak_memory_mb"] = peak_memory_mb(pt.device)
    return InfluenceResult(scores, st.info)


def multistage_influence(pretrain_model: nn.Module, finetune_model: nn.Module, pretrain_data: Any,
                         finetune_data: Any, query_data: Any, **kwargs: Any) -> torch.Tensor:
    """Multi-stage influence ``S [n_pretrain, n_query]`` of each pretraining example on each query.

    ``S[i, j] = d f(q_j) / dε`` when pretraining example ``i`` is upweighted by ε and both stages are
    re-optimised: positive = harmful (raises the query loss), negative = helpful. Removing example
    ``i`` changes the query loss by about ``−S[i, j] / n``. Rows and columns are dataset indices.

    Keywords: ``shared`` (prefix of θ, required), ``mode`` ('fixed' | 'updated'), ``alpha`` (updated
    mode), ``damping`` λ ≥ 0, ``solver`` ('exact' | 'cg' | 'lissa') and its options (``tol``,
    ``max_iter``, ``lissa_depth``, ``lissa_scale``, ``lissa_repeats``, ``lissa_batch_size``,
    ``max_dense_params``, ``rhs_chunk_size``), ``loss_fn`` / ``pretrain_loss_fn`` /
    ``finetune_loss_fn`` / ``query_fn`` ((model, batch) → per-example values [B]),
    ``hessian_samples`` (curvature from a random subset), ``chunk_size`` (examples per vectorised
    gradient chunk), ``scoring`` ('auto' | 'grad' | 'jvp'), ``progress``, ``comm`` (a process group,
    see ``lightning_msif.distributed``), ``store`` (keeps partial results so a rerun resumes), ``pretrain_gradients``
    (``[n, dim]`` from ``per_example_gradients``: replaces the scoring pass).
    """
    return compute_multistage(pretrain_model, finetune_model, pretrain_data, finetune_data, query_data, **kwargs).scores


def compute_single_stage(
    model: nn.Module,
    train_data: Any,
    query_data: Any,
    *,
    damping: float = 0.0,
    solver: str = "exact",
    loss_fn: Optional[LossFn] = None,
    query_fn: Optional[LossFn] = None,
    hessian_samples: Optional[int] = None,
    chunk_size: Optional[int] = None,
    scoring: str = "auto",
    progress: bool = False,
    comm: Optional[Communicator] = None,
    store: Optional[ScoreStore] = None,
    **solver_options: Any,
) -> InfluenceResult:
    """``single_stage_influence`` with the convergence and timing record kept."""
    st = _settings(damping, solver, solver_options, hessian_samples, scoring, progress, comm, store)
    loss = loss_fn or cross_entropy_loss
    train_src, query_src = ExampleSource(train_data, "train_data"), ExampleSource(query_data, "query_data")
    with evaluation(model):
        train = Objective(model, loss, train_src, "training", st.comm, chunk_size)
        q = Objective(model, query_fn or loss, query_src, "query", st.comm, chunk_size)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise MSIFError("The model has no trainable parameter (requires_grad=True): nothing to differentiate.")
        space = ParamSpace.of(train.params, names)
        st.info.update(mode="single", n_pretrain=len(train_src), n_query=len(query_src), dim=space.dim)
        scores = _solve_and_score(train, space, lambda: _gradients(q, space, st), st)
    st.info["peak_memory_mb"] = peak_memory_mb(train.device)
    return InfluenceResult(scores, st.info)


def single_stage_influence(model: nn.Module, train_data: Any, query_data: Any, **kwargs: Any) -> torch.Tensor:
    """Koh & Liang influence ``S[i, j] = −∇f(q_j)ᵀ (H + λI)⁻¹ ∇ℓ(z_i)``, shape ``[n_train, n_query]``.

    Same sign convention, keywords and row/column order as ``multistage_influence``.
    """
    return compute_single_stage(model, train_data, query_data, **kwargs).scores
