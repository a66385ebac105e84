"""Real multi-process DDP (2 CPU processes, gloo): scores equal the single-process computation."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_job import INDEX, SETTINGS
from lightning_fixtures import TinyDataModule, TinyModule
from omegaconf import OmegaConf
from reference import rel_err
from safetensors.torch import load_file

from lightning_msif import MemoryIndexStore, MultiStageInfluence, capture_gradient_index, multistage_influence, rescore

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_job.py"), str(out), "2"], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _weights(folder: Path, stage: str, module: torch.nn.Module) -> torch.nn.Module:
    module.load_state_dict(load_file(str(folder / stage / "weights.safetensors")))
    return module


@pytest.mark.parametrize("name", list(SETTINGS))
def test_ddp_scores_equal_single_process(ddp_run: Path, name: str) -> None:
    folder = ddp_run / name
    manifest = OmegaConf.load(folder / "scores.yaml")
    assert manifest.world_size == 2
    scores = MultiStageInfluence.load_scores(folder)
    assert scores.shape == (13, 7)  # 13 pretraining examples over 2 ranks: not divisible
    pre = _weights(folder, "pretrain", TinyModule())
    fine = _weights(folder, "finetune", TinyModule(classes=2, freeze_backbone=name == "fixed", init_seed=1))
    pt, ft = TinyDataModule(n=13), TinyDataModule(n=11, n_val=7, classes=2, seed=5)
    pt.setup("fit")
    ft.setup("fit")
    settings = dict(SETTINGS[name])
    options = settings.pop("solver_options", {})
    settings.pop("stream_scores", None)  # one process, in memory: the streamed blocks must equal its matrix
    index = None
    if name == "fixed":  # the index both ranks wrote (blocks dealt round-robin) equals one process's, file by file
        index = capture_gradient_index(pre, pt.train_set, MemoryIndexStore(), shared="backbone", dim=INDEX["index_dim"],
                                       block=INDEX["index_block"])
        files = sorted((folder / "pretrain" / "index").glob("rows.*.safetensors"))
        assert [f.name.removesuffix(".safetensors") for f in files] == sorted(index.store)
        for f in files:
            assert torch.allclose(load_file(str(f))["rows"], index.store[f.name.removesuffix(".safetensors")],
                                  rtol=1e-5, atol=1e-7)
    single = multistage_influence(pre, fine, pt.train_set, ft.train_set, ft.val_set, shared="backbone",
                                  **settings, **options, index=index)
    assert rel_err(scores, single) <= 1e-6
    # the finetune stage ran the updated-mode solve to convergence on both ranks
    if name == "updated":
        assert manifest.info.solves.pretrain.converged
        assert manifest.info.scoring == "stored_gradients"  # gathered from both ranks, rows in dataset order
    else:
        assert manifest.info.scoring == "gradient_index"
        # streamed: blocks of 4 rows written by both ranks (never gathered), named with their hashes by the record
        assert manifest.layout == "blocks" and list(manifest.blocks) == ["0-4", "4-8", "8-12", "12-13"]
        assert not (folder / "scores.safetensors").exists()


def test_rescore_from_ddp_snapshots(ddp_run: Path) -> None:
    """A later single process re-scores from the snapshots alone (modules and data rebuilt from records)."""
    folder = ddp_run / "fixed"
    before = MultiStageInfluence.load_scores(folder)
    assert rescore(folder, progress=False).scores is None  # the last run's settings: streamed to disk again
    again = MultiStageInfluence.load_scores(folder)
    assert rel_err(again, before) <= 1e-10


def test_bert_with_default_settings_under_ddp_equals_one_process(tmp_path_factory) -> None:
    """EK-FAC factors all-reduced over 2 ranks, sampled labels per dataset index, hooks-based gradients: the
    2-process scores equal a single-process rescoring of the same snapshots (n = 25 is odd)."""
    out = tmp_path_factory.mktemp("ddp_bert")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_real_job.py"), str(out), "2"], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    record = OmegaConf.load(out / "scores.yaml")
    assert record.world_size == 2 and record.info.curvature.pretrain.name == "ekfac"
    ddp = MultiStageInfluence.load_scores(out)
    single = rescore(out, progress=False).scores
    assert ddp.shape == (25, 7) and torch.isfinite(ddp).all()
    assert rel_err(ddp, single) <= 1e-4  # float32 models: only the order of the sums differs


def test_a_rank_killed_while_scoring_stops_the_job_with_an_error(tmp_path) -> None:
    """Rank 1 is SIGKILLed inside the scoring pass: rank 0 must not wait for it forever, and no scores are
    written. The job runs in its own session, so nothing it started outlives the test."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "ddp_rank_dies_job.py"), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the job
        except ProcessLookupError:
            pass
    assert proc.returncode != 0, err[-3000:]
    assert (tmp_path / "pretrain" / "manifest.yaml").exists()  # it got as far as scoring
    assert not (tmp_path / "scores.safetensors").exists()
