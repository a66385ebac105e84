"""Per-example gradients of the common layers from module hooks: first order only, any attention kernel.

A forward hook keeps each covered layer's input and where the gradient arrives at its output; one
backward pass of the summed per-example losses, to those outputs only (no parameter's gradient is
formed), then gives every example's gradient of every covered parameter in closed form (examples do
not interact in eval mode):

- ``nn.Linear`` and Hugging Face's ``Conv1D`` (weight ``[in, out]``): ``Σ_t g_t a_tᵀ``, bias ``Σ_t g_t``;
- ``nn.Conv2d`` (zero padding, one group): the same over input patches (one product per kernel row of the
  input unfolded along its width only);
- ``nn.Embedding`` (no ``max_norm``): output gradients added into the rows of the tokens used;
- norm layers' affine parameters (``LayerNorm``, eval-mode ``BatchNorm1d/2d``): ``Σ g ⊙ x̂``, ``Σ g``.

Any other trainable parameter is a *leftover*: its per-example gradients come from one backward
pass per example (exact, slower); ``LayerMap.leftover`` lists them so the run record can say so.
This is what the Kronecker-factored curvatures and the hooks scoring path are built on.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

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
        self.model = model
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

    def on(self, model: nn.Module) -> "LayerMap":
        """The same layers (covered, broadcast, leftover) on ``model``, a module of the same structure: the trained
        module whose steps are hooked, when this map was settled on its compute-dtype copy."""
        if model is self.model:
            return self
        modules = dict(model.named_modules())
        other = copy.copy(self)
        other.model = model
        other.layers = [replace(layer, module=modules[layer.path]) for layer in self.layers]
        other.leftover, other.broadcast = list(self.leftover), set(self.broadcast)
        return other

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
    """One call of a covered layer in a forward pass: its input (as it is: a convolution's is unfolded into patches,
    a norm's normalised, only where needed), where the gradient at its output arrives, and that gradient once
    ``Capture.backward`` ran."""

    inputs: torch.Tensor
    edge: Optional[GradientEdge] = None
    version: int = 0  # of the input when it was kept: an in-place change after that would corrupt the gradients
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
            # the edge, not the tensor: an in-place operation on the output (ReLU(inplace=True)) does not move it
            self.calls.setdefault(layer.path, []).append(Call(x.detach(), get_gradient_edge(output), x._version))
            return output if expand else None

        return forward

    def check(self) -> None:
        """An error when an input kept by a hook was changed in place after the layer used it."""
        if any(call.inputs._version != call.version for calls in self.calls.values() for call in calls):
            raise RuntimeError("The model modified a covered layer's input in place after the layer used it: its "
                               "per-example gradients cannot be formed from hooks.")

    def backward(self, total: torch.Tensor) -> None:
        """The gradient of ``total`` at every captured layer output, and nothing else: the backward pass stops
        there, so no layer's weight-gradient product runs (a plain ``backward`` would form them all)."""
        calls = [call for calls in self.calls.values() for call in calls]
        if not calls or not total.requires_grad:
            return
        self.check()
        grads = torch.autograd.grad(total, [call.edge for call in calls], allow_unused=True)
        for call, grad in zip(calls, grads):
            call.grad = grad


def _normalised(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm's normalised input ``x̂``, formed only where its affine parameters' gradients are wanted."""
    m = layer.module
    dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
    var, mean = torch.var_mean(x, dims, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + m.eps)


def _batch_norm_stats(layer: Layer, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm's per-channel mean and standard deviation: the batch's in a training step (``StepCapture``),
    as its forward used them, else the running ones."""
    m = layer.module
    if not m.training:
        return m.running_mean, torch.sqrt(m.running_var + m.eps)
    rest, count = tuple(range(2, x.dim())), x.numel() // x.shape[1]
    shape = (1, -1) + (1,) * len(rest)
    # two passes, each reducing the contiguous positions first (var_mean over (0, 2, 3) is ~7x slower on CPU)
    mean = (x.sum(rest).sum(0) if rest else x.sum(0)) / count
    d = x - mean.view(shape)
    var = ((d * d).sum(rest).sum(0) if rest else (d * d).sum(0)) / count
    return mean, torch.sqrt(var + m.eps)


class StepCapture(Capture):
    """A ``Capture`` for someone else's backward pass (a training step's): a pre-hook on the node behind each
    covered output keeps the gradient arriving there as that backward runs, so nothing is computed twice."""

    def _hook(self, layer: Layer) -> Callable:
        keep = super()._hook(layer)

        def forward(module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> Any:
            before = len(self.calls.get(layer.path, []))
            result = keep(module, inputs, output)
            calls = self.calls.get(layer.path, [])
            if len(calls) > before:
                call = calls[-1]
                node, nr = call.edge.node, call.edge.output_nr
                call.edge = None  # the node holds the hook, which holds the call: no way back, so no cycle that
                # would keep the step's whole graph (and its saved activations) alive after the step

                def arrived(grads: Tuple[Optional[torch.Tensor], ...]) -> None:
                    call.grad = grads[nr]
                node.register_prehook(arrived)
            return result

        return forward


def covered_grads(capture: Capture, wanted: set) -> Dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` of the ``wanted`` parameters that the capture's layers cover."""
    out: Dict[str, torch.Tensor] = {}
    for layer, calls in iterate_calls(capture):
        if set(layer.names) & wanted:
            out.update({n: g for n, g in example_grads(layer, calls).items() if n in wanted})
    return out


def patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``[B, C·kh·kw, L]``: the input patches of each of the convolution's ``L`` output positions."""
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)


def width_view(conv: nn.Conv2d, x: torch.Tensor, w_out: int) -> torch.Tensor:
    """``[C, kw, H, B, W']`` (a view of ``x`` zero-padded in width): for each kernel column, the input column each
    output column meets there. A patch is ``kh`` of its rows: copying this costs ``1/kh`` of an unfold."""
    kw, dw, sw, pw = conv.kernel_size[1], conv.dilation[1], conv.stride[1], conv.padding[1]
    xw = F.pad(x, (pw, pw)) if pw else x
    s = xw.stride()
    return xw.as_strided((x.shape[1], kw, x.shape[2], x.shape[0], w_out), (s[1], dw * s[3], s[2], s[0], sw * s[3]),
                         xw.storage_offset())


def kernel_rows(conv: nn.Conv2d, h: int, h_out: int) -> List[Tuple[int, int, int]]:
    """For each kernel row: the output rows ``[first, end)`` that meet an input row there, and the first of those
    input rows (the next ones follow at the vertical stride)."""
    kh, dh, sh, ph = conv.kernel_size[0], conv.dilation[0], conv.stride[0], conv.padding[0]
    out = []
    for i in range(kh):
        first = max(0, -((i * dh - ph) // sh))  # ceil((ph - i·dh) / sh)
        end = min(h_out, (h - 1 + ph - i * dh) // sh + 1)
        out.append((first, max(first, end), first * sh + i * dh - ph))
    return out


def conv_weight_grads(conv: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B, *conv.weight.shape]``: each example's weight gradient, ``Σ_p g_p ã_pᵀ``, one batched product per kernel
    row over the width-unfolded input (no full unfold)."""
    b, c, h, _ = x.shape
    out, h_out, w_out = g.shape[1:]
    (kh, kw), sh = conv.kernel_size, conv.stride[0]
    y = width_view(conv, x, w_out).permute(3, 0, 1, 2, 4).reshape(b, c * kw, h, w_out)
    rows = []
    for first, end, r in kernel_rows(conv, h, h_out):
        a = y[:, :, r::sh][:, :, :end - first].reshape(b, c * kw, -1)
        rows.append(torch.bmm(g[:, :, first:end].reshape(b, out, -1), a.transpose(1, 2)))
    return torch.stack(rows, 2).view(b, out, kh, c, kw).transpose(2, 3).reshape(b, out, c, kh, kw)


def token_inputs(layer: Layer, call: Call) -> torch.Tensor:
    """``[B, T, in]``: a Kronecker layer's input at each of its ``T`` positions (a convolution's: patches)."""
    a = call.inputs
    if layer.kind == "conv2d":
        return patches(layer.module, a).transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def token_grads(layer: Layer, call: Call) -> torch.Tensor:
    """``[B, T, out]``: the gradient at a Kronecker layer's output at each of its ``T`` positions."""
    g = call.grad
    assert g is not None
    if layer.kind == "conv2d":
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def tokens(layer: Layer, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a [B, T, in], g [B, T, out])`` of a Kronecker layer (Conv1D and Linear alike; conv over positions)."""
    return token_inputs(layer, call), token_grads(layer, call)


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
        if layer.kind == "conv2d":
            if layer.weight is not None:
                add(layer.weight, conv_weight_grads(m, call.inputs, call.grad))
            add(layer.bias, call.grad.sum((2, 3)))
        elif layer.kind in KRONECKER_KINDS:
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
        elif layer.kind == "layernorm":  # elementwise on the normalised input
            xhat, g = _normalised(layer, call.inputs), call.grad
            lead = tuple(range(1, g.dim() - len(m.normalized_shape)))
            add(layer.weight, (g * xhat).sum(lead) if lead else g * xhat)
            add(layer.bias, g.sum(lead) if lead else g)
        else:  # batchnorm, channel dim 1: Σ g x̂ = (Σ g x − μ Σ g) / σ per channel, x̂ never formed
            x, g = call.inputs, call.grad
            rest = tuple(range(2, g.dim()))
            gx, gs = ((g * x).sum(rest), g.sum(rest)) if rest else (g * x, g)
            mean, std = _batch_norm_stats(layer, x)
            add(layer.weight, (gx - mean * gs) / std)
            add(layer.bias, gs)
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
