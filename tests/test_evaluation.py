"""``evaluate`` / ``msif evaluate`` on a tiny two-stage problem whose both stages are solved to their exact
optimum (tests/reference.py): leave-one-out quality of the exact scores, the baselines, resumable and
cached retraining, two processes sharing the runs, bad input, the CLI and W&B."""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from reference import TinyNet, blobs, brute_force, train_two_stage
from torch.utils.data import DataLoader
from wandb_offline import run_dir, summary, table

from lightning_msif import MSIFError
from lightning_msif.cli import main
from lightning_msif.evaluation import FunctionRecipe, build_recipe, evaluate

PT, FT, Q = blobs(13, 3, seed=1), blobs(11, 3, seed=2), blobs(5, 3, seed=3)  # float64, 3 classes in both stages
DAMPING = 0.1  # the L2 penalty both stages train with, and the influence damping
_FULL: Dict[int, Tuple[TinyNet, TinyNet]] = {}  # full-data models per seed (the slow, from-scratch solve)


def tiny_train(indices: Sequence[int], seed: int, init: Optional[Tuple[TinyNet, TinyNet]] = None):
    """Both stages (fixed mode) at the exact optimum: pretraining ``(1/n) Σ_{i ∈ indices} ℓ_i + λ/2‖·‖²``."""
    indices = list(indices)
    if init is None and len(indices) == len(PT) and seed in _FULL:
        return copy.deepcopy(_FULL[seed])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pre, fine = TinyNet().double(), TinyNet().double()
    if init is not None:
        pre.load_state_dict(init[0].state_dict())
        fine.load_state_dict(init[1].state_dict())
    weights = torch.zeros(len(PT), dtype=torch.float64)
    weights[indices] = 1.0
    train_two_stage(pre, fine, PT, FT, "fixed", damping=DAMPING, pt_weights=weights)
    if init is None and len(indices) == len(PT):
        _FULL[seed] = copy.deepcopy((pre, fine))
    return pre, fine


def tiny_recipe(**config) -> FunctionRecipe:
    """The recipe (also built by name from the CLI: ``recipe=test_evaluation.tiny_recipe``)."""
    return FunctionRecipe(tiny_train, PT, FT, Q, damping=DAMPING, name="tiny", config=config)


class Interrupted(Exception):
    pass


class Calls:
    """``tiny_train`` that records the subset size of every call, and can fail after ``fail_after`` retrains."""

    def __init__(self, fail_after: Optional[int] = None):
        self.sizes: List[int] = []
        self.fail_after = fail_after

    @property
    def retrains(self) -> int:
        return sum(size < len(PT) for size in self.sizes)

    def __call__(self, indices, seed, init=None):
        if self.fail_after is not None and self.retrains >= self.fail_after and len(indices) < len(PT):
            raise Interrupted
        self.sizes.append(len(indices))
        return tiny_train(indices, seed, init)


def counted(calls: Calls) -> FunctionRecipe:
    return FunctionRecipe(calls, PT, FT, Q, damping=DAMPING, name="tiny")


SMALL = dict(loo={"examples": 6}, lds={"subsets": 5, "seeds": [0, 1]}, progress=False)
RUNS = 1 + 6 + 5 * 2  # full set, leave-one-out, LDS subsets × seeds


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_exact_scores_predict_leave_one_out_and_random_ones_do_not(tmp_path):
    result = evaluate(tiny_recipe(), solver="exact", loo={"examples": len(PT)}, lds={"subsets": 0},
                      out_dir=str(tmp_path), progress=False)
    rows = {r["method"]: r for r in result.rows}
    assert list(rows) == ["multistage", "single_stage", "grad_dot", "random"]
    assert rows["multistage"]["loo_pearson"] >= 0.9 and rows["multistage"]["loo_spearman"] >= 0.9, result.table()
    assert abs(rows["random"]["loo_pearson"]) < 0.3 and abs(rows["random"]["loo_spearman"]) < 0.3, result.table()
    assert rows["multistage"]["lds_mean"] is None
    pre, fine = tiny_train(range(len(PT)), 0)
    torch.testing.assert_close(result.scores["multistage"], brute_force(pre, fine, PT, FT, Q, damping=DAMPING))
    # grad_dot: −∇_θ f(q_j) · ∇_θ ℓ_pt(z_i), one example at a time
    theta = lambda model: list(model.backbone.parameters())  # noqa: E731
    flat = lambda loss, model: torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, theta(model))])  # noqa: E731
    g_pt = torch.stack([flat(F.cross_entropy(pre(x[None]), y[None]), pre) for x, y in PT])
    g_q = torch.stack([flat(F.cross_entropy(fine(x[None]), y[None]), fine) for x, y in Q])
    torch.testing.assert_close(result.scores["grad_dot"], -g_pt @ g_q.T)
    out = {p.name for p in tmp_path.iterdir()}
    assert {"evaluation.csv", "evaluation.html", "loo_scatter.png", "evaluation.safetensors", "retrains"} <= out
    assert (tmp_path / "loo_scatter.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "evaluation.html").read_text()
    assert "data:image/png;base64," in page and "multistage" in page and "http" not in page.replace("http-equiv", "")


def test_an_interrupted_evaluation_resumes_and_a_second_one_retrains_nothing(tmp_path):
    first = Calls(fail_after=4)
    with pytest.raises(Interrupted):
        evaluate(counted(first), methods=["multistage"], solver="exact", out_dir=str(tmp_path), **SMALL)
    assert first.retrains == 4
    again = Calls()
    result = evaluate(counted(again), methods=["multistage"], solver="exact", out_dir=str(tmp_path), **SMALL)
    # saved before the interruption: the full-set run and 4 retrains; only the others train now
    assert again.retrains == RUNS - 1 - 4 and result.retrained == RUNS - 5 and result.reused == 5
    other = Calls()  # another solver, other methods: every run comes from the cache
    cached = evaluate(counted(other), methods=["multistage", "random"], solver="cg", solver_options={"tol": 1e-12},
                      out_dir=str(tmp_path), **SMALL)
    assert other.retrains == 0 and cached.retrained == 0 and cached.reused == RUNS
    assert other.sizes == [len(PT)]  # only the scored full-data models, trained in this process
    torch.testing.assert_close(cached.loo_actual, result.loo_actual, rtol=0, atol=0)
    torch.testing.assert_close(cached.scores["multistage"], result.scores["multistage"], rtol=1e-8, atol=1e-10)
    fresh = Calls()  # from scratch instead of warm: other runs
    evaluate(counted(fresh), methods=["random"], warm_start=False, out_dir=str(tmp_path), **SMALL)
    assert fresh.retrains == RUNS - 1


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    calls = Calls()
    result = evaluate(counted(calls), methods=["multistage", "random"], solver="exact", out_dir=out, **SMALL)
    torch.save({"sizes": calls.sizes, "loo": result.loo_actual, "lds": result.lds_losses, "rows": result.rows,
                "retrained": result.retrained}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_share_the_runs_and_agree_with_one(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(tmp_path / "ddp")), nprocs=2)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    shares = [sum(size < len(PT) for size in r["sizes"]) for r in ranks]
    assert sum(shares) == RUNS - 1 and min(shares) >= 1  # every subset trained once, by one of the ranks
    single = evaluate(tiny_recipe(), methods=["multistage", "random"], solver="exact", out_dir=str(tmp_path / "one"),
                      **SMALL)
    for r in ranks:
        assert r["retrained"] == RUNS
        torch.testing.assert_close(r["loo"], single.loo_actual, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r["lds"], single.lds_losses, rtol=1e-9, atol=1e-12)
    assert (tmp_path / "ddp" / "evaluation.csv").exists()


def _returns(out):
    return lambda indices, seed, init=None: out


@pytest.mark.parametrize("recipe, settings, message", [
    (None, dict(lds={"fraction": 1.5}), "lds.fraction=1.5: must lie strictly between 0 and 1"),
    (None, dict(lds={"fraction": 0.01}), "keeps 0 of 13 examples: an empty or full subset"),
    (None, dict(methods=["multistage", "kronfluence"]), "each must be one of"),
    (None, dict(lds={"subsets": 1}), "at least 2 subsets"),
    (None, dict(loo={"indices": [0, 13]}), "distinct pretraining indices in [0, 13)"),
    (None, dict(loo={"examples": 0}, lds={"subsets": 0}), "Nothing to measure"),
    (None, dict(lds={"seeds": []}), "lds.seeds=[]"),
    (None, dict(bogus=1), "Unknown evaluate setting"),
    (None, dict(solver="newton"), "solver='newton' is not allowed"),
    (FunctionRecipe(_returns(TinyNet()), PT, FT, Q), {}, "must return (pretrain_model, finetune_model)"),
    (FunctionRecipe(_returns((TinyNet(), torch.nn.Linear(2, 2))), PT, FT, Q), {},
     "matches no parameter of the finetune"),
    (FunctionRecipe(_returns((TinyNet().double(), TinyNet(classes=2).double())), PT, FT, blobs(5, 2)),
     dict(methods=["single_stage"]), "single_stage baseline evaluates the pretraining loss on the finetuned model"),
    (FunctionRecipe(lambda indices, seed: tiny_train(indices, seed), PT, FT, Q), {}, "has no 'init' parameter"),
    (object(), {}, "is not a two-stage recipe"),
    (FunctionRecipe(tiny_train, DataLoader(PT), FT, Q), {}, "pretrain_data must be a non-empty map-style dataset"),
    ("no_such_module.Recipe", {}, "Cannot build the recipe 'no_such_module.Recipe'"),
])
def test_bad_input_is_refused_with_a_clear_message(tmp_path, recipe, settings, message):
    with pytest.raises(MSIFError) as err:
        evaluate(tiny_recipe() if recipe is None else recipe, methods=settings.pop("methods", ["random"]),
                 out_dir=str(tmp_path), **{**SMALL, **settings})
    assert message in str(err.value)


def test_a_recipe_from_a_hydra_config():
    cfg = OmegaConf.create({"recipe": {"_target_": "test_evaluation.tiny_recipe", "note": "from yaml"}})
    recipe = build_recipe(cfg.recipe)
    assert isinstance(recipe, FunctionRecipe) and recipe.identity()["note"] == "from yaml"


def test_cli_evaluate(tmp_path, capsys):
    args = ["evaluate", "recipe=test_evaluation.tiny_recipe", "recipe_options.note=cli", "methods=[multistage,random]",
            "solver=exact", "loo.examples=4", "lds.subsets=3", "lds.seeds=[0]", f"out_dir={tmp_path}", "progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "multistage" in out and "retraining runs: 8 trained, 0 from the cache" in out
    rows = (tmp_path / "evaluation.csv").read_text().splitlines()
    assert rows[0] == "method,loo_pearson,loo_spearman,lds_mean,lds_std,score_seconds" and len(rows) == 3
    assert main([*args, "solver=cg"]) == 0 and "8 from the cache" in capsys.readouterr().out
    assert main(["evaluate", "lds.fraction=0", f"out_dir={tmp_path}"]) == 2
    assert "lds.fraction=0.0: must lie strictly between 0 and 1" in capsys.readouterr().err


def test_wandb_offline_run_holds_the_table_plots_and_summary(tmp_path, wandb_env):
    import wandb

    run = wandb.init(project="msif-eval-test", mode="offline", dir=str(tmp_path))
    result = evaluate(tiny_recipe(), methods=["multistage", "random"], solver="exact", out_dir=str(tmp_path / "out"),
                      wandb=run, **SMALL)
    run.finish()
    folder = run_dir(tmp_path)
    logged = table(folder, "msif/evaluation")
    assert logged["columns"] == ["method", "loo_pearson", "loo_spearman", "lds_mean", "lds_std", "score_seconds"]
    assert [row[0] for row in logged["data"]] == ["multistage", "random"]
    assert logged["data"][0][1] == pytest.approx(result.rows[0]["loo_pearson"])
    assert len(table(folder, "msif/lds_per_seed")["data"]) == 2 * 2
    assert any(p.name.startswith("loo_scatter") for p in (folder / "files" / "media" / "images" / "msif").iterdir())
    s = summary(folder)
    assert s["msif/eval/multistage/lds_mean"] == pytest.approx(result.rows[0]["lds_mean"])
    assert s["msif/eval/random/loo_pearson"] == pytest.approx(result.rows[1]["loo_pearson"])
