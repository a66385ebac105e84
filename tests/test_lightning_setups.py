"""Lightning set-ups beyond one loader and automatic optimization, both stages end to end on one device: the
callback's scores equal the functional API's on the same weights and data, or the set-up is refused clearly."""
from pathlib import Path
from typing import Dict, List

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import CombinedLoader
from lightning_fixtures import TinyDataModule, TinyModule, trainer
from real_models import MAX_LEN, VOCAB, token_data
from reference import blobs, rel_err
from torch.utils.data import DataLoader

from lightning_msif import MSIFError, MultiStageInfluence, PretrainingSnapshot, load_pretrained, multistage_influence
from lightning_msif import rescore

FIXED = dict(mode="fixed", damping=0.01)
UPDATED = dict(mode="updated", alpha=0.5, damping=0.01)
MODES = pytest.mark.parametrize("settings", [FIXED, UPDATED], ids=["fixed", "updated"])


def _stages(d: Path, settings: dict, module=TinyModule, pre_fit=None, fine_fit=None, probes=(), shared="backbone",
            fine_kwargs=None, callback=None, **trainer_kwargs):
    """Pretrain then finetune ``module`` (fit keywords ``pre_fit`` / ``fine_fit``; default: the tiny datamodules)
    with the same trainer settings (default: 2 epochs), the finetune callback (extra keywords ``callback``) between
    the two ``probes``; returns that callback, both modules and the finetune trainer."""
    trainer_kwargs = {"max_epochs": 2, **trainer_kwargs}
    pre = module()
    snapshot = PretrainingSnapshot(d, shared, curvature=settings.get("curvature", "auto"), progress=False)
    trainer(callbacks=[snapshot], **trainer_kwargs).fit(
        pre, **(pre_fit or dict(datamodule=TinyDataModule())))
    fine = load_pretrained(module(**(fine_kwargs or dict(classes=2, init_seed=1)),
                                  freeze_backbone=settings["mode"] == "fixed"), d, shared)
    cb = MultiStageInfluence(d, progress=False, report=False, shared=shared,
                             enforce_proximal=settings["mode"] == "updated", **settings, **(callback or {}))
    fine_trainer = trainer(callbacks=[*probes[:1], cb, *probes[1:]], **trainer_kwargs)
    fine_trainer.fit(fine, **(fine_fit or dict(datamodule=TinyDataModule(n=11, classes=2, seed=5))))
    return cb, pre, fine, fine_trainer


def _tiny_sets():
    """The tiny datamodules' pretraining, finetune and query sets."""
    pre_dm, dm = TinyDataModule(), TinyDataModule(n=11, classes=2, seed=5)
    pre_dm.setup("fit"), dm.setup("fit")
    return pre_dm.train_set, dm.train_set, dm.val_set


def _assert_functional(cb, pre, fine, sets, settings, shared="backbone", tol=1e-6):
    ref = multistage_influence(pre, fine, *sets, shared=shared, **settings)
    assert cb.scores.shape == ref.shape and rel_err(cb.scores, ref) <= tol


# -- training schedules ------------------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("schedule", [dict(accumulate_grad_batches=2), dict(max_steps=7, max_epochs=-1)],
                         ids=["accumulate", "max_steps_mid_epoch"])
def test_training_schedules(tmp_path, settings, schedule):
    cb, pre, fine, fit = _stages(tmp_path, settings, **schedule)
    if "max_steps" in schedule:  # 3 batches an epoch: stopped one batch into the third epoch
        assert fit.global_step == 7
    _assert_functional(cb, pre, fine, _tiny_sets(), settings)


# -- manual optimization, several optimizers ------------------------------------------------------------------
class ManualModule(TinyModule):
    """Manual optimization with one SGD optimizer per trainable tensor, stepped last to first."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def configure_optimizers(self):
        return [torch.optim.SGD([p], lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
                for p in self.parameters() if p.requires_grad]

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(self.per_example_loss(batch).mean())
        for optimizer in reversed(optimizers):
            optimizer.step()


class GradientProbe(Callback):
    """Placed before and after the finetune callback: what it added to θ's gradient at each optimizer step."""

    def __init__(self, record: List[Dict], after: bool):
        self.record, self.after = record, after

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        theta = pl_module.backbone[0].weight
        if self.after:
            self.record[-1]["added"] = theta.grad - self.record[-1]["before"]
            return
        holds = any(p is theta for group in optimizer.param_groups for p in group["params"])
        self.record.append({"before": theta.grad.clone(), "theta": theta.detach().clone(), "holds_theta": holds})


@MODES
def test_manual_optimization_with_several_optimizers(tmp_path, settings):
    record: List[Dict] = []
    probes = (GradientProbe(record, after=False), GradientProbe(record, after=True))
    cb, pre, fine, _ = _stages(tmp_path, settings, module=ManualModule,
                               probes=probes if settings["mode"] == "updated" else ())
    _assert_functional(cb, pre, fine, _tiny_sets(), settings)
    if settings["mode"] == "updated":  # the proximal term: once per step of θ's optimizer, never in the others'
        hat = pre.backbone[0].weight.detach()
        assert len(record) == 2 * 3 * 4 and sum(r["holds_theta"] for r in record) == 2 * 3  # epochs·steps·optimizers
        for r in record:
            expected = 0.5 * (r["theta"] - hat) if r["holds_theta"] else torch.zeros_like(hat)
            assert torch.allclose(r["added"], expected, rtol=0, atol=1e-15)


# -- a CombinedLoader ---------------------------------------------------------------------------------------
class NamedLoaderDataModule(TinyDataModule):
    """The tiny datamodule whose training loader is one loader under a name (batches ``{"blobs": (x, y)}``)."""

    def train_dataloader(self):
        return CombinedLoader({"blobs": super().train_dataloader()})


class NamedBatchModule(TinyModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch["blobs"], batch_idx)


@MODES
def test_a_combined_loader_of_one_named_loader(tmp_path, settings):
    cb, pre, fine, _ = _stages(tmp_path, settings, module=NamedBatchModule,
                               pre_fit=dict(datamodule=NamedLoaderDataModule()),
                               fine_fit=dict(datamodule=NamedLoaderDataModule(n=11, classes=2, seed=5)))
    _assert_functional(cb, pre, fine, _tiny_sets(), settings)
    assert rel_err(rescore(tmp_path, progress=False).scores, cb.scores) <= 1e-9  # rebuilt: the same loader


def test_several_training_loaders_are_refused_before_training(tmp_path):
    loaders = {name: DataLoader(blobs(8, 3, d=3, seed=seed), batch_size=4) for name, seed in (("web", 0), ("books", 1))}
    module = TinyModule()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(MSIFError, match=r"2 loaders \(\['web', 'books'\]\).*ConcatDataset"):
        trainer(callbacks=[PretrainingSnapshot(tmp_path, progress=False)]).fit(module, train_dataloaders=loaders)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


# -- a datamodule without saved hyperparameters ------------------------------------------------------------
class UnsavedDataModule(L.LightningDataModule):
    """Built from arguments it does not save: a snapshot cannot rebuild it."""

    def __init__(self, n: int, classes: int, seed: int):
        super().__init__()
        self.n, self.classes, self.seed = n, classes, seed

    def setup(self, stage: str) -> None:
        self.train_set = blobs(self.n, self.classes, d=3, seed=self.seed)
        self.val_set = blobs(5, self.classes, d=3, seed=self.seed + 100)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=4, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=4)


def test_datamodules_without_saved_hyperparameters(tmp_path):
    pre_dm, dm = UnsavedDataModule(13, 3, 0), UnsavedDataModule(11, 2, 5)
    fine = TinyModule(classes=2, init_seed=1, freeze_backbone=True)
    with pytest.raises(MSIFError, match=r"cannot rebuild its datamodule.*save_hyperparameters.*pretrain_data=\.\.\."):
        _stages(tmp_path, FIXED, pre_fit=dict(datamodule=pre_dm), fine_fit=dict(datamodule=dm))
    assert torch.equal(fine.head.weight, TinyModule(classes=2, init_seed=1).head.weight)  # no step was taken
    cb, pre, fine, _ = _stages(tmp_path, FIXED, pre_fit=dict(datamodule=pre_dm), fine_fit=dict(datamodule=dm),
                               callback=dict(pretrain_data=pre_dm.train_set))
    sets = pre_dm.train_set, dm.train_set, dm.val_set
    _assert_functional(cb, pre, fine, sets, FIXED)
    with pytest.raises(MSIFError, match=r"finetune snapshot cannot rebuild.*finetune_data=\.+ and query_data=\.+"):
        rescore(tmp_path, pretrain_data=pre_dm.train_set, progress=False)
    again = rescore(tmp_path, pretrain_data=sets[0], finetune_data=sets[1], query_data=sets[2], progress=False)
    assert rel_err(again.scores, cb.scores) <= 1e-9


# -- a Hugging Face model inside a LightningModule -------------------------------------------------------
class BertModule(L.LightningModule):
    """A ``transformers`` BertForSequenceClassification (tiny config, random weights) as users wrap one: dict batches,
    the training loss from the output's ``.loss``; no per-example loss of its own."""

    def __init__(self, classes: int = 4, init_seed: int = 0, freeze_backbone: bool = False):
        super().__init__()
        self.save_hyperparameters()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=16, max_position_embeddings=MAX_LEN, num_labels=classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model = BertForSequenceClassification(config).double()
        self.model.bert.requires_grad_(not freeze_backbone)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _token_sets():
    return tuple(token_data(n, classes, seed=seed, length=8) for n, classes, seed in ((8, 4, 1), (8, 2, 2), (3, 2, 3)))


@MODES
def test_a_hugging_face_model_with_dict_batches(tmp_path, settings):
    pytest.importorskip("transformers")
    settings = {**settings, "curvature": "ekfac"}  # what "auto" picks (no double backward through its attention)
    sets = _token_sets()
    loaders = [DataLoader(s, batch_size=4, shuffle=True) for s in sets[:2]]
    cb, pre, fine, _ = _stages(tmp_path, settings, module=BertModule, shared="model.bert", max_epochs=1,
                               pre_fit=dict(train_dataloaders=loaders[0]), fine_fit=dict(train_dataloaders=loaders[1]),
                               callback=dict(pretrain_data=loaders[0], query=DataLoader(sets[2], batch_size=4)))
    _assert_functional(cb, pre, fine, sets, settings, shared="model.bert")


def test_a_batch_mean_loss_is_refused_before_training(tmp_path):
    """``per_example_loss`` returning the model output's ``.loss`` (a batch mean) is named, with the fix."""
    pytest.importorskip("transformers")

    class MeanLossModule(BertModule):
        def per_example_loss(self, batch):
            return self(**batch).loss

    module = MeanLossModule()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(MSIFError, match=r"one loss per example.*\.loss is the batch mean.*\.logits"):
        trainer(callbacks=[PretrainingSnapshot(tmp_path, "model.bert", progress=False)]).fit(
            module, train_dataloaders=DataLoader(_token_sets()[0], batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_a_forward_that_takes_the_batch_whole_is_refused_before_training(tmp_path):
    """Dict batches reach the model as keywords (``model(**inputs)``): a ``forward(batch)`` is named, with the fix."""
    pytest.importorskip("transformers")

    class WholeBatchModule(BertModule):
        def forward(self, batch):
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            return self(batch).loss

    with pytest.raises(MSIFError, match=r"forward\(batch\).* does not take \['attention_mask', 'input_ids'\].*keyword"):
        trainer(callbacks=[PretrainingSnapshot(tmp_path, "model.bert", progress=False)]).fit(
            WholeBatchModule(), train_dataloaders=DataLoader(_token_sets()[0], batch_size=4))


def test_the_checks_before_training_leave_training_as_it_was(tmp_path):
    """The loss check before the first step reads the data in a forked random state: same shuffles, same weights."""
    weights = []
    for callbacks in ([], [PretrainingSnapshot(tmp_path, fit_curvature=False, progress=False)]):
        torch.manual_seed(0)
        module = TinyModule()
        trainer(callbacks=callbacks, max_epochs=2).fit(module, datamodule=TinyDataModule())
        weights.append(module.head.weight.detach().clone())
    assert torch.equal(*weights)
