"""Brute-force float64 evaluation of docs/math.md with explicit Hessians, and tiny test problems.

Independent of the library's internals: flat parameter vectors, ``torch.autograd.functional``
Hessians and Jacobians, dense ``torch.linalg.solve``. Only for models of a few dozen parameters.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    """backbone (shared θ) → head; tanh keeps the losses smooth."""

    def __init__(self, d_in: int = 3, hidden: int = 4, classes: int = 3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def blobs(n: int, classes: int, d: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centers = torch.randn(classes, d, generator=g, dtype=torch.float64) * 1.5
    x = centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return TensorDataset(x, y)


def problem(seed: int = 0, n_pt: int = 13, n_ft: int = 11, n_q: int = 5):
    """Two float64 TinyNets sharing a backbone, pretraining/finetune/query data."""
    torch.manual_seed(seed)
    pre = TinyNet(classes=3).double()
    fine = TinyNet(classes=2).double()
    fine.backbone.load_state_dict(pre.backbone.state_dict())
    return pre, fine, blobs(n_pt, 3, seed=seed + 1), blobs(n_ft, 2, seed=seed + 2), blobs(n_q, 2, seed=seed + 3)


def _names(model: nn.Module, prefix: str, inside: bool) -> List[str]:
    return [n for n, p in model.named_parameters() if n.startswith(prefix + ".") == inside and (inside or p.requires_grad)]


def _flat(model: nn.Module, names: Sequence[str]) -> torch.Tensor:
    p = dict(model.named_parameters())
    return torch.cat([p[n].detach().reshape(-1) for n in names])


def _unflat(model: nn.Module, names: Sequence[str], v: torch.Tensor) -> Dict[str, torch.Tensor]:
    p, out, i = dict(model.named_parameters()), {}, 0
    for n in names:
        k = p[n].numel()
        out[n] = v[i : i + k].reshape(p[n].shape)
        i += k
    return out


def _losses(model: nn.Module, names: Sequence[str], v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, _unflat(model, names, v), (x,)), y, reduction="none")


def _mean_hessian(model, names, data: TensorDataset) -> torch.Tensor:
    x, y = data.tensors
    return hessian(lambda v: _losses(model, names, v, x, y).mean(), _flat(model, names))


def _per_example_grads(model, names, data: TensorDataset) -> torch.Tensor:
    x, y = data.tensors
    return jacobian(lambda v: _losses(model, names, v, x, y), _flat(model, names))


def brute_force(pre, fine, pt: TensorDataset, ft: TensorDataset, q: TensorDataset, shared: str = "backbone",
                mode: str = "fixed", alpha: float = None, damping: float = 0.0,
                pt_hessian: TensorDataset = None, ft_hessian: TensorDataset = None) -> torch.Tensor:
    """``S`` of docs/math.md, every matrix explicit.

    ``pt_hessian`` / ``ft_hessian``: take that stage's Hessian over these examples instead (subsampled
    curvature); gradients are still those of ``pt`` and ``q``.
    """
    theta = _names(pre, shared, True)
    u, w = _names(pre, shared, False), _names(fine, shared, False)
    t = _flat(pre, theta).numel()
    ft_names = theta + w
    gq = _per_example_grads(fine, ft_names, q)  # [k, θ+W]
    h_ft = _mean_hessian(fine, ft_names, ft if ft_hessian is None else ft_hessian)
    eye = lambda m: torch.eye(m, dtype=torch.float64)
    if mode == "fixed":
        h_tw, h_ww = h_ft[:t, t:], h_ft[t:, t:]
        g = gq[:, :t].T - h_tw @ torch.linalg.solve(h_ww + damping * eye(len(h_ww)), gq[:, t:].T)
    elif mode == "updated":
        sel = torch.zeros(len(h_ft), dtype=torch.float64)
        sel[:t] = 1
        u_j = torch.linalg.solve(h_ft + alpha * torch.diag(sel) + damping * eye(len(h_ft)), gq.T)
        g = alpha * u_j[:t]
    pt_names = theta + u
    h_pt = _mean_hessian(pre, pt_names, pt if pt_hessian is None else pt_hessian)
    rhs = torch.cat([g, torch.zeros(h_pt.shape[0] - t, g.shape[1], dtype=torch.float64)])
    s = torch.linalg.solve(h_pt + damping * eye(len(h_pt)), rhs)
    return -_per_example_grads(pre, pt_names, pt) @ s


def brute_force_single(model, train: TensorDataset, q: TensorDataset, damping: float = 0.0,
                       hessian_data: TensorDataset = None) -> torch.Tensor:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    h = _mean_hessian(model, names, train if hessian_data is None else hessian_data)
    s = torch.linalg.solve(h + damping * torch.eye(len(h), dtype=torch.float64), _per_example_grads(model, names, q).T)
    return -_per_example_grads(model, names, train) @ s


def loader(data: TensorDataset, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def minimise(fn, v0: torch.Tensor, newton_steps: int = 8, warm: bool = False) -> torch.Tensor:
    """Exact local minimum of a smooth ``fn(v)``: L-BFGS, then Newton polish with explicit Hessians.

    ``warm=True`` skips L-BFGS: for a start within a tiny distance of a minimum with a positive-definite
    Hessian (re-optimising after an O(ε) change of the objective), where pure Newton converges quadratically.
    """
    v = v0.detach().clone().requires_grad_(True)
    if not warm:
        opt = torch.optim.LBFGS([v], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = fn(v)
            loss.backward()
            return loss

        opt.step(closure)
    v = v.detach()
    for _ in range(newton_steps):
        g = jacobian(fn, v)
        if g.norm() < 1e-13:
            break
        v = v - torch.linalg.solve(hessian(fn, v), g)
    if warm:
        g = jacobian(fn, v).norm().item()
        if not g < 1e-10:
            raise AssertionError(f"warm Newton did not reach the optimum (gradient norm {g:.3g})")
    return v


def _set(model: nn.Module, names: Sequence[str], v: torch.Tensor) -> None:
    with torch.no_grad():
        p = dict(model.named_parameters())
        for n, t in _unflat(model, names, v).items():
            p[n].copy_(t)


def train_two_stage(pre, fine, pt: TensorDataset, ft: TensorDataset, mode: str, alpha: float = None,
                    damping: float = 0.0, pt_weights: torch.Tensor = None, shared: str = "backbone",
                    warm: bool = False) -> None:
    """Both stages to their exact optimum, with the objectives docs/math.md differentiates.

    Pretraining: mean-weighted loss + λ/2‖(θ,U)‖² (``pt_weights`` upweights examples: 1 + ε e_i).
    Finetune, fixed: W only (θ copied from pretraining) + λ/2‖W‖²;
    updated: (θ, W) + α/2‖θ − θ̂‖² + λ/2‖(θ, W)‖².
    ``warm=True``: both models already sit next to the optimum (Newton only, see ``minimise``).
    """
    theta, u, w = _names(pre, shared, True), _names(pre, shared, False), _names(fine, shared, False)
    x, y = pt.tensors
    wts = torch.ones(len(y), dtype=torch.float64) if pt_weights is None else pt_weights
    pt_names = theta + u
    v = minimise(lambda v: (wts * _losses(pre, pt_names, v, x, y)).sum() / len(y) + damping / 2 * v.pow(2).sum(),
                 _flat(pre, pt_names), warm=warm)
    _set(pre, pt_names, v)
    t_hat = _flat(pre, theta)
    xf, yf = ft.tensors
    if mode == "fixed":
        _set(fine, theta, t_hat)
        v = minimise(lambda v: _losses(fine, w, v, xf, yf).mean() + damping / 2 * v.pow(2).sum(), _flat(fine, w),
                     warm=warm)
        _set(fine, w, v)
    else:
        t = t_hat.numel()
        names = theta + w
        v0 = torch.cat([_flat(fine, theta) if warm else t_hat, _flat(fine, w)])
        v = minimise(lambda v: _losses(fine, names, v, xf, yf).mean() + alpha / 2 * (v[:t] - t_hat).pow(2).sum()
                     + damping / 2 * v.pow(2).sum(), v0, warm=warm)
        _set(fine, names, v)


def query_losses(fine, q: TensorDataset) -> torch.Tensor:
    x, y = q.tensors
    with torch.no_grad():
        return F.cross_entropy(fine(x), y, reduction="none")


def train_single(model, train: TensorDataset, damping: float = 0.0, weights: torch.Tensor = None,
                 warm: bool = False) -> None:
    """One model to the exact optimum of its mean-weighted loss + λ/2‖·‖² over its trainable parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    x, y = train.tensors
    wts = torch.ones(len(y), dtype=torch.float64) if weights is None else weights
    v = minimise(lambda v: (wts * _losses(model, names, v, x, y)).sum() / len(y) + damping / 2 * v.pow(2).sum(),
                 _flat(model, names), warm=warm)
    _set(model, names, v)


_TRAINED: Dict[tuple, tuple] = {}


def trained_problem(mode: str = "fixed", alpha: float = None, damping: float = 0.1, seed: int = 0):
    """``problem(seed)`` with both stages at their exact optimum for (mode, α, λ = L2 = damping).

    Cached per process (training from scratch takes seconds); every call returns fresh copies of the
    models, so tests may modify them. The datasets are shared: do not modify them in place.
    """
    import copy

    key = (mode, alpha, damping, seed)
    if key not in _TRAINED:
        if mode == "fixed":
            pre, fine, pt, ft, q = problem(seed)
            train_two_stage(pre, fine, pt, ft, "fixed", damping=damping)
        else:  # start from the fixed-mode optimum: the pretraining stage is already solved
            pre, fine, pt, ft, q = trained_problem("fixed", None, damping, seed)
            train_two_stage(pre, fine, pt, ft, mode, alpha=alpha, damping=damping)
        _TRAINED[key] = (pre, fine, pt, ft, q)
    pre, fine, pt, ft, q = _TRAINED[key]
    return copy.deepcopy(pre), copy.deepcopy(fine), pt, ft, q


_REFERENCE: dict = {}


def solved_case(mode: str, alpha: float = 1.0, damping: float = 0.1):
    """``trained_problem`` of ``mode`` plus its brute-force scores (computed once per process).

    Returns ``(pre, fine, pt, ft, q, alpha, reference)``; ``alpha`` is None in fixed mode.
    """
    alpha = alpha if mode == "updated" else None
    pre, fine, pt, ft, q = trained_problem(mode, alpha, damping)
    key = (mode, alpha, damping)
    if key not in _REFERENCE:
        _REFERENCE[key] = brute_force(pre, fine, pt, ft, q, mode=mode, alpha=alpha, damping=damping)
    return pre, fine, pt, ft, q, alpha, _REFERENCE[key]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()
