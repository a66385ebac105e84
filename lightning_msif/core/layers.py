"""Per-example gradients of the common layers from module hooks: first order only, any attention kernel.

A forward hook keeps each covered layer's input, a hook on its output keeps the gradient arriving
there; one ordinary backward pass of the summed per-example losses then gives every example's
gradient of every covered parameter in closed form (examples do not interact in eval mode):

- ``nn.Linear`` and Hugging Face's ``Conv1D`` (weight ``[in, out]``): ``Σ_t g_t a_tᵀ``, bias ``Σ_t g_t``;
- ``nn.Conv2d`` (zero padding, one group): the same on unfolded input patches;
- ``nn.Embedding`` (no ``max_norm``): output gradients added into the rows of the tokens used;
- norm layers' affine parameters (``LayerNorm``, eval-mode ``BatchNorm1d/2d``): ``Σ g ⊙ x̂``, ``Σ g``.

Any other trainable parameter is a *leftover*: its per-example gradients come from one backward
pass per example (exact, slower); ``LayerMap.leftover`` lists them so the run record can say so.
This is what the Kronecker-factored curvatures and the hooks scoring path are built on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

KRONECKER_KINDS = ("linear", "conv1d", "conv2d")


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d" if module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple) \
            else None
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None else None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None),
                                                                                   torch.Tensor):
        return "conv1d"  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W [in, out]
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return "layernorm"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.affine and module.track_running_stats:
        return "batchnorm"
    return None


@dataclass
class Layer:
    """One covered module and which of its parameters (full names) are in the parameter space."""

    path: str
    module: nn.Module
    kind: str
    weight: Optional[str] = None
    bias: Optional[str] = None

    @property
    def names(self) -> List[str]:
        return [n for n in (self.weight, self.bias) if n is not None]


class LayerMap:
    """The covered layers holding the parameters ``names`` of ``model``, and the parameters no layer covers."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        wanted = set(names)
        self.layers: List[Layer] = []
        covered = set()
        for path, module in model.named_modules():
            kind = _kind(module)
            if kind is None:
                continue
            prefix = f"{path}." if path else ""
            own = {k: f"{prefix}{k}" for k, _ in module.named_parameters(recurse=False)}
            weight = own.get("weight") if own.get("weight") in wanted else None
            bias = own.get("bias") if own.get("bias") in wanted else None
            if weight is None and bias is None:
                continue
            if kind == "embedding" and weight is None:
                continue
            self.layers.append(Layer(path, module, kind, weight, bias))
            covered.update(n for n in (weight, bias) if n is not None)
        self.leftover: List[str] = [n for n in names if n not in covered]
        self.broadcast: set = set()  # layers called without the batch dimension, expanded by the hooks

    def exclude(self, paths: Sequence[str]) -> None:
        """Hand the layers at ``paths`` to the leftovers (e.g. called on inputs shared across the batch)."""
        dropped = [layer for layer in self.layers if layer.path in set(paths)]
        self.layers = [layer for layer in self.layers if layer.path not in set(paths)]
        self.leftover.extend(n for layer in dropped for n in layer.names)

    def settle(self, run: Callable[[], torch.Tensor], batch_size: int) -> None:
        """Find the layers ``run()`` calls without the batch dimension; keep them covered (expanded by the hooks)
        when that leaves ``run()``'s per-example losses unchanged, else hand them to the leftovers."""
        shared = self.shared_calls(run, batch_size)
        if not shared:
            return
        with torch.no_grad():
            plain = run()
            self.broadcast = set(shared)
            try:
                with Capture(self, batch_size):
                    expanded = run()
                same = expanded.shape == plain.shape and torch.allclose(expanded, plain, rtol=1e-6, atol=1e-7)
            except RuntimeError:
                same = False
        if not same:
            self.broadcast = set()
            self.exclude(shared)

    def shared_calls(self, run: Callable[[], Any], batch_size: int) -> List[str]:
        """Paths of covered layers that ``run()`` calls on inputs without the batch dimension (broadcast later,
        e.g. position embeddings of ``[1, T]`` ids): their output gradient sums the examples, so hooks cannot
        separate them."""
        seen: List[str] = []

        def probe(layer: Layer) -> Callable:
            def forward(module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
                x = inputs[0] if inputs else None
                if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] != batch_size):
                    seen.append(layer.path)
            return forward

        handles = [layer.module.register_forward_hook(probe(layer)) for layer in self.layers]
        try:
            with torch.no_grad():
                run()
        finally:
            for h in handles:
                h.remove()
        return sorted(set(seen))


@dataclass
class Call:
    """One call of a covered layer in a forward pass: its (transformed) input and the gradient at its output."""

    inputs: torch.Tensor
    grad: Optional[torch.Tensor] = None


@dataclass
class Capture:
    """Forward/gradient hooks on the covered layers for the duration of a ``with`` block.

    A layer in ``layers.broadcast`` is called on an input without the batch dimension (position ids ``[1, T]``)
    and its output broadcast over the batch later: its hook hands on the output expanded to ``batch_size``
    (the same values), so the gradient arriving there is per example.
    """

    layers: LayerMap
    batch_size: Optional[int] = None
    calls: Dict[str, List[Call]] = field(default_factory=dict)
    _handles: List[Any] = field(default_factory=list)

    def __enter__(self) -> "Capture":
        for layer in self.layers.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: Layer) -> Callable:
        def forward(module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                return None
            x = inputs[0]
            expand = layer.path in self.layers.broadcast and self.batch_size is not None and output.shape[0] == 1
            if expand:
                output = output.expand(self.batch_size, *output.shape[1:])
                x = x.expand(self.batch_size, *x.shape[1:])
            if not output.requires_grad:
                return output if expand else None
            call = Call(_saved_input(layer, x))
            self.calls.setdefault(layer.path, []).append(call)

            def keep(grad: torch.Tensor, call: Call = call) -> None:
                call.grad = grad.detach()

            output.register_hook(keep)
            return output if expand else None

        return forward


def _saved_input(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """What the per-example gradient needs from the layer's input (norms: the normalised input)."""
    m = layer.module
    x = x.detach()
    if layer.kind == "conv2d":
        return F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # [B, C·k·k, L]
    if layer.kind == "layernorm":
        dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + m.eps)
    if layer.kind == "batchnorm":
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
    return x


def tokens(layer: Layer, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a [B, T, in], g [B, T, out])`` of a Kronecker layer (Conv1D and Linear alike; conv over positions)."""
    a, g = call.inputs, call.grad
    assert g is not None
    if layer.kind == "conv2d":
        return a.transpose(1, 2), g.flatten(2).transpose(1, 2)
    b = a.shape[0]
    return a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])


def example_grads(layer: Layer, calls: Sequence[Call]) -> Dict[str, torch.Tensor]:
    """``{param name: [B, *param.shape]}``: each example's gradient, summed over the layer's calls."""
    out: Dict[str, torch.Tensor] = {}

    def add(name: Optional[str], value: torch.Tensor) -> None:
        if name is not None:
            out[name] = value if name not in out else out[name] + value

    m = layer.module
    for call in calls:
        if call.grad is None:
            continue
        if layer.kind in KRONECKER_KINDS:
            a, g = tokens(layer, call)
            if layer.weight is not None:
                w = torch.bmm(g.transpose(1, 2), a)  # [B, out, in]
                if layer.kind == "conv1d":
                    w = w.transpose(1, 2)
                add(layer.weight, w.reshape(w.shape[0], *m.weight.shape))
            add(layer.bias, g.sum(1))
        elif layer.kind == "embedding":
            idx, g = call.inputs, call.grad
            b, d = idx.shape[0], g.shape[-1]
            flat_idx, flat_g = idx.reshape(b, -1), g.reshape(b, -1, d)
            w = torch.zeros(b, m.num_embeddings, d, device=g.device, dtype=g.dtype)
            w.scatter_add_(1, flat_idx.unsqueeze(-1).expand(-1, -1, d), flat_g)
            if m.padding_idx is not None:
                w[:, m.padding_idx] = 0
            add(layer.weight, w)
        else:  # norm affine: elementwise on the normalised input
            xhat, g = call.inputs, call.grad
            if layer.kind == "layernorm":
                lead = tuple(range(1, g.dim() - len(m.normalized_shape)))
                add(layer.weight, (g * xhat).sum(lead) if lead else g * xhat)
                add(layer.bias, g.sum(lead) if lead else g)
            else:  # batchnorm: channel dim 1
                rest = tuple(range(2, g.dim()))
                add(layer.weight, (g * xhat).sum(rest) if rest else g * xhat)
                add(layer.bias, g.sum(rest) if rest else g)
    return out


def leftover_grads(loss_of: Callable[[Any], torch.Tensor], params: Dict[str, torch.Tensor],
                   batch_size: int, slice_batch: Callable[[int], Any]) -> Dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` for parameters no hook covers: one backward pass per example (exact)."""
    names = list(params)
    rows: List[Tuple[torch.Tensor, ...]] = []
    for i in range(batch_size):
        loss = loss_of(slice_batch(i)).sum()
        rows.append(torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True))
    return {n: torch.stack([r[j] if r[j] is not None else torch.zeros_like(params[n]) for r in rows])
            for j, n in enumerate(names)}


def iterate_calls(capture: Capture) -> Iterator[Tuple[Layer, List[Call]]]:
    """Every covered layer with the calls it received in the last forward pass (possibly none)."""
    for layer in capture.layers.layers:
        yield layer, capture.calls.get(layer.path, [])
