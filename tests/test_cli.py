"""The `msif` command: re-scoring from snapshots, reports to W&B offline, help and bad arguments."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_fixtures import TinyDataModule, TinyModule, trainer
from reference import rel_err
from wandb_offline import run_dir, table

from lightning_msif import MultiStageInfluence, PretrainingSnapshot, SnapshotDir, load_pretrained
from lightning_msif.cli import main

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "msif"
    trainer(callbacks=[PretrainingSnapshot(d)]).fit(TinyModule(), datamodule=TinyDataModule())
    fine = load_pretrained(TinyModule(classes=2, init_seed=1), d)
    cb = MultiStageInfluence(d, mode="updated", alpha=0.5, damping=0.5, solver="cg",
                             solver_options={"tol": 1e-12}, progress=False, report=False)
    trainer(callbacks=[cb]).fit(fine, datamodule=TinyDataModule(n=11, classes=2, seed=5))
    return d


def _msif(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lightning_msif", *args], capture_output=True, text=True, env=env, timeout=300)


def test_score_from_snapshots_reproduces_the_callback(scored, capsys):
    before = MultiStageInfluence.load_scores(scored)
    (scored / "scores.safetensors").unlink()
    assert main(["score", f"snapshot_dir={scored}", "progress=false"]) == 0  # settings: the last run's (updated, cg)
    assert rel_err(MultiStageInfluence.load_scores(scored), before) <= 1e-9
    assert (scored / "report" / "report.html").exists() and (scored / "report" / "top_k.csv").exists()
    assert "scores (13, 5) written" in capsys.readouterr().out


def test_score_with_overrides(scored):
    assert main(["score", f"snapshot_dir={scored}", "solver=exact", "damping=0.5", "report=false", "progress=false"]) == 0
    scores, manifest = SnapshotDir(scored).read_scores()
    assert manifest.solver == "exact" and manifest.mode == "updated"  # mode kept from the last run
    assert rel_err(scores, MultiStageInfluence.load_scores(scored)) == 0.0


def test_score_sets_the_torch_threads_for_its_run(scored):
    """msif score scores with ``threads`` torch threads (1 by default, as the demo), then restores the count."""
    torch.set_num_threads(2)
    for given, used in ((["threads=1"], 1), ([], 1), (["threads=null"], 2)):
        assert main(["score", f"snapshot_dir={scored}", *given, "report=false", "progress=false"]) == 0
        assert SnapshotDir(scored).scores_record().threads == used and torch.get_num_threads() == 2
    assert main(["score", f"snapshot_dir={scored}", "threads=0", "report=false", "progress=false"]) == 2


@pytest.fixture(scope="module")
def fixed_scored(tmp_path_factory) -> Path:
    """Both stages in fixed mode (the backbone frozen while finetuning), scored."""
    d = tmp_path_factory.mktemp("cli_fixed") / "msif"
    trainer(callbacks=[PretrainingSnapshot(d, progress=False)], max_epochs=3).fit(TinyModule(),
                                                                                  datamodule=TinyDataModule())
    fine = load_pretrained(TinyModule(classes=2, init_seed=1, freeze_backbone=True), d)
    cb = MultiStageInfluence(d, mode="fixed", damping=0.5, solver="exact", progress=False, report=False)
    trainer(callbacks=[cb], max_epochs=3).fit(fine, datamodule=TinyDataModule(n=11, classes=2, seed=5))
    return d


@pytest.mark.parametrize("folder, args, message", [
    ("fixed_scored", ["mode=updated", "alpha=0.5", "solver=cg"],
     "mode='updated' assumes the shared embedding is finetuned .* none of its parameters were trained. score it "
     "with mode=fixed"),
    ("scored", ["mode=fixed"], r"mode='fixed' assumes .* \['backbone.0.weight', 'backbone.0.bias'\] were trained. "
     "score it with mode=updated"),
    ("scored", ["shared=head"], "shared='head', but the snapshots were taken with shared='backbone': drop the "
     "setting or give shared=backbone"),
], ids=["updated_on_fixed", "fixed_on_updated", "shared_prefix"])
def test_score_refuses_settings_the_snapshots_contradict_before_any_work(request, folder, args, message, capsys):
    d = request.getfixturevalue(folder)
    scores = (d / "scores.safetensors").read_bytes()
    assert main(["score", f"snapshot_dir={d}", *args, "progress=false"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert (d / "scores.safetensors").read_bytes() == scores and not (d / "work").exists()


def test_report_to_wandb_offline(scored, tmp_path, wandb_env):
    assert main(["report", f"snapshot_dir={scored}", "top_k=2", "wandb.project=msif-cli", "wandb.mode=offline",
                 f"wandb.dir={tmp_path}"]) == 0
    top = table(run_dir(tmp_path), "msif/top_k")
    assert len(top["data"]) == 5 * 2 * 2


def test_report_max_queries_bounds_the_query_sections(scored):
    assert main(["report", f"snapshot_dir={scored}", "top_k=2", "max_queries=2"]) == 0
    page = (scored / "report" / "report.html").read_text(encoding="utf-8")
    assert page.count('class="card query-section"') == 2 and "Showing the first 2 of 5 queries" in page
    assert len((scored / "report" / "top_k.csv").read_text().splitlines()) == 1 + 5 * 2 * 2  # the tables: all


def test_report_without_rebuildable_examples_still_writes_the_tables(scored, tmp_path):
    """A process that cannot import the modules (no PYTHONPATH) reports from the scores alone."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(scored, folder)
    proc = subprocess.run([sys.executable, "-m", "lightning_msif", "report", f"snapshot_dir={folder}", "top_k=2"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    assert "examples not shown" in proc.stderr and "lightning_fixtures" in proc.stderr
    assert (folder / "report" / "report.html").exists()
    assert len((folder / "report" / "top_k.csv").read_text().splitlines()) == 1 + 5 * 2 * 2


@pytest.mark.parametrize("args, message", [
    (["score", "snapshot_dir=x", "bogus=1"], "unknown key 'bogus'"),
    (["score", "snapshot_dir=x", "mode=sideways"], "mode='sideways' is not allowed; choose one of ['fixed', 'updated']"),
    (["report"], "snapshot_dir is required"),
    (["rank"], "unknown command 'rank'"),
    (["score", "snapshot_dir=/nonexistent"], "No pretrain snapshot"),
    (["report", "snapshot_dir=x", "max_queries=-1"], "max_queries=-1: must be an integer ≥ 0"),
    (["score", "snapshot_dir=/nonexistent", "top_k=0"], "top_k=0: must be an integer ≥ 1"),  # before any reading
])
def test_bad_arguments_exit_nonzero_with_a_clear_message(args, message):
    proc = _msif(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_help_lists_the_options():
    proc = _msif("--help")
    assert proc.returncode == 0
    for word in ("msif score", "msif report", "solver_options", "wandb.project", "snapshot_dir"):
        assert word in proc.stdout
    console = Path(sys.executable).parent / "msif"
    assert console.exists() and subprocess.run([str(console), "--help"], capture_output=True, timeout=120).returncode == 0
