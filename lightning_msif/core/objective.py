"""A model, a per-example loss and the examples it averages over, made functional.

Everything the formulas need from one stage lives here: per-example losses at substituted
parameters (``torch.func.functional_call``), per-example gradients (``vmap(grad)``), directional
derivatives (``jvp``) and Hessian-vector products (reverse-over-reverse) summed over a sharded set
of examples. Memory is bounded by ``chunk_size`` examples × parameters at any time (for ``jvp``
scoring: ``chunk_size`` example–query pairs × activations).
"""
from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import MSIFError
from .comm import Communicator, LocalComm, shard_range
from .data import ExampleSource, batch_size_of, slice_batch, to_device
from .layers import Capture, LayerMap, covered_grads, leftover_grads
from .params import Params, ParamSpace, detached_params
from .task import ClassificationTask, Task

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``(model, batch) -> per-example losses of shape [batch size]``."""

# Per-example gradient chunks are sized to stay under this many bytes when chunk_size is not given.
_CHUNK_BYTES = 256 * 2**20


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Default per-example loss: cross-entropy of the logits against the labels, for ``(x, y, ...)`` batches
    (``model(x)``) and dict batches with ``labels`` (``model(**inputs)``, its ``.logits`` if it has them)."""
    return ClassificationTask()(model, batch)


class _Bound(nn.Module):
    """``model`` and a function of it and a batch (the loss, or a task's outputs) as one module, so
    ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


_AUTOCAST_AVAILABLE = getattr(torch.amp, "is_autocast_available", lambda device: device in ("cpu", "cuda"))  # torch<2.4


@contextmanager
def full_precision(*models: nn.Module) -> Iterator[None]:
    """Autograd on even inside ``inference_mode``, autocast off on the models' devices (an enclosing mixed-precision
    region would otherwise compute in bfloat16/float16 what should run in the models' dtype)."""
    with torch.inference_mode(False), torch.enable_grad(), ExitStack() as stack:
        for device in sorted({p.device.type for m in models for p in m.parameters()}):
            if _AUTOCAST_AVAILABLE(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


@contextmanager
def evaluation(*models: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm/Dropout frozen) in ``full_precision``; the modes restored after."""
    states = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with full_precision(*models):
            yield
    finally:
        for m, s in zip(models, states):
            m.train(s)


LOW_PRECISION = (torch.float16, torch.bfloat16)
_AUTODIFF_OP = re.compile(r"forward AD with (\w+)|derivative for '(\w+)'")


def precision_cause(dtype: torch.dtype) -> str:
    """For a float16/bfloat16 model, the sentence that names its precision as the cause and the fix; else ''."""
    if dtype not in LOW_PRECISION:
        return ""
    return (f"The model is {str(dtype).replace('torch.', '')}: about 3 significant digits cannot hold its curvature, "
            "so precision, not damping, is the cause. Cast the model (its data follows) to float32 or float64 for the "
            "influence computation, e.g. model.float() (model.double() for the most accurate scores).")


def autodiff_refusal(err: NotImplementedError, model: nn.Module, what: str, instead: str) -> Optional[MSIFError]:
    """The error of ``what`` (a curvature, a scoring) meeting a layer of ``model`` that lacks the automatic
    differentiation it needs (e.g. ``nn.EmbeddingBag`` has no forward mode): the layer, and ``instead``, what works.
    None when ``err`` is not PyTorch's missing-derivative error (then it is re-raised as it is)."""
    text = str(err)
    found = _AUTODIFF_OP.search(text)
    if found is None:
        return None
    op = next(g for g in found.groups() if g)
    kind = op.strip("_").replace("_backward", "").replace("_", "")  # _embedding_bag_backward → embeddingbag
    layers = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
              if kind and name and type(m).__name__.lower() == kind]
    mode = "forward-mode differentiation (jvp)" if "forward AD" in text else "second-order differentiation"
    culprit = ", ".join(layers[:3]) or f"an operation of the model ({op})"
    return MSIFError(f"{what} needs {mode} through every layer, but {culprit} does not support it in this PyTorch. "
                     f"Use {instead}, or replace the layer with one that supports it (e.g. nn.EmbeddingBag by "
                     "nn.Embedding and a mean).")


def _one_dtype(params: Params, role: str) -> torch.dtype:
    """The one floating dtype of a model's parameters (every flat vector and solve is in it)."""
    floating = {str(p.dtype): p.dtype for p in params.values() if p.is_floating_point()}
    if len(floating) > 1:
        raise MSIFError(f"The {role} model's parameters mix dtypes {sorted(floating)}: influence needs one. Cast "
                        "the model, e.g. model.double() or model.float(), before passing it.")
    return next(iter(floating.values()), next(iter(params.values())).dtype)


def _batch_dims(batch: Any) -> Any:
    return tree_map(lambda t: 0 if isinstance(t, torch.Tensor) and t.dim() > 0 else None, batch)


class Objective:
    """Mean per-example loss of ``model`` over ``source``, as functions of chosen parameters."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        source: ExampleSource,
        role: str,
        comm: Optional[Communicator] = None,
        chunk_size: Optional[int] = None,
        task: Optional[Task] = None,
        gradients: str = "auto",
    ):
        self.bound = _Bound(model, loss_fn)
        self.task: Task = task or ClassificationTask()  # outputs and labels, for Gauss-Newton / Fisher curvatures
        self.params: Params = detached_params(model)
        if not self.params:
            raise MSIFError(f"The {role} model has no trainable parameter (it has no parameters at all): "
                            "pass the nn.Module whose influence you want.")
        first = next(iter(self.params.values()))
        self.device, self.dtype = first.device, _one_dtype(self.params, role)
        self.source = source
        self.role = role
        self.comm = comm or LocalComm()
        self.chunk_size = chunk_size
        self._checked = False
        self.engine = gradients  # per-example gradients: "func" (torch.func) | "hooks" (module hooks) | "auto"
        self.engine_note = ""  # why "auto" settled where it did (for the run record)
        self._layer_maps: Dict[Tuple[str, ...], LayerMap] = {}
        self.watch: Optional[Any] = None  # a PassProgress shown for every sharded pass without its own progress

    # -- losses -------------------------------------------------------------------------------
    def losses(self, params: Params, batch: Any) -> torch.Tensor:
        """Per-example losses with ``params`` substituted (others: the model's own, as constants)."""
        full = {"model." + k: v for k, v in {**self.params, **params}.items()}
        return functional_call(self.bound, full, (batch,))

    def outputs(self, params: Params, batch: Any) -> torch.Tensor:
        """The task's model outputs (logits) with ``params`` substituted."""
        full = {"model." + k: v for k, v in {**self.params, **params}.items()}
        return functional_call(_Bound(self.bound.model, self.task.outputs), full, (batch,))

    def _uniforms(self, idx: torch.Tensor, per: int, seed: int) -> torch.Tensor:
        return torch.stack([torch.rand(per, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)),
                                       dtype=torch.float64) for i in idx])

    def sampled_losses(self, params: Params, batch: Any, idx: torch.Tensor, seed: int) -> torch.Tensor:
        """Per-example losses of the task at labels drawn from the model's own outputs, in one forward pass: the
        gradients of the true Fisher. Each example's draw depends only on ``seed`` and its dataset index."""
        out = self.outputs(params, batch)
        labels = self.task.sample_labels(out.detach(), batch, self._uniforms(idx, out[0, ..., 0].numel(), seed))
        return self.task.output_loss(out, batch, labels=labels)

    @torch.no_grad()
    def relabelled(self, batch: Any, idx: torch.Tensor, seed: int) -> Any:
        """``batch`` with labels drawn from the model's own predictive distribution (the true Fisher's data).

        Each example's draw depends only on ``seed`` and its dataset index: not on batching or processes.
        """
        out = self.outputs({}, batch)
        return self.task.with_labels(batch, self.task.sample_labels(out, batch, self._uniforms(idx, out[0, ..., 0].numel(),
                                                                                                seed)))

    def _check(self, batch: Any, idx: torch.Tensor) -> None:
        """Once per objective: the first batch passes ``check_batch``."""
        if not self._checked:
            self.check_batch(batch, idx)
            self._checked = True

    def check_batch(self, batch: Any, idx: torch.Tensor) -> None:
        """The examples of a device batch are finite, the model takes them, and their losses are one finite
        value per example; else an error naming their dataset indices ``idx``."""
        for t in tree_flatten(batch)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0:
                self.assert_finite(t, "input data", idx)
        with torch.no_grad():
            try:
                out = self.losses({}, batch)
            except MSIFError:
                raise
            except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as err:
                raise self._untakeable(batch, idx, err) from err
        b = batch_size_of(batch)
        if not isinstance(out, torch.Tensor) or out.shape != (b,):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise MSIFError(
                f"The {self.role} loss must return one loss per example (shape [{b}] for this batch) but "
                f"returned {shape}. Use reduction='none', e.g. "
                "F.cross_entropy(model(x), y, reduction='none'). A Hugging Face model's output .loss is the batch "
                "mean: take the per-example losses from its .logits, e.g. F.cross_entropy(out.logits, "
                "batch['labels'], reduction='none'), or drop per_example_loss/loss_fn to get exactly that for "
                "dict batches with 'labels'."
            )
        self.assert_finite(out, "losses", idx)

    def _untakeable(self, batch: Any, idx: torch.Tensor, err: BaseException) -> MSIFError:
        """The error of a batch the model or loss fails on: its examples tried one by one, the failing ones named."""
        failing = []
        with torch.no_grad():
            for i in range(batch_size_of(batch)):
                try:
                    self.losses({}, slice_batch(batch, i, i + 1))
                except Exception:  # any failure of this example alone marks it
                    failing.append(int(idx[i]))
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__
        if failing and len(failing) < len(idx):
            where = (f"at dataset indices {failing[:5]} ({reason}). The other examples of their batch work, so the "
                     "data is the problem: a label outside the model's outputs, or an input unlike the others")
        else:
            where = (f"at dataset indices {idx[:5].tolist()}, every one of their batch ({reason}). The data does not "
                     "fit the model: inputs of another shape or dtype than it was built for, or labels outside its "
                     "outputs")
        return MSIFError(f"The {self.role} model and loss fail on the {self.source.name} examples {where}. Fix or "
                         "drop those examples, or pass the data (or the model) this computation is meant for.")

    def validate(self, progress: Optional[Any] = None) -> None:
        """Every example of this rank's share through ``check_batch``, one forward pass without gradients, so bad
        data is named by its dataset index before any gradient, curvature or solve. Ranks agree on the outcome: a
        rank with good data raises too (no rank is left waiting in a collective)."""
        error: Optional[MSIFError] = None
        self._checked = True  # every batch is checked here
        try:
            for batch, idx in self.batches(range(len(self.source)), progress):
                self.check_batch(batch, idx)
        except MSIFError as err:
            error = err
        failed = self.comm.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], device=self.device))
        if error is not None:
            raise error
        if float(failed.sum()) > 0:
            raise MSIFError(f"Another process found bad {self.source.name} examples (its message names them).")

    def assert_finite(self, t: torch.Tensor, what: str, idx: torch.Tensor) -> None:
        """``t`` (one row per example of ``idx``) is finite; else an error naming the examples, and whether the
        weights or the data are to blame."""
        bad = ~torch.isfinite(t)
        if bad.any():
            rows = bad.reshape(bad.shape[0], -1).any(dim=1) if t.dim() else bad.reshape(1)
            where = idx[rows.cpu()][:5].tolist() if t.dim() else idx[:5].tolist()
            raise MSIFError(f"NaN/inf in the {self.role} {what} at dataset indices {where}. {self._blame(what)}")

    def _blame(self, what: str) -> str:
        """What to check after non-finite values: the weights where they are not finite, else the data."""
        broken = [n for n, p in self.params.items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if broken:
            return (f"The model's weights hold NaN/inf ({broken[:3]}): a diverged training run; retrain or load "
                    "finite weights.")
        if what == "input data":
            overflow = f" (or too large for the model's {self.dtype}, which they are cast to)" if (
                self.dtype in LOW_PRECISION) else ""
            return f"The data is the problem{overflow}: fix or drop those examples of {self.source.name}."
        return (f"The model's weights are finite, so the data is the problem: fix or drop those examples of "
                f"{self.source.name} (an extreme input, log(0), a division by zero in the loss on them).")

    def curvature_refusal(self, what: str) -> MSIFError:
        """The error of a non-finite curvature product (``what``) on data whose losses were finite."""
        cause = precision_cause(self.dtype) or (
            "The examples and their losses are finite, so the curvature is not: check the loss for points without "
            "a second derivative and the weights for a diverged run (damping cannot repair NaN/inf).")
        return MSIFError(f"NaN/inf in {what} of the {self.role} loss. {cause}")

    def batches(self, indices: Sequence[int], progress: Optional[Any] = None, shard: bool = True,
                batch_size: Optional[int] = None) -> Iterator[tuple]:
        """Device batches of ``indices`` (this rank's contiguous share when ``shard``), with their indices.

        A sharded pass without a ``progress`` of its own advances ``watch`` when one is set (a pass of a phase)."""
        mine = indices
        if shard:
            mine = [indices[i] for i in shard_range(len(indices), self.comm.rank, self.comm.world_size)]
            if progress is None and self.watch is not None:
                progress = self.watch
                progress.start_pass(len(mine))
        for batch, idx in self.source.batches(mine, batch_size):
            batch = to_device(batch, self.device, self.dtype)
            self._check(batch, idx)
            yield batch, idx
            if progress is not None:
                progress.update(len(idx))

    def itemsize_per_column(self, space: ParamSpace, batch_size: Optional[int] = None) -> int:
        """Bytes one vectorised Hessian-vector column holds: its tangent and result over ``space``, and the
        activations of a batch of ``batch_size`` (default: the data's) three times over."""
        return 2 * space.dim * self.dtype.itemsize + self.activation_bytes(batch_size)

    def activation_bytes(self, batch_size: Optional[int] = None) -> int:
        """Three times (forward, tangents, backward) the activations of a batch of ``batch_size`` (default: the
        data's); the activations of one example are measured once, on the first."""
        if not hasattr(self, "_activation_numel"):
            numel = [0]
            hooks = [m.register_forward_hook(lambda m, i, o: numel.__setitem__(0, numel[0] + (
                o.numel() if isinstance(o, torch.Tensor) else 0))) for m in self.bound.model.modules()]
            try:
                batch, _ = next(self.source.batches([0]))
                with torch.no_grad():
                    self.losses({}, to_device(batch, self.device, self.dtype))
            finally:
                for h in hooks:
                    h.remove()
            self._activation_numel = numel[0]
        return 3 * self._activation_numel * (batch_size or self.source.batch_size) * self.dtype.itemsize

    def chunk_for(self, space: ParamSpace) -> int:
        """Examples per vectorised gradient chunk: ``chunk_size``, or as many as fit in ``_CHUNK_BYTES``."""
        if self.chunk_size:
            return self.chunk_size
        return max(1, _CHUNK_BYTES // (max(1, space.dim) * self.dtype.itemsize))

    # -- first order ----------------------------------------------------------------------------
    def _func_grads(self, space: ParamSpace, batch: Any) -> Params:
        """``{name: [B, *shape]}``: each example's loss gradient w.r.t. ``space`` (``vmap(grad)``)."""
        base = {n: self.params[n] for n in space.names}

        def one(p: Params, example: Any) -> torch.Tensor:
            return self.losses(p, tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)).sum()

        return vmap(grad(one), in_dims=(None, _batch_dims(batch)))(base, batch)

    def layer_map(self, space: ParamSpace) -> LayerMap:
        """Which of ``space``'s parameters module hooks cover (cached per space), checked on the first batch."""
        if space.names not in self._layer_maps:
            lmap = LayerMap(self.bound.model, space.names)
            batch, _ = next(self.source.batches([0, 1][: len(self.source)]))
            batch = to_device(batch, self.device, self.dtype)
            lmap.settle(lambda: self.losses({}, batch), batch_size_of(batch))
            self._layer_maps[space.names] = lmap
        return self._layer_maps[space.names]

    def hooked_backward(self, space: ParamSpace, batch: Any, loss_of: Optional[Callable[[Params, Any], torch.Tensor]] = None,
                        weights: Optional[torch.Tensor] = None) -> Tuple[Capture, Params]:
        """One backward pass of ``Σ_b w_b ℓ_b`` to the outputs of the covered layers of ``space`` (hooked).

        Returns the capture (each covered layer's inputs and output gradients) and the leaf parameters
        (requiring grad) that were substituted, e.g. for the leftovers' per-example pass.
        """
        lmap = self.layer_map(space)
        leaves = {n: self.params[n].detach().clone().requires_grad_(True) for n in space.names}
        loss_of = loss_of or self.losses
        capture = Capture(lmap, batch_size_of(batch))
        with capture, torch.enable_grad():
            losses = loss_of(leaves, batch)
            total = (losses * weights).sum() if weights is not None else losses.sum()
            capture.backward(total)
        return capture, leaves

    def hooked_grads(self, space: ParamSpace, batch: Any, wanted: Optional[Sequence[str]] = None,
                     loss_of: Optional[Callable[[Params, Any, Optional[torch.Tensor]], torch.Tensor]] = None,
                     idx: Optional[torch.Tensor] = None) -> Tuple[Capture, Params]:
        """One hooked backward pass, and ``{name: [B, *shape]}`` for the ``wanted`` parameters (default: all of
        ``space``): covered layers' from the hooks, leftovers by one backward pass per example, zeros where this
        batch's graph does not reach. ``loss_of(params, batch, idx)`` (default: the losses) may use the examples'
        dataset indices ``idx`` (e.g. labels drawn per example)."""
        loss_of = loss_of or (lambda p, b, _: self.losses(p, b))
        capture, leaves = self.hooked_backward(space, batch, lambda p, b: loss_of(p, b, idx))
        wanted = set(space.names if wanted is None else wanted)
        out: Params = covered_grads(capture, wanted)
        b = batch_size_of(batch)
        left = [n for n in capture.layers.leftover if n in wanted]
        if left:
            with torch.enable_grad():
                out.update(leftover_grads(lambda one: loss_of(leaves, *one), {n: leaves[n] for n in left}, b,
                                          lambda i: (slice_batch(batch, i, i + 1),
                                                     idx[i:i + 1] if idx is not None else None)))
        for n in wanted:
            out.setdefault(n, self.params[n].new_zeros(b, *self.params[n].shape))
        return capture, out

    def _use_hooks(self, err: BaseException) -> None:
        self.engine = "hooks"
        self.engine_note = f"module hooks (torch.func failed on this model: {type(err).__name__}: {str(err).splitlines()[0][:160]})"

    def _example_grads(self, space: ParamSpace, batch: Any) -> Params:
        """``{name: [B, *shape]}``: each example's loss gradient w.r.t. ``space``, by the chosen engine."""
        if self.engine == "hooks":
            return self.hooked_grads(space, batch)[1]
        try:
            out = self._func_grads(space, batch)
        except MSIFError:
            raise
        except (RuntimeError, NotImplementedError) as err:
            if self.engine != "auto":
                raise
            self._use_hooks(err)
            return self.hooked_grads(space, batch)[1]
        if self.engine == "auto":
            self.engine, self.engine_note = "func", "torch.func (vmap of grad)"
        return out

    def per_example_grads(self, space: ParamSpace, batch: Any) -> torch.Tensor:
        """``[B, space.dim]``: gradient of each example's loss w.r.t. ``space`` (``vmap(grad)``)."""
        return space.flatten(self._example_grads(space, batch))

    def directional(self, space: ParamSpace, vectors: torch.Tensor, batch: Any,
                    chunk: Optional[int] = None) -> torch.Tensor:
        """``[B, k]``: derivative of each example's loss along each of ``vectors`` ``[k, dim]`` (``jvp``).

        The ``k`` tangents go through one forward-mode pass, vectorised (``vmap``) ``chunk`` at a time.
        """
        base = {n: self.params[n] for n in space.names}

        def loss(p: Params) -> torch.Tensor:
            return self.losses(p, batch)

        def along(v: torch.Tensor) -> torch.Tensor:
            return jvp(loss, (base,), (space.unflatten(v),))[1]

        return vmap(along, chunk_size=chunk)(vectors).T

    def example_grad_dots(self, space: ParamSpace, vectors: torch.Tensor, batch: Any) -> torch.Tensor:
        """``[B, k]``: per-example gradients contracted with ``vectors`` parameter by parameter (no flat copy)."""
        grads = self._example_grads(space, batch)
        out: Optional[torch.Tensor] = None
        for name, v in zip(space.names, torch.split(vectors, space.numels, dim=1)):
            g = grads[name]
            part = g.reshape(g.shape[0], -1) @ v.T
            out = part if out is None else out.add_(part)
        assert out is not None
        return out

    def dot_grads(self, space: ParamSpace, vectors: torch.Tensor, batch: Any, method: str) -> torch.Tensor:
        """``[B, k]``: ``∇ℓ(z_b) · vectors[j]`` for every example, bounded in memory.

        ``grad`` materialises at most ``chunk`` examples' gradients at a time (chunk × dim numbers);
        ``jvp`` pushes at most ``chunk`` (example, query) pairs through one vectorised forward pass.
        """
        b, c, k = batch_size_of(batch), self.chunk_for(space), vectors.shape[0]
        if k == 0 or space.dim == 0:
            return vectors.new_zeros(b, k)
        out = []
        for start in range(0, b, c):
            sub = slice_batch(batch, start, start + c)
            if method == "jvp" and self.engine != "hooks":
                try:
                    out.append(self.directional(space, vectors, sub, chunk=max(1, c // min(c, b - start))))
                    continue
                except (RuntimeError, NotImplementedError) as err:  # forward mode unsupported: hooks instead
                    if self.engine == "func":
                        refusal = isinstance(err, NotImplementedError) and autodiff_refusal(
                            err, self.bound.model, "scoring='jvp' with gradients='func'",
                            "scoring='grad', or gradients='auto' (module hooks where torch.func fails)")
                        if refusal:
                            raise refusal from err
                        raise
                    self._use_hooks(err)
            out.append(self.example_grad_dots(space, vectors, sub))
        return torch.cat(out)

    def gradients(self, space: ParamSpace, progress: Optional[Any] = None) -> torch.Tensor:
        """``[n, dim]``: per-example gradients of every example of the source (for the few queries)."""
        rows, idxs = [], []
        for batch, idx in self.batches(range(len(self.source)), progress):
            b, c = batch_size_of(batch), self.chunk_for(space)
            for start in range(0, b, c):
                rows.append(self.per_example_grads(space, slice_batch(batch, start, start + c)))
            idxs.append(idx)
        local = torch.cat(rows) if rows else torch.zeros(0, space.dim, device=self.device, dtype=self.dtype)
        self.assert_finite(local, "gradients", torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.long))
        return self.comm.all_gather_rows(local)

    # -- second order ---------------------------------------------------------------------------
    def hessian_pullbacks(self, space: ParamSpace, indices: Sequence[int],
                          batch_size: Optional[int] = None) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Per batch of this rank's share of ``indices``: ``v ↦ H_batch v`` for the batch's summed loss (``[dim] →
        [dim]``, vmappable). The gradient's graph is built once per batch; each call differentiates it again."""
        base = {n: self.params[n] for n in space.names}
        for batch, _ in self.batches(indices, batch_size=batch_size):
            _, pullback = vjp(grad(lambda p, batch=batch: self.losses(p, batch).sum()), base)
            yield lambda v, pullback=pullback: space.flatten(pullback(space.unflatten(v))[0])

    def hvp(self, space: ParamSpace, vectors: torch.Tensor, indices: Sequence[int], rhs_chunk: Optional[int],
            batch_size: Optional[int] = None,
            pullbacks: Optional[Sequence[Callable[[torch.Tensor], torch.Tensor]]] = None) -> torch.Tensor:
        """``[k, dim]``: Hessian of the mean loss over ``indices`` times each row of ``vectors``.

        Reverse-over-reverse (``H v = vᵀ H``, H symmetric), ``rhs_chunk`` vectors at a time under ``vmap``, over
        batches of ``batch_size`` examples; on small models about twice as fast as forward-over-reverse, which
        pushes a tangent forward pass per vector. ``pullbacks``: ``hessian_pullbacks``' output kept from an earlier
        product (iterative solves), else built here.
        """
        total = torch.zeros_like(vectors)
        for pullback in self.hessian_pullbacks(space, indices, batch_size) if pullbacks is None else pullbacks:
            total += vmap(pullback, chunk_size=rhs_chunk)(vectors)
        total = self.comm.all_reduce_sum(total) / len(indices)
        if not torch.isfinite(total).all():
            raise self.curvature_refusal("a Hessian-vector product")
        return total



def module_loss(module: nn.Module, loss_fn: Optional[LossFn] = None) -> LossFn:
    """The per-example loss of a module: its ``per_example_loss(batch)``, else ``loss_fn``, else cross-entropy."""
    if callable(getattr(module, "per_example_loss", None)):
        return lambda m, batch: m.per_example_loss(batch)
    if loss_fn is not None:
        return loss_fn

    def default(m: nn.Module, batch: Any) -> torch.Tensor:
        labelled = isinstance(batch, (tuple, list)) and len(batch) >= 2 or isinstance(batch, dict) and "labels" in batch
        if not labelled:
            raise MSIFError(
                f"{type(module).__name__} gives no per-example loss for batches of type {type(batch).__name__}. "
                "Give one of: (1) a method `per_example_loss(self, batch) -> Tensor[B]` on the module; "
                "(2) `loss_fn=lambda model, batch: ...` (per-example losses, shape [B]) to the callback; "
                "(3) (x, y) batches, for the default cross-entropy of model(x) against y, or dict batches with "
                "'labels' (Hugging Face style), for the cross-entropy of model(**inputs).logits against them."
            )
        return cross_entropy_loss(m, batch)

    return default
