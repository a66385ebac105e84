"""Properties docs/math.md requires: limits, special cases, invariances, and the resumable store.

Correctness is always judged against the brute-force reference (tests/reference.py); library runs
are compared with each other only for properties that are about reproducibility (the store).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import solved_case, TinyNet, blobs, brute_force, brute_force_single, loader, problem, rel_err, trained_problem
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_msif import compute_multistage, multistage_influence, single_stage_influence

pytestmark = pytest.mark.usefixtures("single_thread")

DAMPING = 0.1
ALPHA = 1.0
MODES = ("fixed", "updated")


def _case(mode: str):
    """The trained problem of ``mode`` and its brute-force scores (cached in ``reference``)."""
    return solved_case(mode, ALPHA, DAMPING)


def _run(pre, fine, pt, ft, q, mode, alpha, **kw):
    kw.setdefault("damping", DAMPING)
    return multistage_influence(pre, fine, pt, ft, q, shared="backbone", mode=mode, alpha=alpha, **kw)


def _ce(scale: float = 1.0):
    return lambda model, batch: scale * F.cross_entropy(model(batch[0]), batch[1], reduction="none")


# -- limits and special cases ------------------------------------------------------------------------


def test_updated_mode_tends_to_fixed_mode_as_alpha_grows():
    """Each model finetuned to its own optimum; the gap to the fixed-mode score shrinks like 1/α."""
    pre, fine, pt, ft, q, _, fixed_ref = _case("fixed")
    fixed = _run(pre, fine, loader(pt), loader(ft), loader(q), "fixed", None)
    assert rel_err(fixed, fixed_ref) <= 1e-8
    gaps = []
    for alpha in (1e2, 1e4, 1e6):
        pre, fine, pt, ft, q = trained_problem("updated", alpha, DAMPING)
        updated = _run(pre, fine, loader(pt), loader(ft), loader(q), "updated", alpha)
        ref = brute_force(pre, fine, pt, ft, q, mode="updated", alpha=alpha, damping=DAMPING)
        assert rel_err(updated, ref) <= 1e-7
        gaps.append(rel_err(updated, fixed))
    assert gaps[0] > 1e-4  # at α = 100 the modes still differ measurably
    assert gaps[1] <= gaps[0] / 20 and gaps[2] <= gaps[1] / 20, gaps
    assert gaps[2] <= 1e-5, gaps


class Wrapped(nn.Module):
    """Every parameter under ``backbone.``: neither stage has a head of its own."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.backbone = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_single_stage_equals_fixed_mode_when_every_parameter_is_shared():
    net, _, train, _, q = trained_problem("fixed", None, DAMPING)
    model = Wrapped(net)
    ref = brute_force_single(model, train, q, damping=DAMPING)
    result = compute_multistage(model, model, loader(train), loader(blobs(7, 3, seed=11)), loader(q),
                                shared="backbone", mode="fixed", damping=DAMPING)
    assert result.info["dim_u"] == 0 and result.info["dim_w"] == 0
    single = single_stage_influence(model, loader(train), loader(q), damping=DAMPING)
    assert rel_err(single, ref) <= 1e-8
    assert rel_err(result.scores, ref) <= 1e-8
    assert rel_err(result.scores, single) <= 1e-12


# -- invariances ---------------------------------------------------------------------------------------


def _reversed_loader(data: TensorDataset, batch_size: int) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, sampler=list(reversed(range(len(data)))))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [
    lambda d: loader(d, 1),
    lambda d: loader(d, 3, shuffle=True),
    lambda d: loader(d, 64, shuffle=True),
    lambda d: _reversed_loader(d, 5),
    lambda d: d,  # a map-style Dataset, no loader
    lambda d: DataLoader(d, batch_sampler=[[0, 2], [1, 3], list(range(4, len(d)))[::-1]]),  # each example once
    lambda d: DataLoader([(d.tensors[0][i : i + 4], d.tensors[1][i : i + 4]) for i in range(0, len(d), 4)],
                         batch_size=None),  # items that are already batches
], ids=["batch1", "batch3-shuffled", "batch64-shuffled", "batch5-reversed-sampler", "dataset", "batch-sampler",
        "pre-batched"])
def test_scores_do_not_depend_on_batching_or_order(mode, make):
    """Rows are pretraining dataset indices, columns query dataset indices, whatever the loader."""
    pre, fine, pt, ft, q, alpha, ref = _case(mode)
    torch.manual_seed(123)  # the shuffled loaders' order
    scores = _run(pre, fine, make(pt), make(ft), make(q), mode, alpha)
    assert rel_err(scores, ref) <= 1e-8


def test_rows_are_dataset_indices_for_a_low_precision_model():
    model = TinyNet().to(torch.bfloat16)
    train, q = blobs(600, 3, seed=31), blobs(2, 3, seed=32)
    scores = single_stage_influence(model, loader(train, 600), q, damping=0.1)
    x, y = train.tensors
    back = TensorDataset(x.flip(0), y.flip(0))
    reversed_scores = single_stage_influence(model, loader(back, 600), q, damping=0.1)
    assert scores.shape == (600, 2) and torch.isfinite(scores).all()
    assert rel_err(reversed_scores.flip(0).double(), scores.double()) <= 0.05


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", [
    dict(chunk_size=1), dict(chunk_size=2, scoring="jvp"), dict(chunk_size=5, scoring="grad"),
    dict(rhs_chunk_size=1), dict(rhs_chunk_size=3), dict(rhs_chunk_size=None, chunk_size=3),
    dict(rhs_chunk_size=1, solver="cg", tol=1e-12),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_scores_do_not_depend_on_chunking(mode, options):
    pre, fine, pt, ft, q, alpha, ref = _case(mode)
    scores = _run(pre, fine, loader(pt), loader(ft), loader(q), mode, alpha, **options)
    assert rel_err(scores, ref) <= (1e-8 if options.get("solver") != "cg" else 1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_hessian_samples_at_least_n_is_the_full_hessian(mode):
    pre, fine, pt, ft, q, alpha, ref = _case(mode)
    for samples in (len(pt), 1000):
        scores = _run(pre, fine, loader(pt), loader(ft), loader(q), mode, alpha, hessian_samples=samples)
        assert rel_err(scores, ref) <= 1e-8


def test_hessian_samples_takes_the_curvature_from_a_subset_only():
    """hessian_samples=12 of 13 pretraining examples (all 11 finetune ones): the pretraining Hessian
    is the mean over 12 of them, gradients still cover every example: exactly one leave-one-out
    Hessian reproduces the scores."""
    pre, fine, pt, ft, q, _alpha, full = _case("fixed")
    scores = _run(pre, fine, loader(pt), loader(ft), loader(q), "fixed", None, hessian_samples=12)
    assert scores.shape == full.shape
    x, y = pt.tensors
    errs = []
    for left_out in range(len(pt)):
        keep = [i for i in range(len(pt)) if i != left_out]
        ref = brute_force(pre, fine, pt, ft, q, damping=DAMPING, pt_hessian=TensorDataset(x[keep], y[keep]))
        errs.append(rel_err(scores, ref))
    assert sum(e <= 1e-8 for e in errs) == 1, errs
    assert rel_err(scores, full) > 1e-4


# -- data and loss forms -------------------------------------------------------------------------------


def _batches(data: TensorDataset, size: int):
    x, y = data.tensors
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


@pytest.mark.parametrize("mode", MODES)
def test_plain_list_of_batches_works_like_a_dataloader(mode):
    pre, fine, pt, ft, q, alpha, ref = _case(mode)
    scores = _run(pre, fine, _batches(pt, 4), _batches(ft, 3), iter(_batches(q, 2)), mode, alpha)
    assert rel_err(scores, ref) <= 1e-8
    model = pre
    single = single_stage_influence(model, _batches(pt, 5), _batches(q, 5), damping=DAMPING)
    assert rel_err(single, brute_force_single(model, pt, q, damping=DAMPING)) <= 1e-8


def test_dict_batches_with_a_custom_loss():
    pre, fine, pt, ft, q, _alpha, ref = _case("fixed")
    as_dicts = lambda d: [{"x": x, "y": y} for x, y in _batches(d, 4)]
    loss = lambda model, batch: F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
    scores = _run(pre, fine, as_dicts(pt), as_dicts(ft), as_dicts(q), "fixed", None, loss_fn=loss)
    assert rel_err(scores, ref) <= 1e-8


def test_each_loss_keyword_is_used_for_its_stage():
    """Scaling every loss by c and λ by c scales S by c (fixed mode); the query alone by c too."""
    pre, fine, pt, ft, q, _alpha, ref = _case("fixed")
    data = (loader(pt), loader(ft), loader(q))
    s = _run(pre, fine, *data, "fixed", None, loss_fn=_ce(2.0), damping=2 * DAMPING)
    assert rel_err(s, 2 * ref) <= 1e-8
    s = _run(pre, fine, *data, "fixed", None, loss_fn=_ce(7.0), pretrain_loss_fn=_ce(2.0),
             finetune_loss_fn=_ce(2.0), query_fn=_ce(2.0), damping=2 * DAMPING)
    assert rel_err(s, 2 * ref) <= 1e-8
    s = _run(pre, fine, *data, "fixed", None, query_fn=_ce(3.0))
    assert rel_err(s, 3 * ref) <= 1e-8
    s = single_stage_influence(pre, loader(pt), loader(q), damping=DAMPING, query_fn=_ce(3.0))
    assert rel_err(s, 3 * brute_force_single(pre, pt, q, damping=DAMPING)) <= 1e-8


def test_frozen_parameters():
    """A frozen shared module is still θ; a frozen parameter outside it is a constant."""
    pre, fine, pt, ft, q, _alpha, ref = _case("fixed")
    fine.backbone.requires_grad_(False)  # how fixed-mode finetuning is usually run
    assert rel_err(_run(pre, fine, loader(pt), loader(ft), loader(q), "fixed", None), ref) <= 1e-8
    pre.head.bias.requires_grad_(False)  # U without the pretraining head's bias
    ref = brute_force(pre, fine, pt, ft, q, damping=DAMPING)
    assert rel_err(_run(pre, fine, loader(pt), loader(ft), loader(q), "fixed", None), ref) <= 1e-8
    model = problem(seed=3)[0]
    model.backbone.requires_grad_(False)
    ref = brute_force_single(model, pt, q, damping=DAMPING)
    assert rel_err(single_stage_influence(model, loader(pt), loader(q), damping=DAMPING), ref) <= 1e-8


def test_models_are_left_as_they_were_and_no_grad_contexts_are_fine():
    pre, fine, pt, ft, q, alpha, ref = _case("updated")
    pre.train(), fine.eval()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (pre, fine)]
    with torch.no_grad():
        scores = _run(pre, fine, loader(pt), loader(ft), loader(q), "updated", alpha)
    assert rel_err(scores, ref) <= 1e-8
    with torch.inference_mode():
        scores = _run(pre, fine, loader(pt), loader(ft), loader(q), "updated", alpha)
    assert rel_err(scores, ref) <= 1e-8
    assert pre.training and not fine.training
    for m, state in zip((pre, fine), before):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
        assert all(p.grad is None for p in m.parameters())


# -- the resumable store ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES + ("single",))
def test_store_second_run_reuses_solution_and_blocks(mode, make_store, solve_calls):
    if mode == "single":
        model, _, pt, _, q = trained_problem("fixed", None, DAMPING)
        ref = brute_force_single(model, pt, q, damping=DAMPING)
        run = lambda store: single_stage_influence(model, loader(pt), loader(q), damping=DAMPING, store=store)
    else:
        pre, fine, pt, ft, q, alpha, ref = _case(mode)
        run = lambda store: _run(pre, fine, loader(pt), loader(ft), loader(q), mode, alpha, store=store)
    store = make_store()
    first = run(store)
    assert rel_err(first, ref) <= 1e-8
    assert len(solve_calls) == (1 if mode == "single" else 2)
    assert len(store.data) >= 2 and not store.hits  # the solution and at least one block of scores
    store.gets.clear(), store.puts.clear(), solve_calls.clear()
    second = run(store)
    assert torch.equal(second, first)
    assert solve_calls == [] and store.puts == []
    assert sorted(store.hits) == sorted(store.data)  # every stored piece was reused


def test_partial_store_resumes_only_what_is_missing(make_store, solve_calls):
    """4103 training examples: more than one block of scores. Drop any one stored piece: only that
    piece is recomputed (the solve only when the solution was the piece), and the result is identical."""
    model = trained_problem("fixed", None, DAMPING)[0]
    train, q = blobs(4103, 3, seed=21), blobs(4, 3, seed=22)
    run = lambda store: single_stage_influence(model, loader(train, 1024), loader(q), damping=DAMPING, store=store)
    store = make_store()
    first = run(store)
    assert len(store.data) >= 3, sorted(store.data)  # the solution and ≥ 2 blocks of scores
    # rows on both sides of every block boundary are dataset rows (brute force on a few rows)
    rows = [0, 1, 2047, 4095, 4096, 4097, 4102]
    x, y = train.tensors
    ref = brute_force_single(model, TensorDataset(x[rows], y[rows]), q, damping=DAMPING, hessian_data=train)
    assert rel_err(first[rows], ref) <= 1e-8
    solves_per_key = {}
    for key in sorted(store.data):
        partial = store.without(key)
        solve_calls.clear()
        again = run(partial)
        if key.startswith("scoring_method"):  # "auto" times both methods again and may take the other way
            assert rel_err(again, first) <= 1e-12, key
        else:
            assert torch.equal(again, first), key
        assert partial.puts == [key], (key, partial.puts)
        solves_per_key[key] = len(solve_calls)
    assert sorted(solves_per_key.values()) == [0] * (len(store.data) - 1) + [1], solves_per_key
    # every score block gone (the solution and the method "auto" chose kept): no solve, every block recomputed
    solution = next(k for k, v in solves_per_key.items() if v == 1)
    kept = {solution} | {k for k in store.data if k.startswith("scoring_method")}
    partial = make_store()
    partial.data.update({k: store.data[k] for k in kept})
    solve_calls.clear()
    assert torch.equal(run(partial), first)
    assert solve_calls == [] and sorted(partial.puts) == sorted(set(store.data) - kept)


def test_store_in_multistage_partial_resume(make_store, solve_calls):
    pre, fine, pt, ft, q, alpha, _ref = _case("updated")
    run = lambda store: _run(pre, fine, loader(pt), loader(ft), loader(q), "updated", alpha, store=store)
    store = make_store()
    first = run(store)
    for key in sorted(store.data):
        partial = store.without(key)
        solve_calls.clear()
        assert torch.equal(run(partial), first)
        assert partial.puts == [key]
        assert len(solve_calls) in (0, 2)  # both solves (finetune side then pretrain side) or none
