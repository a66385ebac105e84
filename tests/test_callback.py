"""The callback with a real Trainer: scores, snapshots, resume, and every inconsistency between stages."""
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning_fixtures import TinyDataModule, TinyModule, trainer
from omegaconf import OmegaConf
from reference import rel_err
from safetensors.torch import load_file
from test_precision import DefaultDtypeModule, Float32Blobs, _float64
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_msif.core.objective as objective
from lightning_msif import (MemoryIndexStore, MSIFError, MultiStageInfluence, PretrainingSnapshot, SnapshotDir,
                            load_pretrained, multistage_influence, rescore)
from lightning_msif.core.influence import capture_gradient_index, compute_single_stage

UPDATED = dict(mode="updated", alpha=0.5, damping=0.01)
FIXED = dict(mode="fixed", damping=0.01)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining run with its snapshot; returns (snapshot dir, module, datamodule)."""
    d = tmp_path_factory.mktemp("msif")
    dm, module = TinyDataModule(), TinyModule()
    trainer(callbacks=[PretrainingSnapshot(d)]).fit(module, datamodule=dm)
    return d, module, dm


def _finetune(d: Path, settings: dict, **kwargs):
    fine = TinyModule(classes=2, freeze_backbone=settings["mode"] == "fixed", init_seed=1)
    load_pretrained(fine, d)
    dm = TinyDataModule(n=11, classes=2, seed=5)
    cb = MultiStageInfluence(d, progress=False, **settings, **kwargs)
    trainer(callbacks=[cb]).fit(fine, datamodule=dm)
    return cb, fine, dm


@pytest.mark.parametrize("settings", [FIXED, UPDATED], ids=["fixed", "updated"])
def test_callback_scores_equal_functional_api(pretrained, settings):
    d, pre, pre_dm = pretrained
    cb, fine, dm = _finetune(d, settings, enforce_proximal=settings["mode"] == "updated")
    ref = multistage_influence(pre, fine, pre_dm.train_set, dm.train_set, dm.val_set, shared="backbone", **settings)
    assert cb.scores.shape == (13, 5) and cb.scores.dtype == torch.float64
    assert rel_err(cb.scores, ref) <= 1e-6
    assert torch.equal(MultiStageInfluence.load_scores(d), cb.scores)
    assert not (d / "work").exists()  # partial results are removed once the matrix is written


def test_snapshot_round_trip(pretrained):
    d, pre, pre_dm = pretrained
    manifest = SnapshotDir(d).manifest("pretrain")
    assert manifest.format_version == 1 and manifest.stage == "pretrain"
    assert dict(manifest.shared_params) == {"backbone.0.weight": [4, 3], "backbone.0.bias": [4]}
    assert manifest.module.class_path == "lightning_fixtures.TinyModule"
    assert manifest.data.class_path == "lightning_fixtures.TinyDataModule"
    assert manifest.fingerprint.n == 13
    fine = load_pretrained(TinyModule(classes=2, init_seed=7), d)
    assert torch.equal(fine.backbone[0].weight, pre.backbone[0].weight)


def test_enforce_proximal_adds_alpha_times_displacement(pretrained):
    d, pre, _ = pretrained
    fine = load_pretrained(TinyModule(classes=2, init_seed=1), d)
    cb = MultiStageInfluence(d, enforce_proximal=True, **UPDATED)
    cb.setup(SimpleNamespace(strategy=trainer().strategy, local_rank=0), fine, "fit")
    w = fine.backbone[0].weight
    with torch.no_grad():
        w.add_(1.0)
    w.grad = torch.zeros_like(w)
    cb.on_before_optimizer_step(None, fine, torch.optim.SGD(fine.parameters(), lr=0.1))
    assert torch.allclose(w.grad, torch.full_like(w, 0.5))


def test_resume_after_interruption(pretrained, monkeypatch):
    d, _, _ = pretrained
    cb, _, _ = _finetune(d, FIXED)
    full = cb.scores
    monkeypatch.setattr("lightning_msif.core.scoring.DEFAULT_BLOCK", 3)  # 13 examples → 5 blocks
    calls = {"n": 0}
    original = objective.Objective.dot_grads

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(objective.Objective, "dot_grads", flaky)
    with pytest.raises(KeyboardInterrupt):
        rescore(d, progress=False)
    assert len(list((d / "work").glob("*/scores.*"))) == 2  # two blocks survived the interruption
    solves = {"n": 0}
    import lightning_msif.core.influence as influence

    real_solve = influence.solve
    monkeypatch.setattr(influence, "solve", lambda *a, **k: (solves.__setitem__("n", solves["n"] + 1), real_solve(*a, **k))[1])
    calls["n"] = -100
    resumed = rescore(d, progress=False).scores
    assert calls["n"] == -100 + 3  # only the 3 missing blocks were computed
    assert solves["n"] == 0  # the pretrain-side solution was reused
    assert rel_err(resumed, full) <= 1e-12


def test_state_dict_is_small_and_weights_only(pretrained, tmp_path):
    d, _, _ = pretrained
    cb = MultiStageInfluence(d)
    torch.save(cb.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == cb.state_dict()


# -- inconsistencies are refused in setup, before training ---------------------------------------------
def _expect_setup_error(d, module, match, **kwargs):
    settings = {**FIXED, **kwargs}
    cb = MultiStageInfluence(d, progress=False, **settings)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(MSIFError, match=match):
        trainer(callbacks=[cb]).fit(module, datamodule=TinyDataModule(n=11, classes=2, seed=5))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # no training step ran


def test_missing_snapshot(tmp_path):
    _expect_setup_error(tmp_path, TinyModule(classes=2, freeze_backbone=True), "No pretrain snapshot")


def test_other_shared_prefix(pretrained):
    _expect_setup_error(pretrained[0], load_pretrained(TinyModule(classes=2, freeze_backbone=True), pretrained[0]),
                        "shared='head'", shared="head")


def test_other_shared_shapes(pretrained):
    _expect_setup_error(pretrained[0], TinyModule(classes=2, hidden=5, freeze_backbone=True), "other shapes")


def test_fixed_mode_with_changed_backbone(pretrained):
    _expect_setup_error(pretrained[0], TinyModule(classes=2, freeze_backbone=True, init_seed=9), "differ from the pretraining")


def test_fixed_mode_with_trainable_backbone(pretrained):
    _expect_setup_error(pretrained[0], load_pretrained(TinyModule(classes=2), pretrained[0]), "frozen")


def test_other_pretraining_data(pretrained):
    other = TensorDataset(torch.randn(13, 3, dtype=torch.float64), torch.zeros(13, dtype=torch.long))
    module = load_pretrained(TinyModule(classes=2, freeze_backbone=True), pretrained[0])
    _expect_setup_error(pretrained[0], module, "differs from the one the pretraining snapshot", pretrain_data=other)


def test_snapshot_from_another_format_version(pretrained, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(pretrained[0] / "pretrain", d / "pretrain")
    manifest = OmegaConf.load(d / "pretrain" / "manifest.yaml")
    manifest.format_version = 999
    OmegaConf.save(manifest, d / "pretrain" / "manifest.yaml")
    _expect_setup_error(d, TinyModule(classes=2, freeze_backbone=True), "format version 999")


def test_tampered_weights(pretrained, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(pretrained[0] / "pretrain", d / "pretrain")
    with open(d / "pretrain" / "weights.safetensors", "ab") as fh:
        fh.write(b"x")
    _expect_setup_error(d, TinyModule(classes=2, freeze_backbone=True), "do not match the hash")


def test_unsupported_strategy(pretrained):
    cb = MultiStageInfluence(pretrained[0])
    with pytest.raises(MSIFError, match="FSDPStrategy"):
        cb.setup(SimpleNamespace(strategy=FSDPStrategy()), TinyModule(classes=2), "fit")


def test_module_without_a_per_example_loss(pretrained):
    """A module with no per_example_loss and non-(x, y) batches gets the three ways in the error."""
    d = pretrained[0]

    class DictModule(TinyModule):
        per_example_loss = None

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    fine = load_pretrained(DictModule(classes=2, freeze_backbone=True), d)
    data = [{"x": torch.randn(3, dtype=torch.float64), "y": torch.tensor(i % 2)} for i in range(6)]
    loader = DataLoader(data, batch_size=3)
    cb = MultiStageInfluence(d, query=loader, progress=False, **FIXED)
    with pytest.raises(MSIFError, match=r"per_example_loss.*loss_fn.*\(x, y\)"):
        trainer(callbacks=[cb]).fit(fine, train_dataloaders=loader)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="updated"), "alpha"),
    (dict(solver="newton"), "solver='newton'"),
    (dict(query="train"), "query='train'"),
    (dict(damping=-1.0), "damping"),
    (dict(enforce_proximal=True), "enforce_proximal"),
    (dict(solver_options={"tolerance": 1}), "Unknown solver option"),
    (dict(stage="finetune"), r"unknown setting\(s\) \['stage'\]"),
    (dict(max_queries=-1), "max_queries=-1: must be an integer ≥ 0"),
    (dict(top_k=0), "top_k=0: must be an integer ≥ 1"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(MSIFError, match=match):
        MultiStageInfluence(tmp_path, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(shared="backbone."), "not a parameter-name prefix"),
    (dict(snapshot_every_n_epochs=0), "snapshot_every_n_epochs=0"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
])
def test_bad_pretraining_arguments(tmp_path, kwargs, match):
    with pytest.raises(MSIFError, match=match):
        PretrainingSnapshot(tmp_path, **kwargs)


def test_stored_pretraining_gradients_replace_the_scoring_pass(tmp_path, monkeypatch):
    dm, module = TinyDataModule(), TinyModule()
    pre_cb = PretrainingSnapshot(tmp_path, store_gradients=True, progress=False)
    trainer(callbacks=[pre_cb]).fit(module, datamodule=dm)
    assert (tmp_path / "pretrain" / "gradients.safetensors").exists()
    cb, fine, ft_dm = _finetune(tmp_path, FIXED)
    assert cb.info["scoring"] == "stored_gradients"
    ref = multistage_influence(module, fine, dm.train_set, ft_dm.train_set, ft_dm.val_set, shared="backbone", **FIXED)
    assert rel_err(cb.scores, ref) <= 1e-10


def test_a_gradient_index_captured_at_the_end_of_pretraining_replaces_the_scoring_pass(tmp_path):
    dm, module = TinyDataModule(), TinyModule()
    pre_cb = PretrainingSnapshot(tmp_path, index_dim=8, index_dtype="float64", progress=False)  # 8 ≥ every side
    trainer(callbacks=[pre_cb]).fit(module, datamodule=dm)
    manifest = SnapshotDir(tmp_path).index_dir / "manifest.yaml"
    assert manifest.exists() and "complete: true" in manifest.read_text()
    cb, fine, ft_dm = _finetune(tmp_path, FIXED)
    assert cb.info["scoring"] == "gradient_index" and cb.info["index"]["dim"] == 8
    assert cb.info["index"]["kind"] == "random" and cb.info["index"]["balanced"] is False  # exact Hessian: no balance
    assert OmegaConf.load(tmp_path / "scores.yaml").info.index.out_dim == 31  # recorded beside the scores
    ref = multistage_influence(module, fine, dm.train_set, ft_dm.train_set, ft_dm.val_set, shared="backbone", **FIXED)
    assert rel_err(cb.scores, ref) <= 1e-10
    assert rel_err(rescore(tmp_path, progress=False).scores, ref) <= 1e-10  # from the snapshots: the index again
    index = SnapshotDir(tmp_path).index_dir
    shutil.copytree(index, tmp_path / "old-index")
    with torch.no_grad():
        module.head.bias.add_(1.0)  # other pretraining weights: the index no longer fits
    SnapshotDir(tmp_path).write_stage("pretrain", module, "backbone", data=dm, train_dataset=dm.train_set)
    assert not index.exists()  # a new stage snapshot of other weights drops what belonged to the old ones
    shutil.copytree(tmp_path / "old-index", index)  # an index of other weights put back by hand is refused
    with pytest.raises(MSIFError, match="gradient index .* does not fit this run: other pretraining weights"):
        rescore(tmp_path, progress=False)
    trainer(callbacks=[PretrainingSnapshot(tmp_path, progress=False)]).fit(module, datamodule=dm)
    assert not SnapshotDir(tmp_path).index_dir.exists()  # pretraining again without an index drops the stale one


@pytest.mark.parametrize("limit, caught", [(1.0, 13), (2, 8)], ids=["whole-epoch", "two-batches"])
def test_a_gradient_index_caught_during_the_last_epoch(tmp_path, limit, caught):
    """Rows from the last epoch's shuffled training steps (lr = 0, so at the final weights; no dropout or
    BatchNorm, so training mode is eval mode): at full dimension the scores are exact; the examples the epoch
    skipped (``limit_train_batches``) are filled after training."""
    dm, module = TinyDataModule(), TinyModule(lr=0.0)
    pre_cb = PretrainingSnapshot(tmp_path, index_dim=8, index_dtype="float64", index_capture="last_epoch",
                                 progress=False)
    trainer(callbacks=[pre_cb], max_epochs=3, limit_train_batches=limit).fit(module, datamodule=dm)
    manifest = OmegaConf.load(SnapshotDir(tmp_path).index_dir / "manifest.yaml")
    assert manifest.complete and manifest.capture == "last_epoch"
    assert (manifest.steps.caught, manifest.steps.filled) == (caught, 13 - caught)
    assert manifest.steps.check_error <= 1e-10 and manifest.projection.balanced
    assert not (Path(tmp_path) / "index-pieces").exists()
    cb, fine, ft_dm = _finetune(tmp_path, FIXED)
    assert cb.info["scoring"] == "gradient_index"
    ref = multistage_influence(module, fine, dm.train_set, ft_dm.train_set, ft_dm.val_set, shared="backbone", **FIXED)
    assert rel_err(cb.scores, ref) <= 1e-10


def test_a_run_too_short_for_the_last_epoch_capture_gets_the_dedicated_pass(tmp_path):
    """Stopped early (as by early stopping: after the first of 5 epochs) before the epoch before the last: no step
    fed the index, so it comes from the pass after training, complete and exact at full dimension."""

    class StopAfterOneEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    dm, module = TinyDataModule(), TinyModule()
    pre_cb = PretrainingSnapshot(tmp_path, index_dim=8, index_dtype="float64", index_capture="last_epoch",
                                 progress=False)
    trainer(callbacks=[pre_cb, StopAfterOneEpoch()], max_epochs=5).fit(module, datamodule=dm)
    manifest = OmegaConf.load(SnapshotDir(tmp_path).index_dir / "manifest.yaml")
    assert manifest.complete and manifest.steps is None
    cb, fine, ft_dm = _finetune(tmp_path, FIXED)
    ref = multistage_influence(module, fine, dm.train_set, ft_dm.train_set, ft_dm.val_set, shared="backbone", **FIXED)
    assert rel_err(cb.scores, ref) <= 1e-10


def test_a_gradient_index_from_training_steps_follows_the_trained_weights(tmp_path):
    """lr > 0: each row is at its step's weights, so the scores only approximate the final weights' ones."""
    dm, module = TinyDataModule(n=40), TinyModule(lr=0.05)
    pre_cb = PretrainingSnapshot(tmp_path, index_dim=8, index_dtype="float64", index_capture="last_epoch",
                                 progress=False)
    trainer(callbacks=[pre_cb], max_epochs=4).fit(module, datamodule=dm)
    steps = OmegaConf.load(SnapshotDir(tmp_path).index_dir / "manifest.yaml").steps
    assert (steps.caught, steps.filled) == (40, 0)  # the end-of-fit snapshot (new weights) kept the rows
    cb, fine, ft_dm = _finetune(tmp_path, FIXED)
    ref = multistage_influence(module, fine, dm.train_set, ft_dm.train_set, ft_dm.val_set, shared="backbone", **FIXED)
    assert 1e-6 < rel_err(cb.scores, ref) < 0.3
    assert torch.corrcoef(torch.stack([cb.scores.flatten(), ref.flatten()]))[0, 1] > 0.95


LAST_EPOCH_ERROR = {"64-true": 1e-6, "32-true": 2e-6, "bf16-true": 4e-2, "16-true": 3e-3, "bf16-mixed": 2e-2,
                    "16-mixed": 3e-3}
"""How far, at full dimension and lr = 0, the scores of the index from the last epoch's steps may be from those of the
dedicated pass's index, and the first step from its float32 reference: float rounding in float64/float32 (the index is
kept in float32); in half precision the step's own forward and backward round every activation and gradient to 8
(bf16) or 11 (fp16) significant bits. Measured (scores; first step): 7.0e-8, 0; 3.0e-7, 0; 7.4e-3, 1.2e-2;
5.8e-4, 7.7e-4; 3.3e-3, 6.3e-3; 5.1e-4, 8.1e-4."""


def _precision(name: str, scale: float = 2.0 ** 10) -> dict:
    """The trainer's precision; "16-mixed" by its plugin with a CPU loss scaler (the string alone trains "bf16-mixed"
    on CPU), so the steps run float16 autocast and scale their loss by ``scale``, which the rows must undo."""
    if name == "16-mixed":
        return dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))])
    return dict(precision=name)


def _last_epoch_fit(tmp_path, **kwargs):
    """Three epochs at lr = 0 with the index from the last one's steps: (trainer, module, datamodule, its ``steps``)."""
    dm = Float32Blobs()
    t = trainer(max_epochs=3, **kwargs,
                callbacks=[PretrainingSnapshot(tmp_path, index_dim=8, index_capture="last_epoch", progress=False)])
    with t.init_module():
        module = DefaultDtypeModule(lr=0.0)
    t.fit(module, datamodule=dm)
    return t, module, dm, OmegaConf.load(SnapshotDir(tmp_path).index_dir / "manifest.yaml").steps


def _index_scores(tmp_path, module, dm):
    """At full dimension, the scores of the index in the snapshot and of the dedicated pass's on the same weights."""
    snapshots = SnapshotDir(tmp_path)
    last = snapshots.read_index(str(snapshots.manifest("pretrain").weights.sha256), None)
    after = capture_gradient_index(module, dm.train_set, MemoryIndexStore(), dim=8)
    reference = _float64(tmp_path, "pretrain")
    return tuple(compute_single_stage(reference, dm.train_set, dm.val_set, damping=0.01, index=index).scores
                 for index in (last, after))


@pytest.mark.parametrize("precision", list(LAST_EPOCH_ERROR))
def test_the_last_epoch_index_under_every_precision(tmp_path, precision):
    """lr = 0, two of the last epoch's four batches traced (the other examples filled after fit): the index from the
    steps scores like the dedicated pass's on the same weights, as closely as the steps' precision allows; it is
    computed in the dedicated pass's dtype, and its filled rows are as exact as that pass's."""
    bound = LAST_EPOCH_ERROR[precision]
    t, module, dm, steps = _last_epoch_fit(tmp_path, limit_train_batches=2, **_precision(precision))
    scaler = getattr(t.precision_plugin, "scaler", None)
    assert scaler is None or scaler.get_scale() == 2.0 ** 10  # every step's gradients were scaled
    assert (steps.caught, steps.filled) == (8, 5) and steps.check_error <= bound
    compute = torch.float64 if precision == "64-true" else torch.float32
    projection = load_file(SnapshotDir(tmp_path).index_dir / "projection.safetensors")
    assert {v.dtype for v in projection.values()} == {compute}
    got, want = _index_scores(tmp_path, module, dm)
    assert rel_err(got, want) <= bound
    assert int(((got - want).norm(dim=1) <= 1e-5 * want.norm(dim=1)).sum()) >= 5  # the filled rows at least


@pytest.mark.parametrize("scale, balanced", [(2.0 ** 20, True), (2.0 ** 27, False)], ids=["some", "many"])
def test_steps_the_loss_scaler_skips_neither_poison_the_balance_nor_fail_the_check(tmp_path, scale, balanced):
    """16-mixed with a loss scale that overflows float16 gradients until the scaler has halved it enough: the epoch
    before the last loses the last of its moment steps (2²⁰) or all of them (2²⁷: the projection is then random and
    unbalanced), and at 2²⁷ the last epoch's first steps hold non-finite rows: the first finite step is the one
    checked, and the non-finite rows are filled."""
    t, module, dm, steps = _last_epoch_fit(tmp_path, **_precision("16-mixed", scale))
    assert t.precision_plugin.scaler.get_scale() < scale  # steps were skipped
    manifest = OmegaConf.load(SnapshotDir(tmp_path).index_dir / "manifest.yaml")
    assert manifest.projection.balanced is balanced
    assert steps.caught + steps.filled == 13 and (steps.filled > 0) is not balanced
    assert steps.check_error <= LAST_EPOCH_ERROR["16-mixed"]
    got, want = _index_scores(tmp_path, module, dm)
    assert rel_err(got, want) <= LAST_EPOCH_ERROR["16-mixed"]


class BareScale(TinyModule):
    """``TinyModule`` with a parameter outside every layer the hooks know (as Transformer Engine's layers are)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def test_a_last_epoch_index_of_parameters_no_hook_covers_is_refused_before_training(tmp_path):
    t = trainer(precision="bf16-true", max_epochs=3,
                callbacks=[PretrainingSnapshot(tmp_path, index_dim=8, index_capture="last_epoch", progress=False)])
    with pytest.raises(MSIFError, match=r"no layer hook covers \(precision='bf16-true'\): \['scale'\].*'after_fit'"):
        t.fit(BareScale(), datamodule=TinyDataModule())
    assert t.global_step == 0


@pytest.mark.parametrize("kwargs, match", [(dict(index_dim=0), "index_dim=0"),
                                           (dict(index_capture="during"), "index_capture must be one of"),
                                           (dict(index_dtype="int8"), "index_dtype must be one of"),
                                           (dict(index_autocast="float64"), "index_autocast must be one of"),
                                           (dict(index_projection="pca"), "index_projection must be one of")])
def test_bad_index_arguments(tmp_path, kwargs, match):
    with pytest.raises(MSIFError, match=match):
        PretrainingSnapshot(tmp_path, **kwargs)


def test_periodic_pretraining_snapshots(tmp_path):
    seen = []

    class Spy(PretrainingSnapshot):
        def _snapshot(self, trainer, pl_module):
            seen.append(trainer.current_epoch)
            super()._snapshot(trainer, pl_module)

    cb = Spy(tmp_path, snapshot_every_n_epochs=5)
    trainer(callbacks=[cb], max_epochs=10).fit(TinyModule(), datamodule=TinyDataModule())
    assert seen == [4, 9, 10]  # after epochs 5 and 10, then the final snapshot (current_epoch has moved on)
    assert SnapshotDir(tmp_path).manifest("pretrain").global_step == 40  # 10 epochs × 4 batches



def test_a_scoring_run_hashes_each_dataset_once(tmp_path, monkeypatch):
    """The pretraining set's fingerprint is taken by the check against the snapshot, and the scoring run uses that
    one (it hashed the whole set a second time before)."""
    import lightning_msif.scoring_job as scoring_job
    import lightning_msif.snapshots as snapshots

    dm, module = TinyDataModule(), TinyModule()
    trainer(callbacks=[PretrainingSnapshot(tmp_path, progress=False)]).fit(module, datamodule=dm)
    _finetune(tmp_path, FIXED)
    hashed, original = [], snapshots.fingerprint

    def counting(dataset):
        hashed.append(len(dataset))
        return original(dataset)

    monkeypatch.setattr(snapshots, "fingerprint", counting)
    monkeypatch.setattr(scoring_job, "fingerprint", counting)
    rescore(tmp_path, progress=False)
    assert sorted(hashed) == [5, 11, 13]  # query, finetune, pretraining: each once



@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "worker-processes"])
def test_a_single_epoch_run_is_caught_from_its_steps_when_its_loader_allows(tmp_path, monkeypatch, workers):
    """One epoch (common for large pretraining sets): its first batches feed the moments, the rest the rows. An
    in-process loader reads its sampler at the first batch, so the rows are traced; worker processes started in
    the fit loop's set-up drew the indices before any callback ran: found out at the first batch, with a warning,
    and every row is filled after fit. Either way the index is exact at full dimension (lr = 0)."""
    import warnings

    import lightning_msif.callbacks.step_index as step_index
    from lightning_msif import compute_single_stage

    monkeypatch.setattr(step_index, "BASIS_EXAMPLES", 4)  # the moments from the first batch of 4 examples
    dm, module = TinyDataModule(), TinyModule(lr=0.0)
    dm.setup("fit")
    loader = DataLoader(dm.train_set, batch_size=4, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    pre_cb = PretrainingSnapshot(tmp_path, index_dim=8, index_dtype="float64", index_capture="last_epoch",
                                 progress=False)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        trainer(callbacks=[pre_cb], max_epochs=1).fit(module, loader)
    assert len([w for w in warned if "cannot be traced" in str(w.message)]) == (1 if workers else 0)
    snapshots = SnapshotDir(tmp_path)
    manifest = OmegaConf.load(snapshots.index_dir / "manifest.yaml")
    assert (manifest.steps.caught, manifest.steps.filled) == ((9, 4) if workers == 0 else (0, 13))
    index = snapshots.read_index(str(snapshots.manifest("pretrain").weights.sha256), None)
    data, queries = DataLoader(dm.train_set, batch_size=4), DataLoader(dm.val_set, batch_size=5)
    exact = compute_single_stage(module, data, queries, damping=0.01).scores
    assert rel_err(compute_single_stage(module, data, queries, damping=0.01, index=index).scores, exact) <= 1e-10
