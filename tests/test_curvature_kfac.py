"""K-FAC / EK-FAC against explicit float64 references on tiny nets (docs/math.md, "Kronecker-factored curvature").

- K-FAC's blocks are the Kronecker products of the explicit expectations ``Ā = E[ã ãᵀ]`` and ``S̄ = E[g gᵀ]``;
- EK-FAC's eigenvalues are the diagonal of the explicit Fisher in the Kronecker eigenbasis, and EK-FAC equals
  the explicit (damped) Fisher inverse where that basis diagonalises the Fisher; K-FAC does not there;
- the fixed mode's Fisher cross block ``F_θW V`` equals the explicit one;
- damping and a per-layer shift (updated mode's α) enter the closed-form inverse exactly;
- sampled labels follow the model's softmax and do not depend on batching or order.
"""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from reference import TinyNet, blobs, loader, rel_err, trained_problem
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_msif import MSIFError, compute_multistage
from lightning_msif.core.curvature import EKFACCurvature, KFACCurvature
from lightning_msif.core.curvature.kfac import KFACOptions
from lightning_msif.core.data import ExampleSource
from lightning_msif.core.objective import Objective, cross_entropy_loss, evaluation
from lightning_msif.core.params import ParamSpace
from lightning_msif.core.task import ClassificationTask

pytestmark = pytest.mark.usefixtures("single_thread")
EMPIRICAL = KFACOptions(fisher="empirical", relative_damping=0.0)  # no heuristic damping: exact comparisons


def _objective(model: nn.Module, data: TensorDataset, batch_size: int = 4, shuffle: bool = False) -> Objective:
    return Objective(model, cross_entropy_loss, ExampleSource(DataLoader(data, batch_size=batch_size, shuffle=shuffle),
                                                              "data"), "pretraining")


def _build(kind, model: nn.Module, data: TensorDataset, names: List[str], options=EMPIRICAL, damping: float = 0.0,
           shift=None, batch_size: int = 4, shuffle: bool = False):
    obj = _objective(model, data, batch_size, shuffle)
    space = ParamSpace.of(obj.params, names)
    with evaluation(model):
        return kind.build(obj, space, range(len(data)), damping=damping, shift=shift, options=options), obj, space


def _example_grads(model: nn.Module, data: TensorDataset, names: List[str]) -> torch.Tensor:
    """``[n, dim]`` per-example gradients, independently (torch.func)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x, y):
        out = functional_call(model, {**params, **p}, (x[None],))
        return F.cross_entropy(out, y[None])

    x, y = data.tensors
    g = vmap(grad(loss), in_dims=(None, 0, 0))({n: params[n] for n in names}, x, y)
    return torch.cat([g[n].reshape(len(x), -1) for n in names], 1)


def _layer_stats(model: TinyNet, data: TensorDataset) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer of TinyNet: (ã [n, in+1], g [n, out], M-space per-example gradients [n, out·(in+1)]), by hand."""
    x, y = data.tensors
    lin0, lin1 = model.backbone[0], model.head
    z0 = x @ lin0.weight.T + lin0.bias
    h = torch.tanh(z0)
    z1 = (h @ lin1.weight.T + lin1.bias).detach().requires_grad_(True)
    g1 = torch.autograd.grad(F.cross_entropy(z1, y, reduction="sum"), z1)[0]  # dℓ_n/dz1 for each n
    g0 = (g1 @ lin1.weight) * (1 - h**2)
    out = []
    for a, g in ((x, g0), (h, g1)):
        a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        out.append((a1.detach(), g.detach(), torch.einsum("no,ni->noi", g, a1).reshape(len(a), -1).detach()))
    return out


def _m_to_params(out: int, inp: int) -> torch.Tensor:
    """Permutation: M-space coordinate (o, i) of [W | b] → position in the (weight, bias) parameter layout."""
    idx = torch.empty(out * (inp + 1), dtype=torch.long)
    for o in range(out):
        for i in range(inp + 1):
            idx[o * (inp + 1) + i] = o * inp + i if i < inp else out * inp + o
    return idx


def _to_param_layout(block: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    perm = _m_to_params(out, inp)
    full = torch.zeros_like(block)
    full[perm[:, None], perm[None, :]] = block
    return full


def _net() -> Tuple[TinyNet, TensorDataset, List[str]]:
    torch.manual_seed(0)
    model = TinyNet(hidden=4, classes=3).double()
    data = blobs(17, 3, seed=4)
    return model, data, [n for n, _ in model.named_parameters()]


def test_kfac_blocks_are_kronecker_products_of_the_explicit_expectations():
    model, data, names = _net()
    op, _, space = _build(KFACCurvature, model, data, names)
    dense = op.dense(10_000)
    expected = torch.zeros_like(dense)
    offset = 0
    for (a, g, _), layer in zip(_layer_stats(model, data), (model.backbone[0], model.head)):
        out, inp = layer.weight.shape
        a_bar, s_bar = a.T @ a / len(a), g.T @ g / len(g)
        size = out * (inp + 1)
        expected[offset:offset + size, offset:offset + size] = _to_param_layout(torch.kron(s_bar, a_bar), out, inp)
        offset += size
    assert rel_err(dense, expected) <= 1e-10


def test_ekfac_eigenvalues_are_the_fisher_diagonal_in_the_kronecker_basis():
    model, data, names = _net()
    op, _, _ = _build(EKFACCurvature, model, data, names)
    dense = op.dense(10_000)
    offset = 0
    for (a, g, m_grads), layer in zip(_layer_stats(model, data), (model.backbone[0], model.head)):
        out, inp = layer.weight.shape
        _, q_a = torch.linalg.eigh(a.T @ a / len(a))
        _, q_s = torch.linalg.eigh(g.T @ g / len(g))
        q = torch.kron(q_s, q_a)
        fisher = m_grads.T @ m_grads / len(m_grads)  # the explicit Fisher block in M space
        lam = torch.diagonal(q.T @ fisher @ q)
        expected = _to_param_layout(q @ torch.diag(lam) @ q.T, out, inp)
        size = out * (inp + 1)
        assert rel_err(dense[offset:offset + size, offset:offset + size], expected) <= 1e-8
        offset += size
    first = 4 * (3 + 1)
    assert dense[:first, first:].abs().max() == 0  # no coupling between layers


def test_ekfac_is_exact_where_its_basis_diagonalises_the_fisher_and_kfac_is_not():
    """One bias-free linear layer, two classes (all output gradients parallel), one-hot inputs: the Fisher is
    diagonal in EK-FAC's basis, so EK-FAC's closed-form inverse is the explicit damped inverse."""
    torch.manual_seed(1)
    model = nn.Linear(5, 2, bias=False).double()
    g = torch.Generator().manual_seed(0)
    x = torch.eye(5, dtype=torch.float64)[torch.randint(0, 5, (40,), generator=g)]
    data = TensorDataset(x, torch.randint(0, 2, (40,), generator=g))
    names, damping = ["weight"], 0.05
    grads = _example_grads(model, data, names)
    fisher = grads.T @ grads / len(grads)
    exact = torch.linalg.inv(fisher + damping * torch.eye(fisher.shape[0], dtype=torch.float64))
    rhs = torch.randn(3, fisher.shape[0], generator=g, dtype=torch.float64)
    ekfac, _, _ = _build(EKFACCurvature, model, data, names, damping=damping)
    kfac, _, _ = _build(KFACCurvature, model, data, names, damping=damping)
    assert rel_err(ekfac.inverse_matmat(rhs), rhs @ exact.T) <= 1e-10
    assert rel_err(kfac.inverse_matmat(rhs), rhs @ exact.T) > 1e-3  # the test can tell the two apart


def test_fisher_cross_block_equals_the_explicit_one():
    model, data, names = _net()
    theta = [n for n in names if n.startswith("backbone")]
    w = [n for n in names if n.startswith("head")]
    obj = _objective(model, data)
    rows, cols = ParamSpace.of(obj.params, theta), ParamSpace.of(obj.params, w)
    v = torch.randn(4, cols.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with evaluation(model):
        got = EKFACCurvature.cross_product(obj, rows, cols, v, range(len(data)), EMPIRICAL)
    g_t, g_w = _example_grads(model, data, theta), _example_grads(model, data, w)
    expected = ((g_w @ v.T).T @ g_t) / len(data)  # (1/m) Σ_x (g_W(x)·v) g_θ(x)
    assert rel_err(got, expected) <= 1e-10


@pytest.mark.parametrize("kind", [EKFACCurvature, KFACCurvature])
def test_damping_and_a_per_layer_shift_enter_the_inverse_exactly(kind):
    model, data, names = _net()
    obj = _objective(model, data)
    space = ParamSpace.of(obj.params, names)
    theta_dim = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone"))
    shift = torch.zeros(space.dim, dtype=torch.float64)
    shift[:theta_dim] = 0.7  # α on the shared layers
    op, _, _ = _build(kind, model, data, names, damping=0.1, shift=shift)
    plain, _, _ = _build(kind, model, data, names)
    v = torch.randn(3, space.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert rel_err(op.inverse_matmat(op.matmat(v)), v) <= 1e-10
    assert rel_err(op.matmat(v), plain.matmat(v) + 0.1 * v + shift * v) <= 1e-12
    bad = shift.clone()
    bad[0] = 0.3
    varying, _, _ = _build(kind, model, data, names, shift=bad)
    with pytest.raises(MSIFError, match="constant per layer"):
        varying.matmat(v)


def test_true_fisher_draws_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64).repeat(10_000, 1)
    u = torch.rand(len(logits), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    task = ClassificationTask()
    draws = task.sample_labels(logits, (None, torch.zeros(len(logits), dtype=torch.long)), u)
    for row in range(2):
        p = torch.softmax(logits[row], 0)
        freq = torch.bincount(draws[row::2], minlength=3).double() / (len(logits) // 2)
        sigma = (p * (1 - p) / (len(logits) // 2)).sqrt()
        assert ((freq - p).abs() <= 4 * sigma).all(), (freq, p)


@pytest.mark.parametrize("kind", [EKFACCurvature, KFACCurvature])
def test_true_fisher_does_not_depend_on_batching_or_shuffling(kind):
    model, data, names = _net()
    v = torch.randn(2, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    ops = [_build(kind, model, data, names, options=KFACOptions(), batch_size=b, shuffle=s)[0]
           for b, s in ((4, False), (7, False), (5, True))]
    base = ops[0].matmat(v)
    for op in ops[1:]:
        assert rel_err(op.matmat(v), base) <= 1e-12
    other_seed = _build(kind, model, data, names, options=KFACOptions(fisher_seed=1))[0]
    assert rel_err(other_seed.matmat(v), base) > 1e-6  # the draws do change with the seed


@pytest.mark.parametrize("mode", ["fixed", "updated"])
def test_multistage_with_ekfac_is_finite_and_batching_invariant(mode):
    alpha = 1.0 if mode == "updated" else None
    pre, fine, pt, ft, q = trained_problem(mode, alpha, 0.1)
    runs = [compute_multistage(pre, fine, loader(pt, b), loader(ft, b), loader(q, b), shared="backbone", mode=mode,
                               alpha=alpha, damping=0.1, curvature="ekfac") for b in (4, 7)]
    assert torch.isfinite(runs[0].scores).all() and runs[0].scores.abs().max() > 0
    assert rel_err(runs[1].scores, runs[0].scores) <= 1e-10
    info = runs[0].info
    assert info["curvature"]["pretrain"]["name"] == "ekfac" and info["solves"]["pretrain"]["solver"] == "direct"
    assert info["solves"]["pretrain"]["relative_residual"] <= 1e-10


def test_fitted_factors_round_trip_through_a_snapshot_and_are_refused_for_other_weights(tmp_path):
    from lightning_msif.snapshots import SnapshotDir

    model, data, names = _net()
    op, obj, space = _build(EKFACCurvature, model, data, names, damping=0.1)
    store = SnapshotDir(tmp_path).factors("sha-of-these-weights")
    store.put("ekfac-key", *op.state())
    tensors, meta = store.get("ekfac-key")
    again = EKFACCurvature.from_state(obj, space, range(len(data)), damping=0.1, shift=None, options=EMPIRICAL,
                                      tensors=tensors, meta=meta)
    v = torch.randn(2, space.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(again.inverse_matmat(v), op.inverse_matmat(v))
    assert SnapshotDir(tmp_path).factors("sha-of-other-weights").get("ekfac-key") is None
    other = ParamSpace.of(obj.params, names[:2])
    assert EKFACCurvature.from_state(obj, other, range(len(data)), damping=0.1, shift=None, options=EMPIRICAL,
                                     tensors=tensors, meta=meta) is None  # fitted on other parameters


def test_true_fisher_cross_block_is_the_gauss_newton_cross_block():
    """For softmax cross-entropy the expected Fisher over the model's labels is the Gauss-Newton matrix; the
    cross block sums over the labels in closed form, so it equals GGN's (no sampling noise)."""
    from lightning_msif.core.curvature import GaussNewtonCurvature
    from lightning_msif.core.curvature.hessian import HessianOptions

    model, data, names = _net()
    obj = _objective(model, data)
    rows = ParamSpace.of(obj.params, [n for n in names if n.startswith("backbone")])
    cols = ParamSpace.of(obj.params, [n for n in names if n.startswith("head")])
    v = torch.randn(3, cols.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with evaluation(model):
        fisher = EKFACCurvature.cross_product(obj, rows, cols, v, range(len(data)), KFACOptions())
        ggn = GaussNewtonCurvature.cross_product(obj, rows, cols, v, range(len(data)), HessianOptions())
    assert rel_err(fisher, ggn) <= 1e-10


def test_diagonal_blocks_are_the_explicit_fisher_diagonal():
    """Norm affine parameters and a parameter no hook covers get ``E[g²]`` from exact per-example gradients."""
    from test_layers import Everything, _data, _loss

    torch.manual_seed(0)
    model = Everything().double().eval()
    data = _data()
    names = [n for n, _ in model.named_parameters()]
    obj = Objective(model, _loss, ExampleSource(DataLoader(data, batch_size=4), "data"), "training")
    space = ParamSpace.of(obj.params, names)
    op = EKFACCurvature.build(obj, space, range(len(data)), damping=0.0, shift=None, options=EMPIRICAL)
    diagonal = [n for b in op.blocks if b.kind == "diagonal" for n in b.names]
    assert set(diagonal) == {"bn.weight", "bn.bias", "norm.weight", "norm.bias", "scale"}
    grads = Objective(model, _loss, ExampleSource(data, "data"), "training", gradients="func").gradients(space)
    offsets = dict(zip(space.names, torch.cumsum(torch.tensor([0, *space.numels]), 0).tolist()))
    dense = op.dense(10_000)
    for name in diagonal:
        sl = slice(offsets[name], offsets[name] + dict(model.named_parameters())[name].numel())
        expected = torch.diag(grads[:, sl].pow(2).mean(0))
        assert rel_err(dense[sl, sl], expected) <= 1e-10, name


class _Convs(nn.Module):
    """A convolution whose input moment is shared over kernel-row lags and whose EK-FAC rotation contracts first
    (c1); one rotated position by position, by a convolution (c2); one with a vertical stride of 2 (c3: unfolded)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 16, (3, 2), stride=(1, 4), padding=(2, 1), dilation=(2, 1))
        self.c3 = nn.Conv2d(16, 4, 3, stride=2, padding=1, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.c1, self.c2, self.c3):
            x = torch.tanh(conv(x))
        return self.head(x.mean((2, 3)))


def _conv_stats(model: _Convs, x: torch.Tensor, y: torch.Tensor):
    """Per convolution, by unfolding: (patches ``ã`` [n, T, in'], output gradients [n, T, out])."""
    inputs, outputs = {}, {}
    convs = {"c1": model.c1, "c2": model.c2, "c3": model.c3}

    def keep(name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0], output
        return hook

    handles = [m.register_forward_hook(keep(k)) for k, m in convs.items()]
    loss = F.cross_entropy(model(x), y, reduction="sum")
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(loss, [outputs[k] for k in convs])
    stats = {}
    for (k, m), g in zip(convs.items(), grads):
        a = F.unfold(inputs[k].detach(), m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        a = a.transpose(1, 2)
        if m.bias is not None:
            a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], 2)
        stats[k] = (a, g.flatten(2).transpose(1, 2))
    return stats


def test_convolution_factors_and_eigenvalues_equal_the_unfolded_ones():
    from lightning_msif.core.kronecker import tokens_first

    torch.manual_seed(0)
    model = _Convs().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 2, 8, 13, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    data = TensorDataset(x, y)
    names = [n for n, _ in model.named_parameters()]
    stats = _conv_stats(model, x, y)
    kfac, _, _ = _build(KFACCurvature, model, data, names)
    ekfac, obj, space = _build(EKFACCurvature, model, data, names)
    with evaluation(model):
        capture, _ = obj.hooked_backward(space, next(obj.batches(range(4)))[0])
    for name, (a, g) in stats.items():
        n, t = a.shape[:2]
        a_bar = torch.einsum("nti,ntj->ij", a, a) / (n * t)
        s_bar = torch.einsum("nti,ntj->ij", g, g) / n
        block = next(b for b in kfac.blocks if b.layer is not None and b.layer.path == name)
        q = torch.kron(block.q_s, block.q_a)
        assert rel_err(q @ torch.diag(block.eig.flatten()) @ q.T, torch.kron(s_bar, a_bar)) <= 1e-10, name
        block = next(b for b in ekfac.blocks if b.layer is not None and b.layer.path == name)
        per_example = torch.einsum("nto,nti->noi", g, a)
        expected = (block.q_s.T @ per_example @ block.q_a).pow(2).mean(0)
        assert rel_err(block.eig, expected) <= 1e-10, name
        order = tokens_first(block, capture.calls[name][0])
        assert order == (name == "c2"), name  # both orders of the rotation are checked


def test_ekfac_bases_come_from_the_evenly_spaced_basis_examples_and_its_eigenvalues_from_all():
    model, data, names = _net()
    subset = [0, 2, 5, 8, 11, 14]  # 6 of 17, evenly spaced
    options = KFACOptions(fisher="empirical", relative_damping=0.0, basis_examples=6)
    op = _build(EKFACCurvature, model, data, names, options=options, batch_size=5, shuffle=True)[0]
    dense = op.dense(10_000)
    offset = 0
    for (a, g, m_grads), layer in zip(_layer_stats(model, data), (model.backbone[0], model.head)):
        out, inp = layer.weight.shape
        _, q_a = torch.linalg.eigh(a[subset].T @ a[subset] / len(subset))
        _, q_s = torch.linalg.eigh(g[subset].T @ g[subset] / len(subset))
        q = torch.kron(q_s, q_a)
        lam = torch.diagonal(q.T @ (m_grads.T @ m_grads / len(m_grads)) @ q)
        size = out * (inp + 1)
        expected = _to_param_layout(q @ torch.diag(lam) @ q.T, out, inp)
        assert rel_err(dense[offset:offset + size, offset:offset + size], expected) <= 1e-8
        offset += size
    v = torch.randn(3, dense.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    every = _build(EKFACCurvature, model, data, names, options=KFACOptions(fisher="empirical", relative_damping=0.0,
                                                                          basis_examples=None))[0].matmat(v)
    at_n = _build(EKFACCurvature, model, data, names, options=KFACOptions(fisher="empirical", relative_damping=0.0,
                                                                         basis_examples=17))[0].matmat(v)
    assert rel_err(at_n, every) <= 1e-12 and rel_err(op.matmat(v), every) > 1e-6


class _Gated(nn.Module):
    """``extra`` runs only for inputs whose first feature is large: examples the basis subset can miss."""

    def __init__(self):
        super().__init__()
        self.body, self.extra, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if bool((x[:, 0] > 2.0).all()):
            h = h + torch.tanh(self.extra(h))
        return self.head(h)


def test_a_layer_the_basis_examples_miss_keeps_its_curvature_in_the_plain_basis():
    torch.manual_seed(0)
    model = _Gated().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    x[[1, 3], 0] = 5.0  # only odd examples reach `extra`; the basis examples are 0, 2, 4, 6
    data = TensorDataset(x, torch.arange(8) % 2)
    names = [n for n, _ in model.named_parameters()]
    options = KFACOptions(fisher="empirical", relative_damping=0.0, basis_examples=4)
    op, obj, space = _build(EKFACCurvature, model, data, names, options=options, batch_size=1)
    dense = op.dense(10_000)
    extra = [n for n in names if n.startswith("extra.")]
    grads = torch.stack([torch.cat([t.flatten() for t in torch.autograd.grad(
        F.cross_entropy(model(x[i:i + 1]), data.tensors[1][i:i + 1]),
        [dict(model.named_parameters())[n] for n in extra], allow_unused=True, materialize_grads=True)])
        for i in range(8)])
    start = sum(p.numel() for n, p in model.named_parameters() if names.index(n) < names.index(extra[0]))
    sl = slice(start, start + grads.shape[1])
    assert grads.abs().sum() > 0
    assert rel_err(dense[sl, sl], torch.diag(grads.pow(2).mean(0))) <= 1e-10


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "all"])
def test_basis_examples_must_be_a_positive_whole_number(bad):
    with pytest.raises(MSIFError, match="basis_examples must be a whole number > 0"):
        KFACOptions(basis_examples=bad)
