"""The realistic test models of ``real_models.py``: shapes, names, seeds, training, Lightning, and what
``torch.func`` cannot do with Hugging Face models (which the influence engine must cope with)."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: extra threads only contend

import lightning as L
import real_models as R
from transformers.pytorch_utils import Conv1D


def _data(kind, n, classes, seed=0):
    return R.image_data(n, classes, seed) if kind == "resnet" else R.token_data(n, classes, seed)


def _one_batch(data, n=None):
    return next(iter(DataLoader(data, batch_size=n or len(data))))


def _grad_norm(model, data) -> float:
    model.zero_grad(set_to_none=True)
    R.per_example_ce(model, _one_batch(data)).mean().backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return float(norm)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", R.KINDS)
def test_forward_and_per_example_loss_shapes(kind):
    model = R.build(kind, 3, seed=0)
    batch = _one_batch(_data(kind, 5, 3))
    assert R.batch_logits(model, batch).shape == (5, 3)
    losses = R.per_example_ce(model, batch)
    assert losses.shape == (5,) and losses.dtype == torch.float32 and torch.isfinite(losses).all()


def test_named_builders():
    x = torch.randn(2, 3, 16, 16)
    assert R.TinyResNet(5)(x).shape == (2, 5)
    assert R.TinyResNet(5, width=4, in_channels=1)(torch.randn(2, 1, 16, 16)).shape == (2, 5)
    batch = R.token_data(4, 2, seed=0).batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert R.bert_classifier(3, seed=0)(**inputs).shape == (4, 3)
    assert R.gpt2_classifier(3, seed=0)(**inputs).shape == (4, 3)
    assert R.build("resnet", 2, dtype=torch.float64)(x.double()).dtype == torch.float64
    assert R.build("bert", 2, dtype=torch.float64)(**inputs).dtype == torch.float64


def test_data():
    images = R.image_data(10, 4, seed=0)
    x, y = images.tensors
    assert x.shape == (10, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [i % 4 for i in range(10)]

    tokens = R.token_data(16, 2, seed=0, length=12)
    example = tokens[0]
    assert set(example) == {"input_ids", "attention_mask", "labels"}
    assert example["input_ids"].shape == (12,) and example["labels"].shape == ()
    batch = _one_batch(tokens, 8)  # the default collate
    assert isinstance(batch, dict)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 12) and batch["labels"].shape == (8,)
    assert all(v.dtype == torch.int64 for v in batch.values())
    mask = tokens.attention_mask
    assert mask[0].all() and not mask[1].all() and (mask.sum(1) < 12).sum() >= 2  # some padded, at the end
    assert torch.equal(mask, mask.cummin(dim=1).values)  # right padding: 1…1 0…0
    assert (tokens.input_ids[mask == 0] == R.PAD).all() and (tokens.input_ids[mask == 1] != R.PAD).all()
    # class signal: each class prefers its own band of the vocabulary
    band = (R.VOCAB - 1) // 2
    in_first = ((tokens.input_ids >= 1) & (tokens.input_ids <= band) & (mask == 1)).float().sum(1) / mask.sum(1)
    assert in_first[tokens.labels == 0].mean() > in_first[tokens.labels == 1].mean() + 0.3


def test_gpt2_pools_the_last_real_token():
    model = R.gpt2_classifier(2, seed=0)
    tokens = R.token_data(4, 2, seed=0)
    ids, mask = tokens.input_ids[1:2], tokens.attention_mask[1:2]
    n = int(mask.sum())
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask)
        trimmed = model(input_ids=ids[:, :n], attention_mask=mask[:, :n])
        trimmed_no_mask = model(input_ids=ids[:, :n])
    torch.testing.assert_close(padded, trimmed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, trimmed_no_mask, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- names


def test_resnet_names():
    model = R.resnet_classifier(4, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("backbone.", "head.")) for n in names)
    assert [n for n in names if n.startswith("head.")] == ["head.weight", "head.bias"]
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 16
    for n in ("backbone.stem.conv.weight", "backbone.stem.bn.weight", "backbone.block1.conv1.weight",
              "backbone.block1.bn2.bias", "backbone.block2.conv1.weight", "backbone.block2.shortcut.conv.weight",
              "backbone.block2.shortcut.bn.weight"):
        assert n in names
    assert not any(n.endswith(("conv.bias", "conv1.bias", "conv2.bias")) for n in names)
    assert isinstance(model.backbone.block1.shortcut, nn.Identity)
    buffers = [n for n, _ in model.named_buffers()]
    assert "backbone.stem.bn.running_mean" in buffers and all(b.startswith("backbone.") for b in buffers)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_transformer_names(kind):
    model = R.build(kind, 2, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("backbone.", "head.")) for n in names)
    assert [n for n in names if n.startswith("head.")] == ["head.weight", "head.bias"]
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 16
    if getattr(model.backbone, "_supports_sdpa", False):  # BERT: transformers ≥ 4.41
        assert model.backbone.config._attn_implementation == "sdpa"  # the default, not "eager"
    if kind == "bert":
        assert "backbone.embeddings.word_embeddings.weight" in names
        assert "backbone.encoder.layer.1.attention.self.query.weight" in names
        assert not any("pooler" in n for n in names)  # the head reads [CLS]: no unused parameters
    else:
        assert "backbone.wte.weight" in names and "backbone.h.1.mlp.c_fc.weight" in names
        assert isinstance(model.backbone.h[0].attn.c_attn, Conv1D)  # weight [in, out], not nn.Linear
    # every parameter takes part in the loss
    model.zero_grad(set_to_none=True)
    R.per_example_ce(model, R.token_data(6, 2).batch()).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# -------------------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("kind", R.KINDS)
def test_seeds_make_builds_deterministic(kind):
    state = torch.get_rng_state()
    assert _same_state(R.build(kind, 2, seed=3), R.build(kind, 2, seed=3))
    assert not _same_state(R.build(kind, 2, seed=3), R.build(kind, 2, seed=4))
    a, b = R.pretrain_and_finetune(kind, freeze_backbone=False), R.pretrain_and_finetune(kind, freeze_backbone=False)
    assert _same_state(a.pre, b.pre) and _same_state(a.fine, b.fine)
    if kind == "resnet":
        assert torch.equal(a.query.tensors[0], b.query.tensors[0])
    else:
        assert torch.equal(a.query.input_ids, b.query.input_ids)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


def test_torch_threads_is_restored():
    before = torch.get_num_threads()
    with R.torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    R.pretrain_and_finetune("gpt2", threads=before + 1, pre_steps=1, fine_steps=1)
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", R.KINDS)
def test_adam_steps_lower_the_loss_without_converging(kind):
    data = _data(kind, 24, 4, seed=1)
    model = R.build(kind, 4, seed=0)
    before = R.mean_loss(model, data)
    out = R.adam_steps(model, R.loader(data, 8), steps=8)
    assert out is model and not model.training
    after = R.mean_loss(model, data)
    assert after < 0.8 * before
    assert _grad_norm(model, data) > 0.1  # not at a minimum: the gradient term matters


@pytest.mark.parametrize("kind", R.KINDS)
def test_pretrain_and_finetune_modes(kind):
    fixed = R.pretrain_and_finetune(kind, freeze_backbone=True)
    pre, fine, pt, ft, q = fixed
    assert (len(pt), len(ft), len(q)) == (24, 16, 6)
    assert pre.head.out_features == 4 and fine.head.out_features == 2
    assert not pre.training and not fine.training
    assert _same_state(pre.backbone, fine.backbone)  # BatchNorm buffers included
    assert not any(p.requires_grad for p in fine.backbone.parameters())
    assert all(p.requires_grad for p in fine.head.parameters())
    start = R.build(kind, 2, seed=1)  # the finetune model before its Adam steps
    start.backbone.load_state_dict(pre.backbone.state_dict())
    assert not _same_state(fine.head, start.head)  # the head did train
    assert R.mean_loss(fine, ft) < R.mean_loss(start, ft)

    updated = R.pretrain_and_finetune(kind, freeze_backbone=False)
    assert _same_state(updated.pre, pre)
    assert not _same_state(updated.pre.backbone, updated.fine.backbone)
    assert all(p.requires_grad for p in updated.fine.parameters())
    assert R.batch_logits(updated.fine, _one_batch(q)).shape == (6, 2)


# ---------------------------------------------------------------------------------------- Lightning


def _trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


CASES = [
    (R.HFClassifierModule, {"kind": "bert", "classes": 2}, R.TokenDataModule, {"classes": 2}, "bert"),
    (R.HFClassifierModule, {"kind": "gpt2", "classes": 2}, R.TokenDataModule, {"classes": 2}, "gpt2"),
    (R.ResNetModule, {"classes": 4}, R.ImageDataModule, {"classes": 4}, "resnet"),
]


@pytest.mark.parametrize("module_cls, kwargs, dm_cls, dm_kwargs, kind", CASES, ids=["bert", "gpt2", "resnet"])
def test_lightning_module_trains_one_epoch(module_cls, kwargs, dm_cls, dm_kwargs, kind):
    module = module_cls(**kwargs)
    assert all(m.training for m in module.modules())  # Lightning trains in the modes it is handed
    names = [n for n, _ in module.named_parameters()]
    assert names and all(n.startswith(("backbone.", "head.")) for n in names)
    assert any(n.startswith("backbone.") for n in names)
    # same weights as the plain builder; rebuildable from class path + hparams
    assert _same_state(module, R.build(kind, kwargs["classes"], seed=0))
    path = f"{module_cls.__module__}.{module_cls.__qualname__}"
    mod, _, name = path.rpartition(".")
    assert _same_state(getattr(importlib.import_module(mod), name)(**dict(module.hparams)), module)
    dm = dm_cls(**dm_kwargs)
    assert dm_cls(**dict(dm.hparams)).hparams == dm.hparams

    dm.setup("fit")
    batch = _one_batch(dm.train_set, 4)
    assert module.per_example_loss(batch).shape == (4,)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    _trainer().fit(module, datamodule=dm)
    moved = [k for k, v in module.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("head.") for k in moved)


def test_frozen_resnet_module_keeps_its_backbone_and_statistics():
    module = R.ResNetModule(classes=4, freeze_backbone=True)
    assert module.head.training and not any(m.training for m in module.backbone.modules())
    start = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head = module.head.weight.detach().clone()
    _trainer().fit(module, datamodule=R.ImageDataModule(classes=4))
    assert all(torch.equal(v, start[k]) for k, v in module.backbone.state_dict().items())  # running stats too
    assert not torch.equal(module.head.weight, head)


# ---------------------------------------------------------------------------- what torch.func can't do


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_vmap_of_per_example_grad_over_hf_batch(kind, record_property):
    """The influence engine cannot rely on ``vmap(grad(...))`` for per-example gradients of HF models:
    with an attention mask, ``transformers.masking_utils`` branches on ``padding_mask.all()`` (whether the
    sdpa mask can be skipped), which vmap refuses as data-dependent control flow. It needs a fallback
    (e.g. a loop of per-example ``autograd.grad``)."""
    import transformers

    model = R.build(kind, 2, seed=0)
    batch = R.token_data(4, 2, seed=0).batch()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, ids, mask, y):
        logits = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": mask[None]})
        return torch.nn.functional.cross_entropy(logits, y[None])

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no batching rule for sdpa" performance warnings
            grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(
                params, batch["input_ids"], batch["attention_mask"], batch["labels"])
    except RuntimeError as e:
        record_property("vmap_over_hf_batch", f"raises on transformers {transformers.__version__}")
        assert "data-dependent control flow" in str(e)
        return
    # This transformers version lets vmap through: record it, and check the result is right.
    record_property("vmap_over_hf_batch", f"works on transformers {transformers.__version__}")
    warnings.warn(f"vmap(grad) over a {kind} batch works on transformers {transformers.__version__}")
    for i in range(4):
        one = torch.func.grad(loss)(params, batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i])
        for k in params:
            torch.testing.assert_close(grads[k][i], one[k], atol=1e-5, rtol=1e-4)
