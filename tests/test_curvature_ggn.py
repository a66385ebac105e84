"""``curvature='ggn'`` against a Gauss-Newton matrix built here, independently of the library.

``G = (1/n) Σ_i J_iᵀ Λ_i J_i`` with ``J_i = torch.func.jacrev`` of example i's logits in the flat parameters
and the closed form ``Λ_i = diag(p_i) − p_i p_iᵀ`` of softmax cross-entropy; scores by dense float64
solves of docs/math.md with every Hessian replaced by its explicit G. The models are untrained (where the
Hessian is indefinite and G differs from it most) unless said otherwise.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from reference import blobs, brute_force, brute_force_single, loader, problem, rel_err, trained_problem
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import TensorDataset

from lightning_msif import MSIFError, compute_single_stage, multistage_influence, single_stage_influence
from lightning_msif.core.curvature import CURVATURES, Curvature, GaussNewtonCurvature
from lightning_msif.core.data import ExampleSource
from lightning_msif.core.objective import LossFn, Objective, cross_entropy_loss, evaluation
from lightning_msif.core.params import ParamSpace
from lightning_msif.core.task import IGNORE_INDEX, ClassificationTask

pytestmark = pytest.mark.usefixtures("single_thread")

DAMPING = 0.05


# -- the independent Gauss-Newton matrix and gradients -----------------------------------------------------
def _trainable(model: nn.Module) -> List[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _sub(model: nn.Module, names: Sequence[str]) -> dict:
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in names}


def _flat_jacobian(jac: dict, names: Sequence[str], lead: int) -> torch.Tensor:
    """``{name: [*lead dims, *shape]}`` → ``[*lead dims, P]``, names in order."""
    return torch.cat([jac[n].reshape(*jac[n].shape[:lead], -1) for n in names], -1)


def explicit_ggn(model: nn.Module, names: Sequence[str], data: TensorDataset) -> torch.Tensor:
    """Mean of ``J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i`` over ``data``, for logits ``[n, C]`` or ``[n, T, C]``
    (tokens labelled ``IGNORE_INDEX`` contribute nothing)."""
    x, y = data.tensors
    logits_of = lambda p: functional_call(model, p, (x,))
    logits = logits_of(_sub(model, names)).detach()
    jac = _flat_jacobian(jacrev(logits_of)(_sub(model, names)), names, logits.dim())  # [n, (T,) C, P]
    p = torch.softmax(logits, -1)
    lam = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    if logits.dim() == 3:  # the example's loss sums its tokens': Λ_i is block-diagonal over tokens
        lam = lam * (y != IGNORE_INDEX)[..., None, None]
        return torch.einsum("ntcp,ntcd,ntdq->pq", jac, lam, jac) / len(x)
    return torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac) / len(x)


def example_grads(model: nn.Module, names: Sequence[str], data: TensorDataset) -> torch.Tensor:
    """``[n, P]``: gradient of each example's cross-entropy."""
    x, y = data.tensors
    losses = lambda p: F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")
    return _flat_jacobian(jacrev(losses)(_sub(model, names)), names, 1)


def ggn_single(model: nn.Module, train: TensorDataset, q: TensorDataset, damping: float,
               curvature_data: Optional[TensorDataset] = None) -> torch.Tensor:
    """``S = −∇ℓ(z_i)ᵀ (G + λI)⁻¹ ∇f(q_j)`` with the explicit G (over ``curvature_data`` when given)."""
    names = _trainable(model)
    g = explicit_ggn(model, names, train if curvature_data is None else curvature_data)
    s = torch.linalg.solve(g + damping * torch.eye(len(g), dtype=g.dtype), example_grads(model, names, q).T)
    return -example_grads(model, names, train) @ s


def ggn_multistage(pre: nn.Module, fine: nn.Module, pt: TensorDataset, ft: TensorDataset, q: TensorDataset,
                   mode: str, alpha: Optional[float], damping: float) -> torch.Tensor:
    """docs/math.md, both modes, with the explicit G of each stage for each Hessian (H_θW: its θW block)."""
    theta = [n for n in _trainable(pre) if n.startswith("backbone.")]
    u = [n for n in _trainable(pre) if not n.startswith("backbone.")]
    w = [n for n in _trainable(fine) if not n.startswith("backbone.")]
    t = sum(p.numel() for p in _sub(pre, theta).values())
    eye = lambda m: torch.eye(m, dtype=torch.float64)
    gq = example_grads(fine, theta + w, q)
    g_ft = explicit_ggn(fine, theta + w, ft)
    if mode == "fixed":
        g = gq[:, :t].T - g_ft[:t, t:] @ torch.linalg.solve(g_ft[t:, t:] + damping * eye(len(g_ft) - t), gq[:, t:].T)
    else:
        sel = torch.diag(torch.cat([torch.ones(t), torch.zeros(len(g_ft) - t)]).double())
        g = alpha * torch.linalg.solve(g_ft + alpha * sel + damping * eye(len(g_ft)), gq.T)[:t]
    g_pt = explicit_ggn(pre, theta + u, pt)
    rhs = torch.cat([g, torch.zeros(len(g_pt) - t, g.shape[1], dtype=torch.float64)])
    return -example_grads(pre, theta + u, pt) @ torch.linalg.solve(g_pt + damping * eye(len(g_pt)), rhs)


def _op(model: nn.Module, data: TensorDataset, kind: str = "ggn", names: Optional[Sequence[str]] = None,
        indices: Optional[Sequence[int]] = None, batch: int = 4, loss_fn: LossFn = cross_entropy_loss,
        **options: object) -> Curvature:
    obj = Objective(model, loss_fn, ExampleSource(loader(data, batch), "data"), "training")
    cls = CURVATURES.get(kind)
    return cls.build(obj, ParamSpace.of(obj.params, names or _trainable(model)),
                     range(len(data)) if indices is None else indices, damping=0.0, shift=None,
                     options=CURVATURES.options_of(cls, options))


def _dense(op: Curvature, symmetrised: bool = True) -> torch.Tensor:
    with evaluation(op.objective.bound):
        eye = torch.eye(op.dim, dtype=torch.float64)
        return op.dense(10_000) if symmetrised else op.apply(eye)


def _subset(data: TensorDataset, indices: Sequence[int]) -> TensorDataset:
    return TensorDataset(*(t[list(indices)] for t in data.tensors))


# -- the operator --------------------------------------------------------------------------------------------
def test_ggn_is_registered():
    assert CURVATURES.get("ggn") is GaussNewtonCurvature
    assert CURVATURES.options_of(GaussNewtonCurvature, {}).rhs_chunk_size is None  # sized by memory


@pytest.mark.parametrize("trained", [False, True])
def test_dense_equals_the_explicit_gauss_newton_matrix(trained):
    pre, fine, pt, ft, _ = trained_problem("fixed", None, 0.1) if trained else problem(seed=1)
    assert rel_err(_dense(_op(pre, pt)), explicit_ggn(pre, _trainable(pre), pt)) <= 1e-10
    # a subset of examples across loader batches, and a subset of parameters (the others are constants)
    idx = [0, 2, 3, 7, 12]
    assert rel_err(_dense(_op(pre, pt, indices=idx)), explicit_ggn(pre, _trainable(pre), _subset(pt, idx))) <= 1e-10
    head = ["head.weight", "head.bias"]
    assert rel_err(_dense(_op(fine, ft, names=head, batch=3)), explicit_ggn(fine, head, ft)) <= 1e-10
    # not vacuous: G is not the Hessian of this network
    assert rel_err(_dense(_op(pre, pt)), _dense(_op(pre, pt, kind="hessian"))) > 0.05


def test_right_hand_side_chunking_changes_nothing():
    pre, _, pt, _, _ = problem(seed=1)
    v = torch.randn(7, _op(pre, pt).dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with evaluation(pre):
        by_chunk = [_op(pre, pt, rhs_chunk_size=c).apply(v) for c in (1, 3, None)]
    assert all(rel_err(out, by_chunk[-1]) <= 1e-12 for out in by_chunk[:-1])


def test_symmetric_positive_semi_definite_where_the_hessian_is_indefinite():
    pre, _, pt, _, _ = problem(seed=0)
    g = _dense(_op(pre, pt), symmetrised=False)
    assert (g - g.T).norm() <= 1e-12 * g.norm()
    eig = torch.linalg.eigvalsh(g)
    assert eig[0] >= -1e-12 * eig[-1] and eig[-1] > 0.1
    assert torch.linalg.eigvalsh(_dense(_op(pre, pt, kind="hessian")))[0] < -1e-3


def test_equals_the_hessian_for_a_model_linear_in_its_parameters():
    torch.manual_seed(0)
    model, data = nn.Linear(3, 4).double(), blobs(13, 4, seed=5)
    hessian = _dense(_op(model, data, kind="hessian"))
    assert rel_err(_dense(_op(model, data)), hessian) <= 1e-10 and hessian.norm() > 0.1


def test_per_token_outputs_use_the_generic_output_hessian():
    """Logits ``[B, T, C]``, labels ``[B, T]`` with ignored tokens: Λ from the task's loss, not a closed form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6, 5), generator=g)
    y[0, 1] = y[3, 4] = y[5, 0] = IGNORE_INDEX
    data = TensorDataset(x, y)
    op = _op(model, data, loss_fn=ClassificationTask(), batch=4)
    assert rel_err(_dense(op), explicit_ggn(model, _trainable(model), data)) <= 1e-10


def test_a_loss_other_than_the_tasks_is_refused():
    pre, _, pt, _, q = problem(seed=0)
    smoothed = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1], reduction="none", label_smoothing=0.1)
    with pytest.raises(MSIFError, match=r"curvature='ggn' .*ClassificationTask.* differs from the training loss "
                                        r"at dataset indices \[0, 1, 2, 3\]. Use curvature='hessian'"):
        single_stage_influence(pre, loader(pt), loader(q), loss_fn=smoothed, curvature="ggn", damping=DAMPING)


# -- through the public API -----------------------------------------------------------------------------------
def test_single_stage_exact_and_cg_equal_the_explicit_ggn_scores():
    model, _, train, _, q = problem(seed=2)
    ref = ggn_single(model, train, q, DAMPING)
    exact = single_stage_influence(model, loader(train), loader(q), damping=DAMPING, curvature="ggn")
    assert rel_err(exact, ref) <= 1e-9
    cg = compute_single_stage(model, loader(train, 5), loader(q), damping=DAMPING, curvature="ggn", solver="cg",
                              tol=1e-12)
    assert rel_err(cg.scores, ref) <= 1e-7 and cg.info["solves"]["pretrain"]["converged"]
    assert rel_err(ref, brute_force_single(model, train, q, damping=DAMPING)) > 0.05  # not the Hessian's scores


def test_cg_refuses_the_indefinite_hessian_and_solves_with_ggn():
    """The remedy the CG error names: the same untrained model and damping, Gauss-Newton curvature."""
    model, _, train, _, q = problem(seed=0)
    with pytest.raises(MSIFError, match=r"CG met non-positive curvature.*curvature='ggn'"):
        single_stage_influence(model, loader(train), loader(q), damping=1e-3, solver="cg")
    scores = single_stage_influence(model, loader(train), loader(q), damping=1e-3, curvature="ggn", solver="cg",
                                    tol=1e-12, max_iter=1000)
    assert rel_err(scores, ggn_single(model, train, q, 1e-3)) <= 1e-6


def test_hessian_samples_takes_the_ggn_from_a_subset():
    """hessian_samples=12 of 13: exactly one leave-one-out explicit G reproduces the scores."""
    model, _, train, _, q = problem(seed=2)
    scores = single_stage_influence(model, loader(train), loader(q), damping=DAMPING, curvature="ggn",
                                    hessian_samples=12)
    errs = [rel_err(scores, ggn_single(model, train, q, DAMPING, _subset(train, [i for i in range(13) if i != out])))
            for out in range(13)]
    assert sum(e <= 1e-9 for e in errs) == 1, errs


@pytest.mark.parametrize("mode,alpha", [("fixed", None), ("updated", 0.5)])
def test_multistage_equals_the_explicit_ggn_formulas(mode, alpha):
    pre, fine, pt, ft, q = problem(seed=1)
    ref = ggn_multistage(pre, fine, pt, ft, q, mode, alpha, DAMPING)
    kw = dict(shared="backbone", mode=mode, alpha=alpha, damping=DAMPING, curvature="ggn")
    exact = multistage_influence(pre, fine, loader(pt), loader(ft, 3), loader(q), **kw)
    assert rel_err(exact, ref) <= 1e-9
    cg = multistage_influence(pre, fine, loader(pt), loader(ft), loader(q), solver="cg", tol=1e-12, **kw)
    assert rel_err(cg, ref) <= 1e-7
    hessian_ref = brute_force(pre, fine, pt, ft, q, mode=mode, alpha=alpha, damping=DAMPING)
    assert rel_err(ref, hessian_ref) > 0.05 and ref.abs().max() > 1e-2  # not vacuous
