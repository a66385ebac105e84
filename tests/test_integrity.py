"""Integrity of what lightning-msif writes: stage snapshots survive kill -9 at any point, scoring resumes after a
kill -9, the data fingerprint covers every example, every result file is checked against its hash, files get
the user's umask, and a bad report is refused before anything is overwritten."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

import pytest
import torch
from integrity_job import module as tiny_module
from lightning_fixtures import TinyDataModule, TinyModule, trainer
from torch.utils.data import TensorDataset

from lightning_msif import MSIFError, MultiStageInfluence, PretrainingSnapshot, SnapshotDir, load_pretrained, rescore
from lightning_msif.atomic import save_tensors, save_text, temp_path
from lightning_msif.cli import main
from lightning_msif.reports.publish import report_scores
from lightning_msif.snapshots import check_fingerprint, fingerprint

HERE = Path(__file__).parent
def _env(**extra: str) -> dict:
    """The environment of a job subprocess, read when it starts (the session's fixtures set some of it)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), **extra}
NAMES = [f"p{i}" for i in range(26)]  # as tests/integrity_job.py writes the stored gradients


# -- stage snapshots killed at every point -------------------------------------------------------------
def _leftovers(root: Path):
    return [p for p in root.rglob(".*")]


def _check_killed(run: Path) -> Tuple[float, bool]:
    """The folder holds one complete stage, A or B (hash checked), whose extras (stored gradients, fitted
    curvature, gradient index) are all there and intact, or all gone; the next write leaves no temporary file
    or folder behind. Returns the weights' value and whether the extras are there."""
    snapshots = SnapshotDir(run)
    manifest, weights = snapshots.load_stage("pretrain")
    value = float(weights["backbone.weight"].flatten()[0])
    assert value in (1.0, 2.0) and torch.all(weights["head.bias"] == value)
    sha = str(manifest.weights.sha256)
    extras = [run / "pretrain" / "gradients.safetensors", run / "pretrain" / "curvature", snapshots.index_dir]
    present = extras[0].exists()
    assert all(path.exists() == present for path in extras)
    if present:
        assert snapshots.read_gradients(sha, NAMES) is not None
        assert snapshots.factors(sha).get("ekfac-key") is not None
        index = snapshots.read_index(sha, None)
        assert all(index.store.get(key).shape == (2, 3) for key in ("rows.0-2", "rows.2-4"))
    snapshots.write_stage("pretrain", tiny_module(3.0), "backbone")
    assert _leftovers(run) == [], _leftovers(run)
    return value, present


def test_a_stage_snapshot_killed_at_any_point_leaves_the_old_or_the_new_stage_whole(tmp_path):
    job = subprocess.run([sys.executable, str(HERE / "integrity_job.py"), str(tmp_path), "4"], env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr
    steps = json.loads(job.stdout)
    changed = {_check_killed(tmp_path / f"changed-{k}") for k in range(1, steps["changed"] + 1)}
    assert changed == {(1.0, True), (2.0, False)}  # A whole, or B whose weights the extras no longer fit
    same = {_check_killed(tmp_path / f"same-{k}") for k in range(1, steps["same"] + 1)}
    assert same == {(1.0, True)}  # the same weights again: the extras are kept
    assert steps["changed"] >= 10 and steps["same"] > steps["changed"]  # each write was cut at many points
    for i in range(4):  # a writer alternating A and B, killed at random moments
        _check_killed(tmp_path / f"random-{i}")


def test_leftovers_of_dead_writers_are_removed_and_a_live_writer_s_are_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    SnapshotDir(tmp_path).write_stage("pretrain", tiny_module(1.0), "backbone")
    mine = temp_path(tmp_path / "pretrain" / "weights.safetensors")
    dead_tmp = mine.with_name(mine.name.replace(f"-{os.getpid()}.", f"-{dead.stdout.strip()}."))
    dead_stage = (tmp_path / dead_tmp.name.replace(".weights.safetensors.", ".pretrain.")).with_suffix(".new")
    old_style = tmp_path / "work" / ".scores.0.safetensors.k2j4h5.tmp"  # an older version's name: no writer in it
    live = temp_path(tmp_path / "scores.safetensors")  # this process is still writing it
    for path in (dead_tmp, old_style, live):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    (dead_stage / "pretrain").mkdir(parents=True)  # a dead writer's unfinished stage: no manifest yet
    past = time.time() - 3600
    os.utime(old_style, (past, past))
    SnapshotDir(tmp_path).write_stage("pretrain", tiny_module(2.0), "backbone")
    assert not dead_tmp.exists() and not dead_stage.exists() and not old_style.exists()
    assert live.exists()
    assert SnapshotDir(tmp_path).load_stage("pretrain")[1]["head.bias"][0] == 2.0


class _Unreadable:
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        raise OSError(f"example {i}: file not found")


def test_a_stage_write_that_fails_half_way_leaves_the_old_stage_and_no_leftovers(tmp_path):
    SnapshotDir(tmp_path).write_stage("pretrain", tiny_module(1.0), "backbone")
    with pytest.raises(OSError, match="example 0"):
        SnapshotDir(tmp_path).write_stage("pretrain", tiny_module(2.0), "backbone", train_dataset=_Unreadable())
    assert SnapshotDir(tmp_path).load_stage("pretrain")[1]["head.bias"][0] == 1.0
    assert _leftovers(tmp_path) == []


# -- scoring killed with SIGKILL resumes to the identical matrix --------------------------------------------
KILLED_SCORING = """
import os, signal, sys
import lightning_msif.core.objective as objective
import lightning_msif.core.scoring as scoring
from lightning_msif import rescore
scoring.DEFAULT_BLOCK = 3  # 13 examples: 5 blocks
real, calls = objective.Objective.dot_grads, [0]
def dot_grads(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
objective.Objective.dot_grads = dot_grads
rescore(sys.argv[1], progress=False)
"""


def test_scoring_killed_with_sigkill_resumes_to_the_identical_matrix(tmp_path, monkeypatch):
    trainer(callbacks=[PretrainingSnapshot(tmp_path, progress=False)]).fit(TinyModule(), datamodule=TinyDataModule())
    fine = load_pretrained(TinyModule(classes=2, freeze_backbone=True, init_seed=1), tmp_path)
    # scoring pinned: "auto" picks the faster method by timing, which a loaded machine can flip between the runs
    cb = MultiStageInfluence(tmp_path, mode="fixed", damping=0.01, scoring="grad", progress=False, report=False)
    trainer(callbacks=[cb]).fit(fine, datamodule=TinyDataModule(n=11, classes=2, seed=5))
    monkeypatch.setattr("lightning_msif.core.scoring.DEFAULT_BLOCK", 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process: the same reductions, so the same bits
    try:
        full = rescore(tmp_path, progress=False).scores
        killed = subprocess.run([sys.executable, "-c", KILLED_SCORING, str(tmp_path)],
                                env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr
        assert len(list((tmp_path / "work").glob("*/scores.*.safetensors"))) == 2  # two blocks survived the kill
        resumed = rescore(tmp_path, progress=False).scores
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(resumed, full)
    assert not (tmp_path / "work").exists()


# -- the fingerprint covers every example, in order -------------------------------------------------------
def _blobs(n: int = 200) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.arange(n) % 4)


def _changed(kind: str) -> TensorDataset:
    x, y = (t.clone() for t in _blobs().tensors)
    if kind == "one example replaced":
        x[1] += 1e-9
    elif kind == "two examples swapped":
        x[[1, 2]], y[[1, 2]] = x[[2, 1]], y[[2, 1]]
    else:  # 150 of 200 labels changed, none of them at the 32 indices an older version hashed
        sampled = {round(j * 199 / 31) for j in range(32)}
        changed = [i for i in range(200) if i not in sampled][:150]
        y[changed] = (y[changed] + 1) % 4
    return TensorDataset(x, y)


@pytest.mark.parametrize("kind", ["one example replaced", "two examples swapped", "150 of 200 labels changed"])
def test_other_data_is_refused_however_little_changed(kind):
    expected = fingerprint(_blobs())
    check_fingerprint(expected, _blobs(), "pretraining data")  # the same data, rebuilt: accepted
    with pytest.raises(MSIFError, match="pretraining data differs .* an example, a label or the order changed"):
        check_fingerprint(expected, _changed(kind), "pretraining data")


def test_the_fingerprint_reads_dict_and_text_examples_and_refuses_an_older_sampled_one():
    rows = [{"text": f"example {i}", "label": i % 3, "mask": torch.ones(4, dtype=torch.bool)} for i in range(50)]
    edited = [dict(r) for r in rows]
    edited[17] = {**edited[17], "text": "example 17!"}
    assert fingerprint(rows) == fingerprint([dict(r) for r in rows])
    assert fingerprint(rows)["sha256"] != fingerprint(edited)["sha256"]
    assert fingerprint([(1, 23)])["sha256"] != fingerprint([(12, 3)])["sha256"]  # leaves cannot run together
    with pytest.raises(MSIFError, match="older lightning-msif on a sample"):
        check_fingerprint({"n": 50, "sha256": fingerprint(rows)["sha256"]}, rows, "pretraining data")


# -- every result file is checked against its hash --------------------------------------------------------
def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def snapshot(tmp_path) -> SnapshotDir:
    snapshots = SnapshotDir(tmp_path)
    snapshots.write_stage("pretrain", TinyModule(), "backbone", train_dataset=_blobs(13))
    return snapshots


def test_a_changed_byte_in_the_scores_or_their_record_is_refused(snapshot):
    snapshot.write_scores(torch.randn(13, 5, dtype=torch.float64), {"mode": "fixed", "damping": 0.01})
    scores, record = snapshot.read_scores()
    assert scores.shape == (13, 5) and record.damping == 0.01
    _flip_last_byte(snapshot.scores_path)
    with pytest.raises(MSIFError, match="scores.safetensors does not match its content hash.*Score again"):
        snapshot.read_scores()
    snapshot.write_scores(scores, {"mode": "fixed", "damping": 0.01})
    record_path = snapshot.root / "scores.yaml"
    record_path.write_text(record_path.read_text().replace("damping: 0.01", "damping: 0.1"))
    with pytest.raises(MSIFError, match="scores.yaml does not match the hash of its fields"):
        snapshot.read_scores()


def test_a_changed_byte_in_stored_gradients_factors_or_index_rows_is_refused(snapshot):
    sha = str(snapshot.manifest("pretrain").weights.sha256)
    snapshot.write_gradients(torch.randn(13, 26, dtype=torch.float64), NAMES, sha)
    snapshot.factors(sha).put("ekfac-key", {"eig": torch.ones(3)}, {"blocks": []})
    snapshot.open_index({"dim": 2, "n": 13, "block": 13, "weights_sha256": sha}).put("rows.0-13", torch.ones(13, 3))
    snapshot.finish_index({"kind": "random"}, {"dual": torch.ones(3)})
    for path, read, match in (
            (snapshot.root / "pretrain" / "gradients.safetensors", lambda: snapshot.read_gradients(sha, NAMES),
             "gradients.safetensors does not match its content hash.*store_gradients=True, or delete the file"),
            (snapshot.root / "pretrain" / "curvature" / "ekfac-key.safetensors",
             lambda: snapshot.factors(sha).get("ekfac-key"), "ekfac-key.safetensors does not match .*Delete"),
            (snapshot.index_dir / "rows.0-13.safetensors",
             lambda: snapshot.read_index(sha, None).store.get("rows.0-13"),
             "rows.0-13.safetensors does not match its content hash.*Capture the index again")):
        assert read() is not None
        _flip_last_byte(path)
        with pytest.raises(MSIFError, match=match):
            read()


def test_an_edited_trainable_list_or_a_damaged_header_is_refused(snapshot):
    path = snapshot.root / "pretrain" / "manifest.yaml"
    text = path.read_text()
    path.write_text(text.replace("- head.bias\n", ""))
    with pytest.raises(MSIFError, match="manifest.yaml does not match the hash of its fields: it was edited"):
        snapshot.manifest("pretrain")
    path.write_text(text)
    snapshot.write_gradients(torch.ones(13, 26), NAMES, "sha")
    gradients = snapshot.root / "pretrain" / "gradients.safetensors"
    gradients.write_bytes(gradients.read_bytes().replace(b'"F32"', b'"F6$"', 1))
    with pytest.raises(MSIFError, match="gradients.safetensors cannot be read .* damaged"):
        snapshot.read_gradients("sha", NAMES)


# -- files get the user's umask --------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_permissions_open_would_give_them(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        text = save_text(tmp_path / "a.yaml", "a: 1\n")
        tensors = save_tensors(tmp_path / "t.safetensors", {"t": torch.ones(2)})
    finally:
        os.umask(old)
    assert (text.stat().st_mode & 0o777, tensors.stat().st_mode & 0o777) == (mode, mode)


# -- a bad report is refused before anything is written ----------------------------------------------------
def test_report_with_top_k_0_is_refused_before_any_work_and_leaves_the_report_as_it_was(tmp_path, capsys):
    SnapshotDir(tmp_path).write_scores(torch.randn(13, 5, dtype=torch.float64), {"mode": "fixed"})
    assert main(["report", f"snapshot_dir={tmp_path}", "top_k=2"]) == 0
    report = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    assert len(report["top_k.csv"].splitlines()) == 1 + 5 * 2 * 2
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["report", f"snapshot_dir={tmp_path}", "top_k=0"]) == 2
    assert time.perf_counter() - started < 2.0
    assert "top_k=0: must be an integer ≥ 1" in capsys.readouterr().err
    assert main(["score", f"snapshot_dir={tmp_path}", "top_k=0"]) == 2  # refused before scoring, not after
    assert "msif score: top_k=0" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == report


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k=0"),
    (dict(pretrain_data=_blobs(12)), "pretraining data has 12 examples but the scores have 13"),
    (dict(scores=torch.full((13, 5), float("nan"))), "non-finite values, the first at pretraining example 0"),
])
def test_report_scores_refuses_bad_inputs_before_writing(tmp_path, kwargs, match):
    scores = kwargs.pop("scores", torch.randn(13, 5))
    with pytest.raises(MSIFError, match=match):
        report_scores(scores, {}, tmp_path / "report", **kwargs)
    assert not (tmp_path / "report").exists()
