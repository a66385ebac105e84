"""The public functional API: ``multistage_influence`` and ``single_stage_influence``.

Both compose the same three steps (docs/math.md, "How it is computed"):

1. a finetune-side solve per query → ``g_j`` (skipped in single stage: ``g_j = ∇f(q_j)``);
2. a pretrain-side solve per query → ``s_j = (H_pt + λI)⁻¹ [g_j; 0_U]``, all queries as one block;
3. one streaming pass over the pretraining data: ``S[i, j] = −s_j · ∇ℓ_pt(z_i)``.
"""
from __future__ import annotations

import hashlib
import inspect
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MSIFError
from .arguments import InfluenceArguments, ScoreArguments
from .auto import choose_curvature, choose_solver
from .comm import Communicator, LocalComm
from .curvature import CURVATURES, Curvature
from .data import ExampleSource
from .index import AUTOCAST, INDEX_DTYPES, GradientIndex, IndexStore, capture_index, index_scores
from .objective import LossFn, Objective, cross_entropy_loss, evaluation
from .params import ParamSpace, check_fixed_backbone, check_same_shared, split_shared
from .precision import follow, in_compute_dtype, scoring_pair
from .progress import PassProgress, ResidualProgress, closing, new_bar
from .projection import Projection
from .scoring import (DEFAULT_BLOCK, SCORING_BATCH_FACTOR, STREAM_ABOVE_BYTES, RowBlocks, ScoreStore, agreed, cached,
                      fastest_method, row_blocks, score_pass)
from .solvers import SOLVERS, solve
from .training_index import StepIndex, assemble


@dataclass
class InfluenceResult:
    """Scores ``[n_train, n_query]`` and how they were computed (sizes, solver convergence, timings); ``scores`` is
    None when they were streamed (``stream_scores``: every block is in the run's store, none in memory)."""

    scores: Optional[torch.Tensor]
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    """One computation: its arguments, process group, partial-result store, progress and record."""

    args: ScoreArguments
    progress: bool = False
    comm: Communicator = field(default_factory=LocalComm)
    store: Optional[ScoreStore] = None
    factors: Optional[FactorStore] = None  # fitted curvature of the pretraining stage (a snapshot's)
    info: Dict[str, Any] = field(default_factory=dict)
    objectives: List[Objective] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.info.setdefault("seconds", {})[name] = time.perf_counter() - start

    @property
    def shows_progress(self) -> bool:
        return self.progress and self.comm.rank == 0

    def bar(self, total: int, desc: str, unit: str = "ex") -> Optional[tqdm]:
        return new_bar(total, desc, unit) if self.shows_progress else None

    @contextmanager
    def passes(self, obj: Objective, desc: str) -> Iterator[None]:
        """Show every pass over ``obj``'s data while the block runs (fitting a curvature, an exact solve's matrix)."""
        if not self.shows_progress:
            yield
            return
        obj.watch = PassProgress(desc)
        try:
            yield
        finally:
            obj.watch.close()
            obj.watch = None

    @contextmanager
    def solve_progress(self, impl: Any, options: Any, op: Curvature, desc: str) -> Iterator[Optional[Any]]:
        """The solver's bar: digits of residual towards its ``target``, else its ``steps``, else the data passes."""
        target, steps = impl.target(options), impl.steps(options)
        if not self.shows_progress or (target is None and not steps):
            with self.passes(op.objective, desc):
                yield None
            return
        bar = ResidualProgress(desc, target) if target is not None else new_bar(steps, desc, "it")
        try:
            yield bar
        finally:
            bar.close()

    def objective(self, model: nn.Module, loss: LossFn, source: ExampleSource, role: str) -> Objective:
        """An objective of this run; its per-example gradient engine is reported in ``info`` when done."""
        obj = Objective(model, loss, source, role, self.comm, self.args.chunk_size, gradients=self.args.gradients)
        self.objectives.append(obj)
        return obj

    def validate(self, *objectives: Objective) -> None:
        """Every example of each objective's data checked by one forward pass (``Objective.validate``), before
        any gradient, curvature or solve: bad data is named by its dataset index, not met deep in a solve."""
        with self.phase("data_checks"):
            for obj in objectives:
                bar = self.bar(len(obj.source), f"checking {obj.source.name}")
                obj.validate(bar)
                if bar is not None:
                    bar.close()

    def record_engines(self) -> None:
        self.info["per_example_gradients"] = {o.role: o.engine_note or o.engine for o in self.objectives}

    def curvature_indices(self, n: int) -> Sequence[int]:
        """All examples, or the fixed random subset of ``hessian_samples``."""
        k = self.args.hessian_samples
        if k is None or k >= n:
            return range(n)
        g = torch.Generator().manual_seed(0)
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    def curvature(self, stage: str, obj: Objective, space: ParamSpace, shift: Optional[torch.Tensor] = None,
                  decide_on: Optional[ParamSpace] = None) -> Curvature:
        """The curvature of ``obj`` over ``space`` for the ``stage`` solve (damping λ, plus ``shift``).

        ``auto`` decides on ``decide_on`` (default ``space``): the fixed mode's finetune stage also needs the
        cross block over θ and W.
        """
        name = self._kind(stage, obj, decide_on or space)
        kind, options = CURVATURES.get(name), self.args.curvature_options_of(name)
        indices = self.curvature_indices(len(obj.source))
        key = factor_key(name, options, space, indices)
        saved = self.factors.get(key) if self.factors is not None and stage == "pretrain" else None
        op = None
        if agreed(self.comm, saved is not None):
            op = kind.from_state(obj, space, indices, damping=self.args.damping, shift=shift, options=options,
                                 tensors=saved[0], meta=saved[1])
        if agreed(self.comm, op is not None):
            self.info["curvature"][stage]["factors"] = "from the pretraining snapshot"
        else:
            with self.passes(obj, f"{stage} curvature ({name})"):
                op = kind.build(obj, space, indices, damping=self.args.damping, shift=shift, options=options)
            state = op.state()
            if state is not None and self.factors is not None and stage == "pretrain" and self.comm.rank == 0:
                self.factors.put(key, *state)
        if callable(getattr(op, "coverage", None)):
            self.info["curvature"][stage]["coverage"] = op.coverage()
        return op

    def _kind(self, stage: str, obj: Objective, space: ParamSpace) -> str:
        name, why = self.args.curvature, "as configured"
        if name == "auto":
            name, why = choose_curvature(obj, space, self.curvature_indices(len(obj.source)), self.comm)
        self.info.setdefault("curvature", {})[stage] = {"name": name, "why": why}
        return name

    def cross(self, stage: str, obj: Objective, rows: ParamSpace, cols: ParamSpace, vectors: torch.Tensor) -> torch.Tensor:
        """The undamped off-diagonal block ``C[rows, cols] V`` of the ``stage`` curvature (fixed mode's ``H_θW``)."""
        name = self.info["curvature"][stage]["name"]
        with self.phase(f"{stage}_cross"):
            return CURVATURES.get(name).cross_product(obj, rows, cols, vectors, self.curvature_indices(len(obj.source)),
                                                      self.args.curvature_options_of(name))

    def streams(self, n: int, s: torch.Tensor) -> bool:
        """Whether the ``[n, k]`` scores of the vectors ``s`` stay in the store instead of being gathered
        (``stream_scores``; None: when a store is given and the matrix is over ``STREAM_ABOVE_BYTES``)."""
        stream = self.args.stream_scores
        if stream is None:
            stream = self.store is not None and n * s.shape[0] * s.element_size() > STREAM_ABOVE_BYTES
        self.info["scores"] = "streamed" if stream else "gathered"
        return bool(stream)

    def product_sink(self, n: int, s: torch.Tensor) -> Tuple[Optional[ScoreStore], bool]:
        """``(store, stream)`` for scores that are one cheap product per block (stored gradients, an index): the
        blocks go to the store only when streamed; gathered, recomputing them beats saving them."""
        stream = self.streams(n, s)
        return (self.store if stream else None), stream

    def solve(self, name: str, op: Curvature, rhs: torch.Tensor) -> torch.Tensor:
        solver, why = self.args.solver, "as configured"
        if solver == "auto":
            solver, why = choose_solver(op, self.args.solver_options_of("exact").max_dense_params)
        options = self.args.solver_options_of(solver)
        with self.solve_progress(SOLVERS.get(solver), options, op, f"{name} solve ({solver})") as bar, \
                self.phase(name):
            x, info = solve(op, rhs, solver, options, bar)
        self.info.setdefault("solves", {})[name] = {**info, "why": why}
        return x


class FactorStore(Protocol):
    """Where a fitted curvature survives between runs (implemented by the snapshot layer)."""

    def get(self, key: str) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
        """The tensors and metadata saved under ``key``, or None."""

    def put(self, key: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        """Save a fitted curvature under ``key`` (atomically)."""


def factor_key(name: str, options: Any, space: ParamSpace, indices: Sequence[int]) -> str:
    """What a fitted curvature depends on besides the weights and data: its kind, options, parameters, examples."""
    idx = list(indices)
    text = repr([name, repr(options), list(space.names), [tuple(s) for s in space.shapes], len(idx), idx[:8], idx[-8:]])
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the device allocator's on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _score_pass(obj: Objective, space: ParamSpace, s: torch.Tensor, run: _Run) -> Optional[torch.Tensor]:
    """Step 3: one streaming pass over the training examples (resumable through ``run.store``)."""
    method = run.args.scoring
    if method == "auto":  # timed once; kept in the store, so a resumed run takes the same way (identical scores)

        def decide() -> torch.Tensor:
            chosen, seconds = fastest_method(obj, space, s)
            if seconds:
                run.info["scoring_probe_seconds"] = seconds
            return torch.tensor([1.0 if chosen == "jvp" else 0.0])

        flag = cached(run.store, run.comm, "scoring_method", decide, torch.empty(0, dtype=torch.float32))
        method = "jvp" if float(flag.reshape(-1)[0]) > 0.5 else "grad"
    run.info["scoring"] = method
    bar = run.bar(len(obj.source), f"scoring {obj.role} examples")
    with run.phase("score_pass"):
        scores = score_pass(obj, space, s, method, run.store, bar, rank=run.args.query_rank,
                            stream=run.streams(len(obj.source), s))
    closing(bar)
    return scores


def _stored_scores(gradients: torch.Tensor, s: torch.Tensor, run: _Run) -> Optional[torch.Tensor]:
    """Step 3 from stored per-example gradients ``[n, dim]``: one product per block of rows."""
    store, stream = run.product_sink(len(gradients), s)
    out = RowBlocks(run.comm, store, s, stream)
    for start, stop in row_blocks(len(gradients), DEFAULT_BLOCK, run.comm):
        out.add(start, stop, -(gradients[start:stop].to(s.device, s.dtype) @ s.T))
    return out.finish()


def _gradients(obj: Objective, space: ParamSpace, run: _Run) -> torch.Tensor:
    """Per-example gradients of every example of ``obj`` (queries, or a stored pretraining set)."""
    bar = run.bar(len(obj.source), f"{obj.role} gradients")
    with run.phase(f"{obj.role}_gradients"):
        g = obj.gradients(space, bar)
    closing(bar)
    return g


def _solve_and_score(pt: Objective, space: ParamSpace, rhs: Callable[[], torch.Tensor], run: _Run,
                     gradients: Optional[torch.Tensor] = None,
                     index: Optional[GradientIndex] = None) -> Optional[torch.Tensor]:
    """Steps 2 and 3: ``s = (H_pt + λI)⁻¹ rhs()``, then the scoring pass; ``s`` is reused on resume.

    With stored per-example ``gradients`` ``[n, dim]`` (in ``space`` order) step 3 is one product; with a gradient
    ``index``, one product per block of the index with the projected ``s``.
    """
    projection = _index_projection(pt, space, index) if index is not None else None  # refused before any work
    if gradients is not None and tuple(gradients.shape) != (len(pt.source), space.dim):
        raise MSIFError(
            f"The stored pretraining gradients have shape {tuple(gradients.shape)}, but the pretraining set and "
            f"parameters give ({len(pt.source)}, {space.dim}): they were taken on other data or another model. "
            "Store them again, or leave them out."
        )
    like = torch.empty(0, device=pt.device, dtype=pt.dtype)

    def solution() -> torch.Tensor:
        b = rhs()  # the query side first: its errors name the queries, and it needs no curvature of the pretraining set
        return run.solve("pretrain", run.curvature("pretrain", pt, space), b)

    s = cached(run.store, run.comm, "solution", solution, like)
    run.info["s_norm"] = s.norm(dim=1).tolist()
    if gradients is not None:
        run.info["scoring"] = "stored_gradients"
        with run.phase("score_pass"):
            return _stored_scores(gradients, s, run)
    if projection is not None:
        run.info["scoring"] = "gradient_index"
        run.info["index"] = {k: index.projection.get(k) for k in ("kind", "dim", "seed", "out_dim", "balanced")}
        bar = run.bar(index.n, f"scoring {pt.role} examples from the gradient index")
        with run.phase("score_pass"):
            scores = index_scores(index.store, index.n, projection.vectors(s), run.comm, index.block, bar,
                                  *run.product_sink(index.n, s))
        closing(bar)
        return scores
    return _score_pass(pt, space, s, run)


def _index_projection(pt: Objective, space: ParamSpace, index: GradientIndex) -> Projection:
    """The projection of ``index``, rebuilt for ``space`` with the index's own matrices for vectors; an error when
    the index was taken on other data or parameters (before any work)."""
    if index.n != len(pt.source):
        raise MSIFError(f"The gradient index covers {index.n} examples, but the {pt.role} data has "
                        f"{len(pt.source)}: it was captured on other data. Capture it again, or leave it out.")
    described = dict(index.projection)
    if described.get("names") == list(space.names):
        projection = Projection(pt, space, int(described.get("dim", 1)), int(described.get("seed", 0)),
                                duals=index.duals, balanced=bool(described.get("balanced")),
                                kind=str(described.get("kind", "random")))
        if projection.describe() == described:
            return projection
    raise MSIFError(f"The gradient index was captured for other parameters or layers than the {pt.role} "
                    f"model's {list(space.names)[:4]}… (index: {list(described.get('names', []))[:4]}…, "
                    f"dim {described.get('dim')}): capture it again from this model.")


def capture_gradient_index(model: nn.Module, data: Any, store: IndexStore, *, shared: Optional[str] = None,
                           dim: int = 16, seed: int = 0, dtype: str = "float32", projection: str = "eigen",
                           balance: bool = True, autocast: Optional[str] = None,
                           arguments: Optional[ScoreArguments] = None, factors: Optional[FactorStore] = None,
                           loss_fn: Optional[LossFn] = None, block: int = DEFAULT_BLOCK, progress: bool = False,
                           comm: Optional[Communicator] = None) -> GradientIndex:
    """Capture the gradient index of ``data`` (the pretraining set) under ``model`` into ``store``: each example's
    loss gradient over the trainable parameters (shared ones first, as ``multistage_influence`` orders them),
    projected to ``dim`` per side of each layer (seed ``seed``) and kept in ``dtype``. Blocks already in
    ``store`` are kept (an interrupted capture resumes); ``block``: examples per stored block. Pass the result as
    ``index=`` to score against it.

    ``projection``: ``"eigen"`` (default) projects each Kronecker layer onto the leading ``dim`` eigenvectors of
    its two factors (deterministic; needs the balancing curvature), ``"random"`` onto seeded Gaussian directions
    (an unbiased estimate of every score). ``balance`` (default): first change the gradients' basis by a
    Kronecker-factored square root of the curvature the scores use (``arguments``' curvature and damping; reused
    from ``factors`` when fitted there, e.g. by ``PretrainingSnapshot``), which leaves every score's expectation
    alone and makes the projection far more accurate. Only a Kronecker-factored curvature (EK-FAC/K-FAC) can
    balance; with another (the exact Hessian of a small model) the index is random and its description says
    ``balanced: False``. ``autocast`` (``"bfloat16"`` | ``"float16"``): capture under ``torch.autocast`` (the
    curvature that balances it is fitted in full precision).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise MSIFError(f"dim must be a whole number ≥ 1 (the projected size per side of each layer), got {dim!r}.")
    if dtype not in INDEX_DTYPES:
        raise MSIFError(f"dtype must be one of {list(INDEX_DTYPES)}, got {dtype!r}.")
    if autocast is not None and autocast not in AUTOCAST:
        raise MSIFError(f"autocast must be one of {list(AUTOCAST)} or None, got {autocast!r}.")
    run = _Run(arguments or ScoreArguments(), progress, comm or LocalComm(), factors=factors)
    model = in_compute_dtype(model)
    with evaluation(model):
        obj = run.objective(model, loss_fn or cross_entropy_loss, ExampleSource(data, "pretrain_data"), "pretraining")
        space = ParamSpace.of(obj.params, _trainable(model, shared))
        weights = None
        if balance:
            op = run.curvature("pretrain", obj, space)
            weights = op.balance() if callable(getattr(op, "balance", None)) else None
        projector = Projection(obj, space, dim, seed, balance=weights, kind=projection)
        bar = run.bar(len(obj.source), "gradient index")
        capture_index(obj, projector, store, dtype, block, bar, autocast)
        closing(bar)
    return GradientIndex(store, len(obj.source), projector.describe(), projector.duals, block)


def step_index(model: nn.Module, data: Any, pieces: IndexStore, *, shared: Optional[str] = None, dim: int = 16,
               seed: int = 0, dtype: str = "float32", projection: str = "eigen",
               arguments: Optional[ScoreArguments] = None, loss_fn: Optional[LossFn] = None,
               comm: Optional[Communicator] = None) -> StepIndex:
    """A gradient index to be caught from ``model``'s own training steps on ``data`` (``core/training_index.py``:
    what that gives up against ``capture_gradient_index``'s dedicated pass); rows wait in ``pieces`` until
    ``finish_step_index``. Its projection is balanced by K-FAC (empirical Fisher, ``arguments``' damping) from the
    training steps given to ``add_moments`` first. A bf16/fp16 ``model`` is computed on a float32 copy (as by the
    dedicated pass), which follows its weights: its steps' inputs and gradients are widened before any product."""
    run = _Run(arguments or ScoreArguments(), False, comm or LocalComm())
    compute = in_compute_dtype(model)
    with evaluation(compute):  # the layer map's probe forward must not move BatchNorm's running statistics
        obj = run.objective(compute, loss_fn or cross_entropy_loss, ExampleSource(data, "pretrain_data"),
                            "pretraining")
        space = ParamSpace.of(obj.params, _trainable(compute, shared))
        return StepIndex(obj, space, pieces, dim=dim, seed=seed, kind=projection, damping=run.args.damping,
                         dtype=dtype, trained=model)


def finish_step_index(step: StepIndex, store: IndexStore, *, block: int = DEFAULT_BLOCK,
                      progress: bool = False) -> Tuple[GradientIndex, Dict[str, int]]:
    """Assemble the rows a ``StepIndex`` caught (every rank's pieces) into the index's blocks in ``store``; the
    examples the training steps did not give (or gave a non-finite row for) are captured now, at the model's
    current weights in eval mode, in the compute dtype. Returns the index and how many rows were ``caught`` and
    ``filled``."""
    if step.projection is None:
        step.build()
    obj, projection = step.obj, step.projection
    follow(obj.bound.model, step.trained)
    n = len(obj.source)
    size = max(1, SCORING_BATCH_FACTOR * obj.source.batch_size)

    def fill(indices: Sequence[int]) -> torch.Tensor:
        return torch.cat([projection.examples(batch, idx)
                          for batch, idx in obj.batches(indices, shard=False, batch_size=size)])

    bar = _Run(ScoreArguments(), progress, obj.comm).bar(n, "gradient index")
    with evaluation(obj.bound.model):
        counts = assemble(step.pieces, store, obj, projection, n, block, step.dtype, obj.comm, fill, bar)
    if bar is not None:
        bar.close()
    return GradientIndex(store, n, projection.describe(), projection.duals, block), counts


def _trainable(model: nn.Module, shared: Optional[str]) -> List[str]:
    """The trainable parameters' names, those under the ``shared`` prefix first (the pretraining side's order)."""
    if shared is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    theta, rest = split_shared(model, shared, "pretraining")
    return theta + rest


def per_example_gradients(model: nn.Module, data: Any, *, shared: Optional[str] = None,
                          loss_fn: Optional[LossFn] = None, chunk_size: Optional[int] = None,
                          progress: bool = False, comm: Optional[Communicator] = None) -> Tuple[torch.Tensor, List[str]]:
    """``[n, dim]`` per-example loss gradients over the trainable parameters (shared ones first), and their names.

    The order is the one ``multistage_influence`` uses for the pretraining model, so the result can
    stand in for its scoring pass (``pretrain_gradients=``).
    """
    run = _Run(ScoreArguments(chunk_size=chunk_size), progress, comm or LocalComm())
    model = in_compute_dtype(model)
    with evaluation(model):
        obj = Objective(model, loss_fn or cross_entropy_loss, ExampleSource(data, "data"), "pretraining", run.comm,
                        chunk_size)
        names = _trainable(model, shared)
        run.validate(obj)
        return _gradients(obj, ParamSpace.of(obj.params, names), run), names


def fit_pretraining_curvature(model: nn.Module, data: Any, factors: FactorStore, *, shared: str,
                              arguments: ScoreArguments, loss_fn: Optional[LossFn] = None, progress: bool = False,
                              comm: Optional[Communicator] = None) -> Dict[str, Any]:
    """Fit the pretraining stage's curvature over ``(θ, U)`` as ``multistage_scores`` will, and keep it in
    ``factors`` so the finetune stage need not read the pretraining set for it; returns what was chosen."""
    run = _Run(arguments, progress, comm or LocalComm(), factors=factors)
    theta, rest = split_shared(model, shared, "pretraining")
    model = in_compute_dtype(model)
    with evaluation(model):
        obj = run.objective(model, loss_fn or cross_entropy_loss, ExampleSource(data, "pretrain_data"), "pretraining")
        with run.phase("pretrain_curvature"):
            run.curvature("pretrain", obj, ParamSpace.of(obj.params, theta + rest))
    return {**run.info["curvature"]["pretrain"], "seconds": run.info["seconds"]["pretrain_curvature"]}


def check_same_dtype(pt: Objective, ft: Objective) -> None:
    """Both stages in one floating dtype: they share θ, and the pretraining solve takes the finetune side's vectors."""
    if pt.dtype != ft.dtype:
        raise MSIFError(
            f"The pretraining model is {pt.dtype} but the finetune model {ft.dtype}: the stages share θ and one solve "
            "spans both, so they need one dtype. Cast one to the other's, e.g. pretrain_model.to(torch.float64) and "
            "finetune_model.to(torch.float64) (float64 gives the most accurate scores)."
        )


def multistage_scores(
    pretrain_model: nn.Module,
    finetune_model: nn.Module,
    pretrain_data: Any,
    finetune_data: Any,
    query_data: Any,
    arguments: InfluenceArguments,
    *,
    pretrain_loss_fn: Optional[LossFn] = None,
    finetune_loss_fn: Optional[LossFn] = None,
    query_fn: Optional[LossFn] = None,
    progress: bool = False,
    comm: Optional[Communicator] = None,
    store: Optional[ScoreStore] = None,
    pretrain_gradients: Optional[torch.Tensor] = None,
    factors: Optional[FactorStore] = None,
    index: Optional[GradientIndex] = None,
) -> InfluenceResult:
    """Multi-stage influence for settings held in an ``InfluenceArguments`` (what the callback and CLI pass).

    Losses default to cross-entropy on ``(x, y)`` batches; ``query_fn`` to the finetune loss. ``factors``: a
    fitted pretraining curvature to reuse (and where to keep one fitted now).
    """
    args = arguments
    run = _Run(args, progress, comm or LocalComm(), store, factors)
    mode, alpha = args.mode, args.effective_alpha
    pretrain_model, finetune_model = scoring_pair(pretrain_model, finetune_model)
    theta, u, w = check_same_shared(pretrain_model, finetune_model, args.shared)
    if mode == "fixed":
        check_fixed_backbone(pretrain_model, finetune_model, theta)
    sources = [ExampleSource(d, name) for d, name in
               ((pretrain_data, "pretrain_data"), (finetune_data, "finetune_data"), (query_data, "query_data"))]
    pt_loss, ft_loss = pretrain_loss_fn or cross_entropy_loss, finetune_loss_fn or cross_entropy_loss
    with evaluation(pretrain_model, finetune_model):
        pt = run.objective(pretrain_model, pt_loss, sources[0], "pretraining")
        ft = run.objective(finetune_model, ft_loss, sources[1], "finetune")
        q = run.objective(finetune_model, query_fn or ft_loss, sources[2], "query")
        check_same_dtype(pt, ft)
        run.validate(q, ft, *([pt] if index is None else []))  # an index stands for the pretraining data
        ft_space, pt_space = ParamSpace.of(ft.params, theta + w), ParamSpace.of(pt.params, theta + u)
        theta_dim = ParamSpace.of(pt.params, theta).dim
        run.info.update(mode=mode, alpha=alpha, n_pretrain=len(sources[0]), n_finetune=len(sources[1]),
                        n_query=len(sources[2]), dim_theta=theta_dim, dim_u=pt_space.dim - theta_dim,
                        dim_w=ft_space.dim - theta_dim)

        def finetune_side() -> torch.Tensor:
            """Step 1: ``g_j`` for every query, padded with zeros on U."""
            grads = _gradients(q, ft_space, run)  # [k, θ+W]
            if mode == "fixed":
                g = grads[:, :theta_dim]
                if w:
                    w_space, theta_space = ParamSpace.of(ft.params, w), ParamSpace.of(ft.params, theta)
                    op = run.curvature("finetune", ft, w_space, decide_on=ft_space)
                    a = run.solve("finetune", op, grads[:, theta_dim:])
                    g = g - run.cross("finetune", ft, theta_space, w_space, a)  # H_θW a: no damping off the diagonal
            else:
                shift = torch.zeros(ft_space.dim, device=grads.device, dtype=grads.dtype)
                shift[:theta_dim] = alpha
                g = alpha * run.solve("finetune", run.curvature("finetune", ft, ft_space, shift=shift), grads)[:, :theta_dim]
            return torch.cat([g, g.new_zeros(g.shape[0], pt_space.dim - theta_dim)], 1)

        scores = _solve_and_score(pt, pt_space, finetune_side, run, pretrain_gradients, index)
    run.record_engines()
    run.info["peak_memory_mb"] = peak_memory_mb(pt.device)
    return InfluenceResult(scores, run.info)


def _options(solver_options: Optional[Mapping[str, Any]], curvature_options: Optional[Mapping[str, Any]],
             flat: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The plug-ins' options from their dicts and from flat keywords (``tol=1e-6``), routed by name."""
    solver_flat, curvature_flat = ScoreArguments.split_options(flat)
    return {"solver_options": {**dict(solver_options or {}), **solver_flat},
            "curvature_options": {**dict(curvature_options or {}), **curvature_flat}}


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
    curvature: str = "auto",
    solver: str = "auto",
    solver_options: Optional[Mapping[str, Any]] = None,
    curvature_options: Optional[Mapping[str, Any]] = None,
    hessian_samples: Optional[int] = None,
    chunk_size: Optional[int] = None,
    scoring: str = "auto",
    query_rank: int = 8,
    gradients: str = "auto",
    stream_scores: Optional[bool] = None,
    loss_fn: Optional[LossFn] = None,
    pretrain_loss_fn: Optional[LossFn] = None,
    finetune_loss_fn: Optional[LossFn] = None,
    query_fn: Optional[LossFn] = None,
    progress: bool = False,
    comm: Optional[Communicator] = None,
    store: Optional[ScoreStore] = None,
    pretrain_gradients: Optional[torch.Tensor] = None,
    index: Optional[GradientIndex] = None,
    **options: Any,
) -> InfluenceResult:
    """Multi-stage influence ``S [n_pretrain, n_query]`` with its record (convergence, timings, sizes).

    ``S[i, j] = d f(q_j) / dε`` when pretraining example ``i`` is upweighted by ε and both stages are
    re-optimised: positive = harmful (raises the query loss), negative = helpful. Removing example
    ``i`` changes the query loss by about ``−S[i, j] / n``. Rows and columns are dataset indices.

    The settings are those of ``InfluenceArguments`` (``help(InfluenceArguments)``): ``shared`` (prefix of
    θ), ``mode`` ('fixed' | 'updated'), ``alpha`` (updated mode), ``damping`` λ ≥ 0, ``curvature``,
    ``solver``, ``hessian_samples``, ``chunk_size``, ``scoring``. A solver's or curvature's options go in
    ``solver_options`` / ``curvature_options`` or as plain keywords (``tol=1e-6``, ``max_iter``,
    ``lissa_depth``, ``lissa_scale``, ``lissa_repeats``, ``lissa_batch_size``, ``lissa_seed``,
    ``max_dense_params``, ``rhs_chunk_size``). Losses ``(model, batch) → per-example values [B]``:
    ``loss_fn`` for every stage, or ``pretrain_loss_fn`` / ``finetune_loss_fn`` / ``query_fn``. ``comm``: a
    process group (``lightning_msif.distributed``); ``store``: keeps partial results so a rerun resumes (and,
    with ``stream_scores``, the score blocks, which are then not returned: ``scores`` is None);
    ``pretrain_gradients``: ``[n, dim]`` from ``per_example_gradients``, replacing the scoring pass;
    ``index``: a gradient index from ``capture_gradient_index``, replacing it with one product per block.
    """
    args = InfluenceArguments(shared=shared, mode=mode, alpha=alpha, damping=damping, curvature=curvature,
                              solver=solver, hessian_samples=hessian_samples, chunk_size=chunk_size, scoring=scoring,
                              query_rank=query_rank, gradients=gradients, stream_scores=stream_scores,
                              **_options(solver_options, curvature_options, options))
    if mode == "fixed" and alpha is not None:
        warnings.warn(f"alpha={alpha} is ignored in mode='fixed' (it is the proximal strength of mode='updated').",
                      stacklevel=2)
    loss = loss_fn or cross_entropy_loss
    return multistage_scores(pretrain_model, finetune_model, pretrain_data, finetune_data, query_data, args,
                             pretrain_loss_fn=pretrain_loss_fn or loss, finetune_loss_fn=finetune_loss_fn or loss,
                             query_fn=query_fn, progress=progress, comm=comm, store=store,
                             pretrain_gradients=pretrain_gradients, index=index)


def multistage_influence(*args: Any, **kwargs: Any) -> torch.Tensor:
    return compute_multistage(*args, **kwargs).scores


def compute_single_stage(
    model: nn.Module,
    train_data: Any,
    query_data: Any,
    *,
    damping: float = 0.0,
    curvature: str = "auto",
    solver: str = "auto",
    solver_options: Optional[Mapping[str, Any]] = None,
    curvature_options: Optional[Mapping[str, Any]] = None,
    hessian_samples: Optional[int] = None,
    chunk_size: Optional[int] = None,
    scoring: str = "auto",
    query_rank: int = 8,
    gradients: str = "auto",
    stream_scores: Optional[bool] = None,
    loss_fn: Optional[LossFn] = None,
    query_fn: Optional[LossFn] = None,
    progress: bool = False,
    comm: Optional[Communicator] = None,
    store: Optional[ScoreStore] = None,
    index: Optional[GradientIndex] = None,
    **options: Any,
) -> InfluenceResult:
    """Koh & Liang influence ``S[i, j] = −∇f(q_j)ᵀ (H + λI)⁻¹ ∇ℓ(z_i)``, shape ``[n_train, n_query]``, with its record.

    Same sign convention, settings (those of ``ScoreArguments``) and row/column order as ``compute_multistage``;
    ``index``: a gradient index of ``train_data`` (``capture_gradient_index``) instead of the scoring pass.
    """
    args = ScoreArguments(damping=damping, curvature=curvature, solver=solver, hessian_samples=hessian_samples,
                          chunk_size=chunk_size, scoring=scoring, query_rank=query_rank, gradients=gradients,
                          stream_scores=stream_scores, **_options(solver_options, curvature_options, options))
    run = _Run(args, progress, comm or LocalComm(), store)
    loss = loss_fn or cross_entropy_loss
    train_src, query_src = ExampleSource(train_data, "train_data"), ExampleSource(query_data, "query_data")
    model = in_compute_dtype(model)
    with evaluation(model):
        train = run.objective(model, loss, train_src, "training")
        q = run.objective(model, query_fn or loss, query_src, "query")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise MSIFError("The model has no trainable parameter (requires_grad=True): nothing to differentiate.")
        run.validate(q, *([train] if index is None else []))
        space = ParamSpace.of(train.params, names)
        run.info.update(mode="single", n_pretrain=len(train_src), n_query=len(query_src), dim=space.dim)
        scores = _solve_and_score(train, space, lambda: _gradients(q, space, run), run, index=index)
    run.record_engines()
    run.info["peak_memory_mb"] = peak_memory_mb(train.device)
    return InfluenceResult(scores, run.info)


def single_stage_influence(*args: Any, **kwargs: Any) -> torch.Tensor:
    return compute_single_stage(*args, **kwargs).scores


def _scores_only(wrapper: Callable[..., torch.Tensor], computed: Callable[..., InfluenceResult]) -> None:
    """Give ``wrapper`` the signature and docs of ``computed`` (``help()`` and editors show every keyword)."""
    wrapper.__signature__ = inspect.signature(computed).replace(return_annotation=torch.Tensor)  # type: ignore[attr-defined]
    first, _, rest = (computed.__doc__ or "").partition("\n")
    wrapper.__doc__ = first.replace(" with its record", "").replace(", with its record", "") + "\n" + rest


_scores_only(multistage_influence, compute_multistage)
_scores_only(single_stage_influence, compute_single_stage)
