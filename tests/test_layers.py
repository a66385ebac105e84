"""Per-example gradients from module hooks equal ``torch.func``'s (``vmap(grad)``) on every covered layer kind,
leftover parameters included; and the influence engine falls back to hooks where torch.func cannot run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_msif.core.data import ExampleSource
from lightning_msif.core.layers import LayerMap
from lightning_msif.core.objective import Objective
from lightning_msif.core.params import ParamSpace

pytestmark = pytest.mark.usefixtures("single_thread")


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D`` (``y = x @ W + b``, ``W`` of shape ``[in, out]``), as transformers defines it."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class Everything(nn.Module):
    """Conv2d + BatchNorm2d (eval) on an image, Embedding + LayerNorm + Conv1D on tokens, a bare parameter, a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.mix = Conv1D(4, 4)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 0.7, 1.1]))  # a leftover: no hook covers it
        self.head = nn.Linear(3 + 4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn(self.conv(image)), inplace=True).mean((2, 3))
        t = self.mix(self.norm(self.embed(ids))) * self.scale
        return self.head(torch.cat([a, torch.tanh(t).mean(1)], 1))


def _data(n: int = 9) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (n, 5), generator=g)
    return TensorDataset(torch.randn(n, 2, 5, 5, generator=g), ids, torch.randint(0, 3, (n,), generator=g))


def _loss(model: nn.Module, batch) -> torch.Tensor:
    image, ids, y = batch
    return F.cross_entropy(model(image, ids), y, reduction="none")


def _assert_hooks_equal_func(model: nn.Module, loss, loader: DataLoader, names) -> None:
    """Per-example gradients over ``names`` from module hooks equal torch.func's (float64), and are not all zero."""
    func = Objective(model, loss, ExampleSource(loader, "data"), "training", gradients="func")
    hooks = Objective(model, loss, ExampleSource(loader, "data"), "training", gradients="hooks")
    space = ParamSpace.of(func.params, names)
    want = func.gradients(space)
    assert want.abs().max() > 0
    torch.testing.assert_close(hooks.gradients(space), want, rtol=1e-10, atol=1e-12)


def test_hooks_equal_torch_func_on_every_layer_kind():
    torch.manual_seed(0)
    model = Everything().double().eval()
    loader = DataLoader(_data(), batch_size=4)
    names = [n for n, _ in model.named_parameters()]
    lmap = LayerMap(model, names)
    kinds = {"conv2d", "batchnorm", "embedding", "layernorm", "conv1d", "linear"}
    assert {layer.kind for layer in lmap.layers} == kinds
    assert lmap.leftover == ["scale"]
    _assert_hooks_equal_func(model, _loss, loader, names)
    _assert_hooks_equal_func(model, _loss, loader, [n for n in names if not n.startswith("conv")])  # some layers


class NoVmap(nn.Module):
    """A model torch.func cannot vmap: data-dependent Python control flow (as Hugging Face's mask handling)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if bool((x.abs().sum() > 0).item()):  # .item() inside vmap raises
            h = h * 1.0
        return self.head(h)


def test_auto_falls_back_to_hooks_and_says_so():
    torch.manual_seed(0)
    model = NoVmap().double()
    data = TensorDataset(torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    strict = Objective(model, loss, ExampleSource(data, "data"), "training", gradients="func")
    with pytest.raises(RuntimeError):
        strict.gradients(ParamSpace.of(strict.params, names))
    auto = Objective(model, loss, ExampleSource(data, "data"), "training")
    g = auto.gradients(ParamSpace.of(auto.params, names))
    assert auto.engine == "hooks" and "module hooks" in auto.engine_note
    ref = torch.stack([torch.cat([p.reshape(-1) for p in torch.autograd.grad(
        F.cross_entropy(model(data[i][0][None]), data[i][1][None]), list(model.parameters()))]) for i in range(10)])
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


class PositionEmbedded(nn.Module):
    """Token plus position embeddings, the positions' ids ``[1, T]`` shared by the batch (as Hugging Face does)."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(6, 4)
        self.positions = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).unsqueeze(0)  # [1, T]
        return self.head(torch.tanh(self.tokens(ids) + self.positions(pos)).mean(1))


def test_a_layer_called_on_batch_less_inputs_stays_exact():
    """Its output gradient sums the batch; the hooks hand on the output expanded to the batch instead, so each
    example's gradient is exact without a per-example loop."""
    torch.manual_seed(0)
    model = PositionEmbedded().double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(0, 6, (7, 5), generator=g), torch.randint(0, 2, (7,), generator=g))
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    hooks = Objective(model, loss, ExampleSource(DataLoader(data, batch_size=3), "data"), "training", gradients="hooks")
    space = ParamSpace.of(hooks.params, names)
    got = hooks.gradients(space)
    lmap = hooks.layer_map(space)
    assert lmap.broadcast == {"positions"} and lmap.leftover == []
    func = Objective(model, loss, ExampleSource(data, "data"), "training", gradients="func")
    torch.testing.assert_close(got, func.gradients(space), rtol=1e-10, atol=1e-12)


class Convs(nn.Module):
    """Convolutions with every geometry the hooks handle: rectangular kernels, strides, dilations, paddings, no bias."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False)
        self.c3 = nn.Conv2d(4, 5, 3, stride=2, padding=3, dilation=3)
        self.c4 = nn.Conv2d(5, 3, 1, stride=(2, 1))
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.c1, self.c2, self.c3, self.c4):
            x = torch.tanh(conv(x))
        return self.head(x.mean((2, 3)))


def test_hooks_equal_torch_func_on_strided_dilated_convolutions():
    torch.manual_seed(0)
    model = Convs().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 2, 9, 8, generator=g, dtype=torch.float64)
    data = TensorDataset(x, torch.randint(0, 3, (7,), generator=g))
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    _assert_hooks_equal_func(model, loss, DataLoader(data, batch_size=3), [n for n, _ in model.named_parameters()])


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        x.mul_(2)  # the body's input, after the body used it
        return self.head(torch.tanh(h))


def test_an_input_changed_in_place_after_its_layer_is_refused():
    data = TensorDataset(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))
    model = InPlace().double()
    loss = lambda m, b: F.cross_entropy(m(b[0].clone()), b[1], reduction="none")  # noqa: E731
    hooks = Objective(model, loss, ExampleSource(data, "data"), "training", gradients="hooks")
    with pytest.raises(RuntimeError, match="in place"):
        hooks.gradients(ParamSpace.of(hooks.params, [n for n, _ in model.named_parameters()]))
