"""Small, CPU-fast, seeded models of the kinds people actually pretrain, and data for them.

A tiny ResNet (BatchNorm, residual blocks), a tiny BERT and a tiny GPT-2 (Hugging Face ``transformers``,
built from small configs with random weights: nothing is ever downloaded), each split into a shared
``backbone`` (everything before the classifier) and an ``nn.Linear`` ``head``; seeded image and token
datasets with some class signal; a few (deliberately unconverged) Adam steps; pretrain → finetune pairs
in fixed (frozen backbone) and updated mode; and Lightning modules / datamodules of the same models.

Conventions the influence engine meets here and not in ``reference.py``:

* float32 by default (``dtype=torch.float64`` is accepted everywhere a model or float data is built);
* BatchNorm buffers (running statistics) are part of the backbone's state dict; models come back in
  ``eval()`` mode, and a frozen backbone is kept in eval mode while its head trains, so its running
  statistics stay those of pretraining;
* dropout (HF default 0.1) is active in train mode only;
* token batches are dicts ``{"input_ids", "attention_mask", "labels"}``, right-padded with token 0;
  ``model(**{k: v for k, v in batch.items() if k != "labels"})`` gives logits ``[B, classes]``;
* HF's mask handling has data-dependent control flow (``padding_mask.all()`` in
  ``transformers.masking_utils``), so ``torch.func.vmap`` over a BERT/GPT-2 batch with an
  attention mask raises (see ``test_real_models.py``).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_msif.rescoring import torch_threads

VOCAB = 64  # token ids 1..63 are words, 0 is padding (BERT's pad_token_id)
PAD = 0
MAX_LEN = 32  # max_position_embeddings / n_positions
KINDS = ("resnet", "bert", "gpt2")

Batch = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut (identity, or 1×1 conv + BN when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), bn=nn.BatchNorm2d(c_out)))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """ResNet-9-shaped, tiny: stem → block1 (identity shortcut) → block2 (stride 2, 1×1 shortcut) → GAP → head.

    Parameter names: ``backbone.stem.{conv,bn}.*``, ``backbone.block1.{conv1,bn1,conv2,bn2}.*``,
    ``backbone.block2.{conv1,bn1,conv2,bn2,shortcut.conv,shortcut.bn}.*``, ``head.{weight,bias}``.
    Input ``[B, in_channels, 16, 16]`` (any spatial size works), output ``[B, classes]``.
    """

    def __init__(self, classes: int, width: int = 8, in_channels: int = 3):
        super().__init__()
        self.backbone = nn.Sequential(OrderedDict(
            stem=nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(width),
                relu=nn.ReLU())),
            block1=BasicBlock(width, width),
            block2=BasicBlock(width, 2 * width, stride=2),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten()))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def resnet_classifier(classes: int, seed: int = 0, width: int = 8, dtype: torch.dtype = torch.float32) -> TinyResNet:
    """A ``TinyResNet`` whose random initialisation depends on ``seed`` only (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyResNet(classes, width=width)
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------- transformers


def _bert_backbone(vocab_size: int = VOCAB) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=MAX_LEN, pad_token_id=PAD)
    # No pooler: the head reads the [CLS] hidden state directly, so an unused pooler would only add
    # parameters without gradient to the shared backbone.
    return BertModel(config, add_pooling_layer=False)


def _gpt2_backbone(vocab_size: int = VOCAB) -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    # bos/eos inside the tiny vocabulary (the default 50256 only triggers a config warning; unused here).
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=MAX_LEN, vocab_size=vocab_size,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2Model(config)


class TokenClassifier(nn.Module):
    """HF encoder/decoder ``backbone`` + ``nn.Linear`` ``head`` on one token's last hidden state.

    ``kind="bert"``: the first ([CLS]) token; ``kind="gpt2"``: the last non-padded token (right padding,
    so position ``attention_mask.sum(-1) - 1``; the last position when no mask is given).
    Called as ``model(input_ids=..., attention_mask=...)`` → logits ``[B, classes]``.
    """

    def __init__(self, kind: str, classes: int, vocab_size: int = VOCAB):
        super().__init__()
        if kind not in ("bert", "gpt2"):
            raise ValueError(f"kind must be 'bert' or 'gpt2', got {kind!r}")
        self.kind = kind
        self.backbone = _bert_backbone(vocab_size) if kind == "bert" else _gpt2_backbone(vocab_size)
        self.head = nn.Linear(self.backbone.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return token_logits(self.kind, self.backbone, self.head, input_ids, attention_mask)


def token_logits(kind: str, backbone: nn.Module, head: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pooling of ``TokenClassifier``, shared with ``HFClassifierModule``."""
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    if kind == "bert":
        return head(hidden[:, 0])
    if attention_mask is None:
        last = torch.full(input_ids.shape[:1], input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    else:
        last = attention_mask.long().sum(-1) - 1
    index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return head(hidden.gather(1, index).squeeze(1))


def _seeded_token_classifier(kind: str, classes: int, seed: int, dtype: torch.dtype) -> TokenClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TokenClassifier(kind, classes)
    return model.to(dtype).eval()


def bert_classifier(classes: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> TokenClassifier:
    """Tiny ``BertModel`` (hidden 16, 2 layers, 2 heads, sdpa attention) as ``backbone``, head on [CLS]."""
    return _seeded_token_classifier("bert", classes, seed, dtype)


def gpt2_classifier(classes: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> TokenClassifier:
    """Tiny ``GPT2Model`` (n_embd 16, 2 layers, 2 heads; HF ``Conv1D`` layers) as ``backbone``, head on the
    last non-padded token."""
    return _seeded_token_classifier("gpt2", classes, seed, dtype)


def build(kind: str, classes: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``resnet_classifier`` / ``bert_classifier`` / ``gpt2_classifier`` by name."""
    if kind == "resnet":
        return resnet_classifier(classes, seed, dtype=dtype)
    if kind in ("bert", "gpt2"):
        return _seeded_token_classifier(kind, classes, seed, dtype)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# ------------------------------------------------------------------------------------------------ data


def image_data(n: int, classes: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> TensorDataset:
    """``n`` images ``[3, 16, 16]``: a smooth per-class template (4×4 upsampled) plus unit noise; labels
    ``arange(n) % classes`` (int64)."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(classes, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear",
                              align_corners=False)
    y = torch.arange(n) % classes
    x = 1.5 * templates[y] + torch.randn(n, 3, 16, 16, generator=g)
    return TensorDataset(x.to(dtype), y)


class TokenDataset(Dataset):
    """Map-style dataset of dicts ``{"input_ids": [T], "attention_mask": [T], "labels": []}`` (all int64);
    the default collate batches it into a dict of ``[B, T]`` / ``[B]`` tensors."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}

    def batch(self) -> dict:
        """All examples as one batch (what the default collate would give)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


def token_data(n: int, classes: int, seed: int = 0, length: int = 12, vocab_size: int = VOCAB) -> TokenDataset:
    """Token sequences whose words come, with probability 0.6, from a band of the vocabulary owned by
    the label (else uniform over 1..vocab_size-1). About half the examples are right-padded (token 0,
    mask 0) to a length in ``[length // 2, length - 1]``; example 0 is always full, example 1 always padded."""
    if length > MAX_LEN:
        raise ValueError(f"length must be at most {MAX_LEN}")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    band = (vocab_size - 1) // classes
    own = 1 + y[:, None] * band + torch.randint(0, band, (n, length), generator=g)
    anywhere = torch.randint(1, vocab_size, (n, length), generator=g)
    ids = torch.where(torch.rand(n, length, generator=g) < 0.6, own, anywhere)
    lengths = torch.randint(length // 2, length, (n,), generator=g)
    lengths = torch.where(torch.rand(n, generator=g) < 0.5, torch.full_like(lengths, length), lengths)
    lengths[0] = length
    if n > 1:
        lengths[1] = min(int(lengths[1]), length - 1)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
    return TokenDataset(ids, mask, y)


def loader(data: Dataset, batch_size: int = 8, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A DataLoader whose shuffling depends on ``seed`` only."""
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------- training


def batch_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of an ``(x, y)`` batch or a dict batch (every key but ``labels`` goes to the model)."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(batch[0])


def batch_labels(batch: Batch) -> torch.Tensor:
    return batch["labels"] if isinstance(batch, Mapping) else batch[1]


def per_example_ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy per example, ``[B]``."""
    return F.cross_entropy(batch_logits(model, batch), batch_labels(batch), reduction="none")


def mean_loss(model: nn.Module, data: Dataset, batch_size: int = 64) -> float:
    """Mean cross-entropy over ``data`` in the model's current mode, without gradients."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size):
            losses = per_example_ce(model, batch)
            total, count = total + float(losses.sum()), count + len(losses)
    return total / count


def _train_keep_frozen_eval(model: nn.Module) -> None:
    """``model.train()``, except children with parameters none of which train stay in eval mode (so a
    frozen backbone's BatchNorm statistics and dropout stay those of evaluation)."""
    model.train()
    for child in model.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()


def adam_steps(model: nn.Module, loader: DataLoader, steps: int, lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """``steps`` Adam steps on the mean cross-entropy of the trainable parameters, cycling through
    ``loader`` (deliberately not converged). Dropout/shuffling randomness depends on ``seed`` only.
    Returns ``model`` in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _train_keep_frozen_eval(model)
        done = 0
        while done < steps:
            for batch in loader:
                opt.zero_grad(set_to_none=True)
                per_example_ce(model, batch).mean().backward()
                opt.step()
                done += 1
                if done == steps:
                    break
    opt.zero_grad(set_to_none=True)
    return model.eval()


class Stages(NamedTuple):
    """Unpacks like ``reference.problem()``: ``pre, fine, pt, ft, q = pretrain_and_finetune(...)``."""

    pre: nn.Module
    fine: nn.Module
    pretrain: Dataset
    finetune: Dataset
    query: Dataset


def _data(kind: str, n: int, classes: int, seed: int, dtype: torch.dtype) -> Dataset:
    return image_data(n, classes, seed, dtype=dtype) if kind == "resnet" else token_data(n, classes, seed)


def pretrain_and_finetune(kind: str, freeze_backbone: bool = True, seed: int = 0, n_pt: int = 24, n_ft: int = 16,
                          n_q: int = 6, pre_steps: int = 8, fine_steps: int = 6, lr: float = 1e-2,
                          batch_size: int = 8, dtype: torch.dtype = torch.float32, threads: int | None = 1) -> Stages:
    """Pretrain a 4-class model, copy its backbone into a 2-class model and finetune that; both a few
    Adam steps, both returned in eval mode, with the pretraining / finetune / query (finetune task,
    unseen) datasets.

    ``freeze_backbone=True`` (fixed mode): the finetune backbone has ``requires_grad=False`` and its
    state dict (buffers included) equals the pretrained one; only the head trains.
    ``freeze_backbone=False`` (updated mode): the whole finetune model trains from the pretrained backbone.
    ``threads``: torch intra-op threads while building (restored after; ``None``: as set).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with torch_threads(threads):
        return _pretrain_and_finetune(kind, freeze_backbone, seed, n_pt, n_ft, n_q, pre_steps, fine_steps, lr,
                                      batch_size, dtype)


def _pretrain_and_finetune(kind, freeze_backbone, seed, n_pt, n_ft, n_q, pre_steps, fine_steps, lr, batch_size,
                           dtype) -> Stages:
    pt = _data(kind, n_pt, 4, seed + 1, dtype)
    ft = _data(kind, n_ft, 2, seed + 2, dtype)
    q = _data(kind, n_q, 2, seed + 3, dtype)
    pre = adam_steps(build(kind, 4, seed, dtype), loader(pt, batch_size, seed=seed), pre_steps, lr=lr, seed=seed)
    fine = build(kind, 2, seed + 1, dtype)
    fine.backbone.load_state_dict(pre.backbone.state_dict())
    if freeze_backbone:
        fine.backbone.requires_grad_(False)
    fine = adam_steps(fine, loader(ft, batch_size, seed=seed + 1), fine_steps, lr=lr, seed=seed + 1)
    return Stages(pre, fine, pt, ft, q)


# ------------------------------------------------------------------------------------------- Lightning


class _ClassifierModule(L.LightningModule):
    """Shared Lightning plumbing: ``self.backbone`` + ``self.head``, mean CE, Adam, ``per_example_loss``."""

    def per_example_loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(batch_logits(self, batch), batch_labels(batch), reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_example_loss(batch).mean()
        self.log("train_loss", loss, batch_size=len(batch_labels(batch)))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_example_loss(batch).mean(), batch_size=len(batch_labels(batch)))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.freeze_backbone:
            self.backbone.eval()  # frozen: BatchNorm statistics / dropout stay those of evaluation
        return self

    def _adopt(self, model: nn.Module) -> None:
        # Register backbone and head directly (not the wrapper), so names are ``backbone.*`` / ``head.*``.
        self.backbone, self.head = model.backbone, model.head
        if self.hparams.freeze_backbone:
            self.backbone.requires_grad_(False)
        # Lightning (≥ 2.2) keeps the train/eval modes it is given; the builders return eval mode.
        self.train()


class HFClassifierModule(_ClassifierModule):
    """Lightning module of ``bert_classifier`` / ``gpt2_classifier`` (same weights for the same ``init_seed``),
    dict batches ``{"input_ids", "attention_mask", "labels"}``; shared prefix ``backbone``."""

    def __init__(self, kind: str = "bert", classes: int = 2, lr: float = 1e-2, weight_decay: float = 0.0,
                 freeze_backbone: bool = False, init_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.kind = kind
        self._adopt(_seeded_token_classifier(kind, classes, init_seed, torch.float32))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return token_logits(self.kind, self.backbone, self.head, input_ids, attention_mask)


class ResNetModule(_ClassifierModule):
    """Lightning module of ``resnet_classifier`` (same weights for the same ``init_seed``), ``(x, y)`` batches."""

    def __init__(self, classes: int = 4, width: int = 8, lr: float = 1e-2, weight_decay: float = 0.0,
                 freeze_backbone: bool = False, init_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self._adopt(resnet_classifier(classes, init_seed, width=width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class _DataModule(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loader(self.train_set, self.hparams.batch_size, shuffle=True, seed=self.hparams.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


class TokenDataModule(_DataModule):
    """``token_data``: ``n`` training, ``n_val`` validation examples."""

    def __init__(self, n: int = 24, n_val: int = 8, classes: int = 2, seed: int = 0, batch_size: int = 8,
                 length: int = 12):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train_set = token_data(hp.n, hp.classes, hp.seed, length=hp.length)
        self.val_set = token_data(hp.n_val, hp.classes, hp.seed + 100, length=hp.length)


class ImageDataModule(_DataModule):
    """``image_data``: ``n`` training, ``n_val`` validation examples."""

    def __init__(self, n: int = 24, n_val: int = 8, classes: int = 4, seed: int = 0, batch_size: int = 8):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train_set = image_data(hp.n, hp.classes, hp.seed)
        self.val_set = image_data(hp.n_val, hp.classes, hp.seed + 100)
