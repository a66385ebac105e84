"""Score matrices too large to hold: streamed to disk block by block, never gathered, reported from the blocks.

The views computed from many small blocks must equal a brute-force reference on the whole matrix (ties broken by
the lower pretraining index); every scoring path (scoring pass by each method, gradient index, stored gradients)
must leave blocks that join to exactly its in-memory matrix; the callback writes them with their hashes and
reports from them, and a block that is missing or changed is refused.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest
import torch
from lightning_fixtures import TinyDataModule, TinyModule, trainer
from omegaconf import OmegaConf
from reference import loader, rel_err, trained_problem

import lightning_msif.core.influence as influence
import lightning_msif.core.scoring as scoring
from lightning_msif import (InfluenceArguments, MSIFError, MemoryIndexStore, MultiStageInfluence, PretrainingSnapshot,
                            SnapshotDir, capture_gradient_index, compute_multistage, load_pretrained,
                            per_example_gradients, rescore)
from lightning_msif.reports.attribution import Attribution

FIXED = dict(mode="fixed", damping=0.01, scoring="grad")  # pinned: "auto" picks by timing (last bits)


class Blocks:
    """A ``ScoreMatrix`` of a tensor cut into blocks of ``size`` rows."""

    def __init__(self, scores: torch.Tensor, size: int):
        self.scores, self.size = scores, size
        self.n, self.k = scores.shape
        self.reads = 0

    def blocks(self) -> Iterator[Tuple[int, torch.Tensor]]:
        self.reads += 1
        for start in range(0, self.n, self.size):
            yield start, self.scores[start:start + self.size]


class DictStore(dict):
    """A ``ScoreStore`` in memory."""

    def get(self, key: str) -> Optional[torch.Tensor]:  # type: ignore[override]
        return super().get(key)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self[key] = tensor.clone()


def _ties(n: int = 23, k: int = 4) -> torch.Tensor:
    """Scores with many exact ties (and zeros), so the order among equal scores is tested."""
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 2).round() / 4


def _reference_top(scores: torch.Tensor, j: int, k: int, harmful: bool):
    key = (lambda i: (-float(scores[i, j]), i)) if harmful else (lambda i: (float(scores[i, j]), i))
    return sorted(range(scores.shape[0]), key=key)[:k]


@pytest.mark.parametrize("size", [1, 3, 7, 23])
def test_views_from_blocks_equal_a_brute_force_reference(size):
    scores, top = _ties(), 5
    labels_p, labels_q = torch.arange(23) % 3, torch.tensor([0, 1, 1, 0])
    blocks = Blocks(scores, size)
    att = Attribution(blocks, pretrain_labels=labels_p, query_labels=labels_q)
    rows = att.top_k(top)
    for j in range(4):
        for side in ("helpful", "harmful"):
            got = [r["pretrain_index"] for r in rows if r["query_index"] == j and r["side"] == side]
            assert got == _reference_top(scores, j, top, side == "harmful")
    # removal candidates: in most queries' top harmful lists (with a positive score), then by positive total
    counts: Dict[int, int] = {}
    for j in range(4):
        for i in _reference_top(scores, j, top, True):
            if scores[i, j] > 0:
                counts[i] = counts.get(i, 0) + 1
    positive = scores.clamp_min(0).sum(1)
    expected = sorted(counts, key=lambda i: (-counts[i], -float(positive[i]), i))
    harmful = att.most_harmful(top)
    assert [r["pretrain_index"] for r in harmful] == expected
    assert [r["mean_score"] for r in harmful] == pytest.approx([float(scores[i].mean()) for i in expected])
    classes = att.class_influence()
    total = torch.stack([torch.stack([scores[labels_p == a][:, labels_q == b].sum() for b in range(2)])
                         for a in range(3)]).double()
    assert torch.allclose(classes["total"], total)
    hist = att.histogram(bins=6)
    edges = torch.linspace(float(scores.min()), float(scores.max()), 7, dtype=torch.float64)
    assert hist["counts"] == torch.histc(scores.double(), 6, float(edges[0]), float(edges[-1])).tolist()
    assert (hist["total"], hist["positive"], hist["negative"]) == (92, int((scores > 0).sum()), int((scores < 0).sum()))
    assert hist["sum_squares"] == pytest.approx(float(scores.double().square().sum()))
    assert blocks.reads == 2  # one pass for every view but the histogram, one for the histogram


def test_a_non_finite_score_in_a_later_block_is_named():
    scores = _ties()
    scores[17, 2] = float("nan")
    with pytest.raises(MSIFError, match="1 non-finite values, the first at pretraining example 17, query 2"):
        Attribution(Blocks(scores, 4)).top_k(3)


@pytest.mark.parametrize("path", ["grad", "jvp", "lowrank", "index", "stored"])
def test_every_scoring_path_streams_blocks_that_join_to_its_matrix(path, monkeypatch):
    monkeypatch.setattr(scoring, "DEFAULT_BLOCK", 4)  # 13 rows: blocks of 4, 4, 4, 1
    monkeypatch.setattr(influence, "DEFAULT_BLOCK", 4)
    pre, fine, pt, ft, q = trained_problem("fixed", damping=0.1)
    extra: dict = {"scoring": path} if path in ("grad", "jvp", "lowrank") else {}
    if path == "index":
        extra["index"] = capture_gradient_index(pre, loader(pt), MemoryIndexStore(), shared="backbone", dim=8,
                                                dtype="float64", block=4)
    if path == "stored":
        extra["pretrain_gradients"] = per_example_gradients(pre, loader(pt), shared="backbone")[0]
    run = lambda **kw: compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), shared="backbone",
                                          damping=0.1, **extra, **kw)
    dense = run()
    store = DictStore()
    streamed = run(store=store, stream_scores=True)
    assert streamed.scores is None and streamed.info["scores"] == "streamed" and dense.info["scores"] == "gathered"
    keys = sorted((k for k in store if k.startswith("scores.")), key=lambda k: int(k.split(".")[1].split("-")[0]))
    assert keys == ["scores.0-4", "scores.4-8", "scores.8-12", "scores.12-13"]
    assert torch.equal(torch.cat([store[k] for k in keys]), dense.scores)
    kept = DictStore()
    assert torch.equal(run(store=kept, stream_scores=False).scores, dense.scores)
    saved = [k for k in kept if k.startswith("scores.")]  # the pass keeps its blocks to resume; a product does not
    assert len(saved) == (4 if path in ("grad", "jvp", "lowrank") else 0), saved


def test_stream_settings_are_checked(monkeypatch):
    pre, fine, pt, ft, q = trained_problem("fixed", damping=0.1)
    run = lambda **kw: compute_multistage(pre, fine, loader(pt), loader(ft), loader(q), shared="backbone",
                                          damping=0.1, **kw)
    with pytest.raises(MSIFError, match="stream_scores=True writes the score matrix block by block to a store"):
        run(stream_scores=True)
    with pytest.raises(MSIFError, match="stream_scores='yes' must be true, false or null"):
        run(stream_scores="yes")
    monkeypatch.setattr(influence, "STREAM_ABOVE_BYTES", 13 * 5 * 8 - 1)  # the 13 × 5 float64 matrix is "large"
    assert run(store=DictStore()).scores is None  # null: streamed by size when there is a store
    assert run().scores is not None  # never without one


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One pretraining run, finetuned twice: scores in memory, and streamed in blocks of 4 rows."""
    root = tmp_path_factory.mktemp("stream")
    dm = TinyDataModule()
    trainer(callbacks=[PretrainingSnapshot(root / "dense", progress=False)]).fit(TinyModule(), datamodule=dm)
    shutil.copytree(root / "dense", root / "streamed")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "DEFAULT_BLOCK", 4)
        for name in ("dense", "streamed"):
            fine = load_pretrained(TinyModule(classes=2, freeze_backbone=True, init_seed=1), root / name)
            cb = MultiStageInfluence(root / name, progress=False, stream_scores=name == "streamed", top_k=3, **FIXED)
            trainer(callbacks=[cb]).fit(fine, datamodule=TinyDataModule(n=11, classes=2, seed=5))
            out[name] = cb
    return root, out


def _arguments(**settings) -> InfluenceArguments:
    return InfluenceArguments(shared="backbone", **FIXED, **settings)


def _csv(path: Path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_the_callback_streams_and_reports_from_the_blocks(two_runs):
    root, cbs = two_runs
    assert cbs["streamed"].scores is None and cbs["dense"].scores is not None
    record = OmegaConf.load(root / "streamed" / "scores.yaml")
    assert record.layout == "blocks" and record.shape == [13, 5] and list(record.blocks) == ["0-4", "4-8", "8-12",
                                                                                             "12-13"]
    assert not (root / "streamed" / "scores.safetensors").exists() and not (root / "streamed" / "work").exists()
    assert torch.equal(MultiStageInfluence.load_scores(root / "streamed"), cbs["dense"].scores)
    for table in ("top_k.csv", "most_harmful.csv", "class_influence_total.csv"):  # the same views, from the blocks
        assert _csv(root / "streamed" / "report" / table) == _csv(root / "dense" / "report" / table)
    files = SnapshotDir(root / "streamed").scores_files  # what a W&B artifact uploads: every block and the record
    assert sorted(f.name for f in files) == sorted([f"scores.{s}.safetensors" for s in record.blocks] + ["scores.yaml"])


def test_a_changed_or_missing_block_is_refused_and_a_matrix_replaces_the_blocks(two_runs, tmp_path):
    root, _ = two_runs
    folder = tmp_path / "copy"
    shutil.copytree(root / "streamed", folder)
    snapshots = SnapshotDir(folder)
    blocks = snapshots.root / snapshots.SCORE_BLOCKS / str(snapshots.scores_record().blocks_folder)
    shutil.copy(blocks / "scores.0-4.safetensors", blocks / "scores.4-8.safetensors")  # another block's file
    with pytest.raises(MSIFError, match="scores.4-8.safetensors is not the block the score record describes"):
        snapshots.read_scores()
    (blocks / "scores.4-8.safetensors").unlink()
    with pytest.raises(MSIFError, match="The score block .*scores.4-8.safetensors is missing. Score again"):
        snapshots.read_scores()
    outcome = rescore(folder, _arguments(stream_scores=False), progress=False)
    dense = MultiStageInfluence.load_scores(root / "dense")
    assert outcome.scores is not None and rel_err(outcome.scores, dense) < 1e-10
    assert not blocks.exists() and snapshots.scores_path.exists()  # the matrix replaced the streamed blocks
    assert rescore(folder, _arguments(stream_scores=True), progress=False).scores is None
    assert not snapshots.scores_path.exists() and snapshots.scores_record().layout == "blocks"


def test_msif_report_from_streamed_blocks_to_wandb_offline(two_runs, tmp_path, wandb_env):
    from wandb_offline import artifacts, run_dir, summary, table

    from lightning_msif.cli import main

    root, _ = two_runs
    folder = tmp_path / "copy"
    shutil.copytree(root / "streamed", folder)
    assert main(["report", f"snapshot_dir={folder}", "top_k=3", "wandb.project=msif-stream", "wandb.mode=offline",
                 f"wandb.dir={tmp_path}"]) == 0
    run = run_dir(tmp_path)
    assert len(table(run, "msif/top_k")["data"]) == 5 * 2 * 3
    assert sum(summary(run)["msif/score_histogram/values"]) == 13 * 5
    (art,) = [a for a in artifacts(run) if a.type == "influence-scores"]  # the matrix travels as its blocks
    staged = {m.path: m.local_path for m in art.manifest.contents}
    assert {"scores.0-4.safetensors", "scores.12-13.safetensors", "scores.yaml"} <= set(staged)
    assert _csv(folder / "report" / "top_k.csv") == _csv(root / "dense" / "report" / "top_k.csv")


def test_blocks_another_node_kept_are_named_as_missing(tmp_path):
    """A rank whose blocks did not reach rank 0's filesystem (several nodes, no shared folder) is refused by name."""
    from lightning_msif.snapshots import FileStore

    store = FileStore(tmp_path / "work")
    for start, stop in ((0, 4), (8, 12), (12, 13)):  # rows 4-8 were written on another node
        store.put(f"scores.{start}-{stop}", torch.zeros(stop - start, 5))
    store.put("solved.rank0", torch.zeros(3))  # the run's other partial results are not blocks
    with pytest.raises(MSIFError, match="some blocks are missing.*shared filesystem.*stream_scores=False"):
        SnapshotDir(tmp_path / "snap").write_score_blocks(store, (13, 5), {"mode": "fixed"})
