"""The two-stage digits task used by the example: data splits, corruption, model plumbing."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("sklearn")

from lightning_msif.demo import DigitsClassifier, DigitsDataModule, load_backbone


def test_splits_are_deterministic_disjoint_and_relabelled() -> None:
    a, b = DigitsDataModule(task="finetune", seed=3), DigitsDataModule(task="finetune", seed=3)
    sources = []
    for split in ("train", "val", "test"):
        da, db = a.dataset(split), b.dataset(split)
        assert torch.equal(da.source_indices, db.source_indices) and torch.equal(da.targets, db.targets)
        assert set(da.targets.tolist()) == set(range(5))
        x, _ = da[0]
        assert x.shape == (64,) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert da.images.shape == (len(da), 8, 8)
        sources.append(set(da.source_indices.tolist()))
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    assert len(a.dataset("val")) == len(a.dataset("test")) == round(0.1 * sum(map(len, sources)))
    assert a.class_names == ["5", "6", "7", "8", "9"]
    other = DigitsDataModule(task="finetune", seed=4).dataset("train").source_indices
    assert not torch.equal(other, a.dataset("train").source_indices)


def test_corrupted_labels_are_wrong_and_recorded() -> None:
    dm = DigitsDataModule(task="pretrain", corrupt_fraction=0.1, seed=0)
    train = dm.train_dataset
    bad = dm.corrupted_indices
    assert len(bad) == round(0.1 * len(train))
    assert torch.equal(bad, DigitsDataModule(task="pretrain", corrupt_fraction=0.1, seed=0).corrupted_indices)
    assert (train.targets[bad] != train.clean_targets[bad]).all()
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[bad] = False
    assert torch.equal(train.targets[keep], train.clean_targets[keep])
    assert len(dm.dataset("val").corrupted_indices) == len(dm.dataset("test").corrupted_indices) == 0
    with pytest.raises(ValueError, match="pretrain task only"):
        DigitsDataModule(task="finetune", corrupt_fraction=0.1)


def test_limit_and_loaders() -> None:
    dm = DigitsDataModule(task="pretrain", limit=50, batch_size=16)
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == 50
    val = [y for _, y in dm.val_dataloader()]
    assert torch.equal(torch.cat(val), dm.dataset("val").targets)


def test_per_example_loss_and_frozen_backbone() -> None:
    dm = DigitsDataModule(task="pretrain", limit=40, batch_size=8)
    model = DigitsClassifier(hidden=8, freeze_backbone=True)
    losses = model.per_example_loss(next(iter(dm.train_dataloader())))
    assert losses.shape == (8,) and losses.dtype == torch.float32
    backbone, head = [p.clone() for p in model.backbone.parameters()], model.head.weight.clone()
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, datamodule=dm)
    assert all(not p.requires_grad and torch.equal(p, q) for p, q in zip(model.backbone.parameters(), backbone))
    assert not torch.equal(model.head.weight, head)
    assert "val_acc" in model.trainer.callback_metrics


def test_load_backbone_copies_only_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source, target = DigitsClassifier(hidden=8), DigitsClassifier(hidden=8)
    head = target.head.weight.clone()
    load_backbone(target, source.state_dict())
    for (name, p), q in zip(source.backbone.named_parameters(), target.backbone.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(target.head.weight, head)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    from_file = DigitsClassifier(hidden=8, pretrained=str(tmp_path / "weights.pt"))
    assert torch.equal(from_file.backbone[0].weight, source.backbone[0].weight)
    with pytest.raises(KeyError, match="backbone"):
        load_backbone(target, {"head.weight": head})


def test_without_scikit_learn_the_digits_task_names_the_extra_that_installs_it() -> None:
    """``msif evaluate recipe=digits`` in a process where sklearn cannot be imported: refused before any training,
    with the install line; and that extra exists and holds scikit-learn."""
    import configparser
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    code = ("import sys; sys.modules['sklearn'] = None; from lightning_msif.cli import main; "
            "sys.exit(main(['evaluate', 'recipe=digits', 'progress=false']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 2 and "pip install 'lightning-msif[digits]'" in proc.stderr, proc.stderr
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    assert "scikit-learn" in setup["options.extras_require"]["digits"]
    assert '"lightning-msif[digits]"' in (root / "README.md").read_text(encoding="utf-8")


def test_a_stage_shows_one_bar_over_its_epochs(monkeypatch) -> None:
    """The demo's training: one bar for the whole stage (epochs done of max_epochs, so the time left is the stage's)."""
    import io
    import re

    from lightning_msif.demo import EpochProgress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    dm = DigitsDataModule(task="pretrain", limit=40, batch_size=16)
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[EpochProgress("[pretrain] training")]).fit(
        DigitsClassifier(hidden=8), datamodule=dm)
    assert re.search(r"\[pretrain\] training: .*\| \d/3 \[", screen.getvalue()), screen.getvalue()  # epochs of 3
