"""The gradient index: Kronecker-structured projections of per-example gradients, captured once, scored many times.

Against explicit references: a projection of full dimension preserves every inner product exactly (so scores
from the index equal the scoring pass's); a smaller one preserves them in expectation over its seed (a
statistical test that fails when a side is mis-scaled or the sides are correlated). Capture is resumable and
does not depend on batching; an index of other data or another model is refused.
"""
from __future__ import annotations

import pytest
import torch
from reference import loader, rel_err, trained_problem
from test_layers import Everything, _data, _loss
from torch.utils.data import DataLoader, TensorDataset

from lightning_msif import MSIFError, MemoryIndexStore, capture_gradient_index, compute_multistage, compute_single_stage
from lightning_msif.core.arguments import ScoreArguments
from lightning_msif.core.curvature import EKFACCurvature
from lightning_msif.core.curvature.kfac import KFACOptions
from lightning_msif.core.data import ExampleSource
from lightning_msif.core.index import GradientIndex, capture_index
from lightning_msif.core.objective import Objective, evaluation
from lightning_msif.core.params import ParamSpace
from lightning_msif.core.projection import Projection

pytestmark = pytest.mark.usefixtures("single_thread")


def _everything():
    torch.manual_seed(0)
    model = Everything().double().eval()
    data = _data()
    obj = Objective(model, _loss, ExampleSource(DataLoader(data, batch_size=4), "data"), "training", gradients="func")
    space = ParamSpace.of(obj.params, [n for n, _ in model.named_parameters()])
    return model, data, obj, space


def _rows(model, obj: Objective, projection: Projection) -> torch.Tensor:
    with evaluation(model):
        return torch.cat([projection.examples(batch, idx) for batch, idx in obj.batches(range(len(obj.source)))])


def _balance(obj: Objective, space: ParamSpace):
    return EKFACCurvature.build(obj, space, range(len(obj.source)), damping=0.1, shift=None,
                                options=KFACOptions(fisher="empirical")).balance()


@pytest.mark.parametrize("balanced", [False, True])
def test_a_projection_of_full_dimension_preserves_every_inner_product(balanced):
    """Conv2d, BatchNorm, Embedding (with padding), LayerNorm, HF Conv1D, a bare parameter and a Linear head;
    balanced by EK-FAC's Kronecker-factored square root (gradients by W, vectors by W⁻¹) or not."""
    model, data, obj, space = _everything()
    with evaluation(model):
        projection = Projection(obj, space, dim=64, balance=_balance(obj, space) if balanced else None)
    assert projection.out_dim == space.dim
    with evaluation(model):
        grads = obj.gradients(space)  # torch.func, independent of the hooks
    v = torch.randn(3, space.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = _rows(model, obj, projection) @ projection.vectors(v).T
    assert rel_err(got, grads @ v.T) <= 1e-12


@pytest.mark.parametrize("dim, balanced", [(1, False), (2, False), (2, True)])
def test_projected_inner_products_are_unbiased_over_the_seed(dim, balanced):
    """``dim=1`` projects every layer and parameter (norms and the bare parameter densely); ``dim=2`` the layers.
    The mean over 250 seeds of ⟨P g_i, P v_j⟩ is ⟨g_i, v_j⟩ within 5 standard errors for every pair, and single
    draws do differ from it (a mis-scaled or correlated side biases the mean and fails)."""
    model, data, obj, space = _everything()
    with evaluation(model):
        exact_grads = obj.gradients(space)
    v = torch.randn(2, space.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = exact_grads @ v.T
    with evaluation(model):
        balance = _balance(obj, space) if balanced else None
    draws = []
    for seed in range(250):
        projection = Projection(obj, space, dim=dim, seed=seed, balance=balance, kind="random")
        draws.append(_rows(model, obj, projection) @ projection.vectors(v).T)
    draws = torch.stack(draws)
    mean, sem = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    assert ((mean - exact).abs() <= 5 * sem).all(), ((mean - exact) / sem).abs().max()
    assert rel_err(draws[0], exact) > 0.1  # a real projection, not the identity
    assert rel_err(mean, exact) < 0.5 * rel_err(draws[0], exact)  # and averaging does converge


@pytest.mark.parametrize("mode", ["fixed", "updated"])
def test_scores_from_a_full_index_equal_the_scoring_pass_at_any_batching(mode):
    alpha = 1.0 if mode == "updated" else None
    pre, fine, pt, ft, q = trained_problem(mode, alpha, 0.1)
    settings = dict(shared="backbone", mode=mode, alpha=alpha, damping=0.1)
    ref = compute_multistage(pre, fine, loader(pt, 4), loader(ft, 4), loader(q, 4), **settings)
    for batch_size, block in ((5, 4096), (3, 4)):
        index = capture_gradient_index(pre, loader(pt, batch_size), MemoryIndexStore(), shared="backbone", dim=100,
                                       dtype="float64", block=block)
        got = compute_multistage(pre, fine, loader(pt, 4), loader(ft, 4), loader(q, 4), index=index, **settings)
        assert got.info["scoring"] == "gradient_index"
        assert rel_err(got.scores, ref.scores) <= 1e-12


@pytest.mark.parametrize("mode", ["fixed", "updated"])
def test_a_full_index_balanced_by_the_pretraining_ekfac_reproduces_its_scores(mode):
    alpha = 1.0 if mode == "updated" else None
    pre, fine, pt, ft, q = trained_problem(mode, alpha, 0.1)
    settings = dict(shared="backbone", mode=mode, alpha=alpha, damping=0.1, curvature="ekfac")
    ref = compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), **settings)
    index = capture_gradient_index(pre, loader(pt, 3), MemoryIndexStore(), shared="backbone", dim=100,
                                   dtype="float64", arguments=ScoreArguments(curvature="ekfac", damping=0.1))
    assert index.projection["balanced"]
    got = compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), index=index, **settings)
    assert rel_err(got.scores, ref.scores) <= 1e-12


def test_single_stage_scores_from_a_projected_index_approach_the_exact_ones_as_the_dimension_grows():
    pre, _, pt, _, q = trained_problem("fixed", None, 0.1)
    ref = compute_single_stage(pre, loader(pt), loader(q), damping=0.1)

    def error(dim: int, seed: int) -> float:
        index = capture_gradient_index(pre, loader(pt), MemoryIndexStore(), dim=dim, seed=seed, dtype="float64")
        return rel_err(compute_single_stage(pre, loader(pt), loader(q), damping=0.1, index=index).scores, ref.scores)

    mean = {dim: sum(error(dim, seed) for seed in range(30)) / 30 for dim in (1, 4)}  # single draws are noisy
    assert mean[1] > 2 * mean[4] > 0
    assert error(5, 0) <= 1e-12  # 5 covers every side of this net: exact


class _Interrupted(MemoryIndexStore):
    def __init__(self, puts: int):
        super().__init__()
        self.left = puts

    def put(self, key, tensor):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        super().put(key, tensor)


def test_an_interrupted_capture_resumes_to_the_same_index():
    model, data, obj, space = _everything()
    projection = Projection(obj, space, dim=2, seed=5)
    whole = MemoryIndexStore()
    with evaluation(model):
        assert capture_index(obj, projection, whole, block=2) == {"captured": 9, "reused": 0}
        store = _Interrupted(puts=2)
        with pytest.raises(KeyboardInterrupt):
            capture_index(obj, projection, store, block=2)
        store.left = -1
        assert capture_index(obj, projection, store, block=2) == {"captured": 5, "reused": 4}
    assert sorted(store) == sorted(whole) and len(whole) == 5
    for key in whole:
        assert torch.equal(store[key], whole[key])


def test_an_index_of_other_data_or_another_model_is_refused_before_any_work():
    pre, fine, pt, ft, q = trained_problem("fixed", None, 0.1)
    settings = dict(shared="backbone", mode="fixed", damping=0.1)
    index = capture_gradient_index(pre, loader(pt), MemoryIndexStore(), shared="backbone", dim=2)
    short = GradientIndex(index.store, index.n - 1, index.projection, index.duals)
    with pytest.raises(MSIFError, match="covers .* examples, but the pretraining data has .* other data"):
        compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), index=short, **settings)
    other_seed = GradientIndex(index.store, index.n, {**index.projection, "dim": 3}, index.duals)
    with pytest.raises(MSIFError, match="captured for other parameters or layers"):
        compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), index=other_seed, **settings)
    partial = MemoryIndexStore()
    with pytest.raises(MSIFError, match="has no block rows.0-"):
        compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), **settings,
                           index=GradientIndex(partial, index.n, index.projection, index.duals))
    for bad, message in ((0, "dim must be a whole number"), (2.5, "dim must be a whole number")):
        with pytest.raises(MSIFError, match=message):
            capture_gradient_index(pre, loader(pt), MemoryIndexStore(), dim=bad)
    with pytest.raises(MSIFError, match="dtype must be one of"):
        capture_gradient_index(pre, loader(pt), MemoryIndexStore(), dtype="int8")


def test_the_eigen_projection_keeps_exactly_the_leading_eigen_directions_of_each_layer():
    """``kind="eigen"`` with dim 2 on a net of Linear layers: ⟨P W g, P W⁻¹ v⟩ is Σ (Q_Sᵀ G Q_A)_ij (Q_Sᵀ V Q_A)_ij
    over the 2 × 2 leading eigenvector pairs of each layer (by the balance's side scales), the same for any seed."""
    pre, _, pt, _, _ = trained_problem("fixed", None, 0.1)
    obj = Objective(pre, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
                    ExampleSource(loader(pt), "data"), "training", gradients="func")
    space = ParamSpace.of(obj.params, [n for n, _ in pre.named_parameters()])
    with evaluation(pre):
        curvature = EKFACCurvature.build(obj, space, range(len(pt)), damping=0.1, shift=None,
                                         options=KFACOptions(fisher="empirical"))
        balance = curvature.balance()
        grads = obj.gradients(space)
        rows = [_rows(pre, obj, Projection(obj, space, dim=2, seed=seed, balance=balance)) for seed in (0, 1)]
    v = torch.randn(3, space.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    projection = Projection(obj, space, dim=2, balance=balance)
    got = rows[0] @ projection.vectors(v).T
    expected = torch.zeros_like(got)
    for block in curvature.blocks:
        q_s, r, q_a, c = balance[block.names[0]]
        top_r, top_c = torch.argsort(r, descending=True)[:2], torch.argsort(c, descending=True)[:2]
        g = block.rotate(block.matrix(space.unflatten(grads)))[:, top_r][:, :, top_c]
        w = block.rotate(block.matrix(space.unflatten(v)))[:, top_r][:, :, top_c]
        expected += torch.einsum("nij,kij->nk", g, w)
    assert rel_err(got, expected) <= 1e-10
    assert torch.equal(rows[0], rows[1])


# -- low-rank queries (the unprojected path) ------------------------------------------------------------------
def test_lowrank_queries_at_full_rank_score_exactly_on_every_layer_kind():
    """Conv2d (per position and per example), Embedding with padding, HF Conv1D, Linear; norms and a bare parameter
    exactly: at a rank covering every layer the low-rank scores are the per-example gradients' dot products."""
    from lightning_msif.core.lowrank import LowRankQueries

    model, data, obj, space = _everything()
    v = torch.randn(3, space.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with evaluation(model):
        want = obj.gradients(space) @ v.T
        queries = LowRankQueries(obj, space, v, rank=64)
        got = torch.cat([queries.scores(batch) for batch, _ in obj.batches(range(len(data)))])
        one = LowRankQueries(obj, space, v, rank=1)
        rank_one = torch.cat([one.scores(batch) for batch, _ in obj.batches(range(len(data)))])
    assert rel_err(got, want) <= 1e-12
    assert rel_err(rank_one, want) > 1e-3  # rank 1 truncates these random vectors


def test_lowrank_scoring_is_exact_at_full_rank_and_approaches_it_with_the_rank():
    pre, fine, pt, ft, q = trained_problem("updated", 1.0, 0.1)
    settings = dict(shared="backbone", mode="updated", alpha=1.0, damping=0.1)
    ref = compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), **settings)
    errors = {}
    for rank in (1, 2, 4):  # 4 = min(out, in') of every layer of this net
        got = compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), scoring="lowrank", query_rank=rank,
                                 **settings)
        assert got.info["scoring"] == "lowrank"
        errors[rank] = rel_err(got.scores, ref.scores)
    assert errors[1] > errors[2] > 1e-6 and errors[4] <= 1e-12, errors
    with pytest.raises(MSIFError, match="query_rank must be a positive integer"):
        compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), scoring="lowrank", query_rank=0, **settings)


def test_thin_products_equal_the_formed_gradient_on_convolutions_and_linear_layers():
    """``diagonal_tokens`` (per position; a convolution's by one convolution) against ``⟨G, l rᵀ⟩`` from each example's
    formed gradient: strides, dilation, padding and a bias-free convolution included."""
    from test_curvature_kfac import _Convs

    from lightning_msif.core.kronecker import Block, diagonal_tokens
    from lightning_msif.core.layers import example_grads

    torch.manual_seed(0)
    model = _Convs().double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(5, 2, 8, 13, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (5,), generator=g))
    obj = Objective(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
                    ExampleSource(DataLoader(data, batch_size=5), "data"), "training")
    space = ParamSpace.of(obj.params, [n for n, _ in model.named_parameters()])
    with evaluation(model):
        capture, _ = obj.hooked_backward(space, next(obj.batches(range(5)))[0])
    checked = 0
    for layer in obj.layer_map(space).layers:
        block = Block("kronecker", tuple(layer.names), layer)
        for call in capture.calls.get(layer.path, []):
            whole = block.matrix(example_grads(layer, [call]))  # [B, out, in']
            left = torch.randn(whole.shape[1], 4, generator=g, dtype=torch.float64)
            right = torch.randn(whole.shape[2], 4, generator=g, dtype=torch.float64)
            want = torch.einsum("boi,om,im->bm", whole, left, right)
            assert rel_err(diagonal_tokens(layer, call, left, right), want) <= 1e-12, layer.path
            checked += 1
    assert checked == 4


def test_a_capture_under_bfloat16_autocast_is_close_to_the_full_precision_one():
    torch.manual_seed(0)
    model = Everything().float().eval()
    data = _data()
    obj = Objective(model, _loss, ExampleSource(DataLoader(data, batch_size=4), "data"), "training")
    space = ParamSpace.of(obj.params, [n for n, _ in model.named_parameters()])
    projection = Projection(obj, space, dim=3, seed=1, kind="random")
    stores = {}
    with evaluation(model):
        for autocast in (None, "bfloat16"):
            stores[autocast] = MemoryIndexStore()
            capture_index(obj, projection, stores[autocast], block=4, autocast=autocast)
    full, half = (torch.cat([stores[a][k] for k in sorted(stores[a])]) for a in (None, "bfloat16"))
    assert full.dtype == half.dtype == torch.float32
    assert 1e-5 < rel_err(half, full) < 5e-2  # bf16 really ran, and stayed close
    with pytest.raises(MSIFError, match="autocast must be one of"):
        capture_gradient_index(model, data, MemoryIndexStore(), autocast="int8", loss_fn=_loss)


def test_a_non_finite_or_overflowing_example_is_named_by_its_dataset_index():
    """NaN in an input (caught in the input), and a gradient too large for a float16 index (caught in its rows)."""
    model, data, obj, space = _everything()
    image, ids, y = data.tensors
    for scale, dtype, what in ((float("nan"), "float32", "input data"), (1e7, "float16", "projected gradients")):
        changed = image.clone()
        changed[6] *= scale  # NaN everywhere in example 6, or its image 10⁷ times larger
        bad = Objective(model, _loss, ExampleSource(DataLoader(TensorDataset(changed, ids, y), batch_size=4), "data"),
                        "training")
        with evaluation(model), pytest.raises(MSIFError, match=rf"NaN/inf in the training {what} at dataset indices "
                                                               r"\[6\]"):
            capture_index(bad, Projection(bad, space, dim=2), MemoryIndexStore(), dtype=dtype, block=8)


class _Unused(torch.nn.Module):
    """A net with a layer no example reaches (its gradients are zero; K-FAC makes it a zero diagonal block)."""

    def __init__(self):
        super().__init__()
        self.body, self.spare, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_a_layer_no_example_reaches_is_indexed_by_either_kronecker_curvature(curvature):
    from reference import blobs

    torch.manual_seed(0)
    model, data = _Unused().double(), blobs(9, 3, seed=2)
    arguments = ScoreArguments(curvature=curvature, damping=0.1)
    ref = compute_single_stage(model, loader(data), loader(data), damping=0.1, curvature=curvature)
    index = capture_gradient_index(model, loader(data), MemoryIndexStore(), dim=8, dtype="float64",
                                   arguments=arguments)
    got = compute_single_stage(model, loader(data), loader(data), damping=0.1, curvature=curvature, index=index)
    assert index.projection["balanced"] and rel_err(got.scores, ref.scores) <= 1e-12
