"""Two-stage handwritten digits: pretrain on 0–4 (some labels corrupted on purpose), finetune on 5–9.

The data is ``sklearn.datasets.load_digits`` (1,797 8×8 images, shipped with scikit-learn, no
download). Everything is rebuilt deterministically from the datamodule's hyperparameters, so a
later process can recreate the exact pretraining set from its class path and ``hparams``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Accuracy

from ..errors import MSIFError

TASK_DIGITS: Dict[str, Tuple[int, ...]] = {"pretrain": (0, 1, 2, 3, 4), "finetune": (5, 6, 7, 8, 9)}
SPLITS = ("train", "val", "test")


class DigitsDataset(Dataset):
    """Map-style ``(x [64] float32 in [0, 1], y int64)`` pairs, with what a report needs to show them.

    ``images`` ``[N, 8, 8]``, ``targets`` (the labels trained on), ``clean_targets`` (the true ones),
    ``corrupted_indices`` (where they differ), ``class_names`` (the digit each label stands for) and
    ``source_indices`` (row in ``load_digits``).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, clean_targets: torch.Tensor,
                 class_names: Sequence[str], source_indices: torch.Tensor):
        self.images = images
        self.x = images.reshape(len(images), -1)
        self.targets = targets
        self.clean_targets = clean_targets
        self.class_names = list(class_names)
        self.source_indices = source_indices
        self.corrupted_indices = (targets != clean_targets).nonzero().flatten()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.targets[i]


def _load_digits() -> Any:
    """sklearn's bundled digits; refused with the install line when scikit-learn is missing (an optional extra)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MSIFError("The digits task reads sklearn's bundled digits, and scikit-learn is not installed: "
                        "pip install 'lightning-msif[digits]' (or pip install scikit-learn).") from None
    return load_digits()


class DigitsDataModule(L.LightningDataModule):
    """Digits 0–4 (``task="pretrain"``) or 5–9 (``task="finetune"``), relabelled 0..4.

    The examples of the task are shuffled with ``seed`` (and capped at ``limit``), then cut into
    test, val and train. With ``corrupt_fraction`` (pretrain only), that fraction of the *train*
    labels is replaced by a uniformly drawn wrong label; ``corrupted_indices`` lists them as train
    dataset indices (the rows of an influence score matrix).
    """

    def __init__(self, task: str = "pretrain", corrupt_fraction: float = 0.0, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, batch_size: int = 64, seed: int = 0, limit: Optional[int] = None):
        super().__init__()
        if task not in TASK_DIGITS:
            raise ValueError(f"task must be one of {list(TASK_DIGITS)}, got {task!r}.")
        if not 0.0 <= corrupt_fraction < 1.0:
            raise ValueError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction!r}.")
        if corrupt_fraction and task != "pretrain":
            raise ValueError(
                f"corrupt_fraction is for the pretrain task only, got {corrupt_fraction!r} with task={task!r}."
            )
        if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must be ≥ 0 and sum below 1, got {val_fraction!r}, {test_fraction!r}."
            )
        self.save_hyperparameters()
        self.datasets: Dict[str, DigitsDataset] = {}

    @property
    def class_names(self) -> List[str]:
        """Digit names of labels 0..4."""
        return [str(d) for d in TASK_DIGITS[self.hparams.task]]

    @property
    def train_dataset(self) -> DigitsDataset:
        return self.dataset("train")

    @property
    def corrupted_indices(self) -> torch.Tensor:
        """Train dataset indices whose label was deliberately corrupted (sorted)."""
        return self.train_dataset.corrupted_indices

    def dataset(self, split: str) -> DigitsDataset:
        """The ``train``, ``val`` or ``test`` dataset (built on first use)."""
        self.setup()
        return self.datasets[split]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        raw = _load_digits()
        digits = TASK_DIGITS[hp.task]
        images = torch.as_tensor(raw.images, dtype=torch.float32) / 16.0
        labels = torch.as_tensor(raw.target, dtype=torch.long)
        rows = torch.isin(labels, torch.tensor(digits)).nonzero().flatten()
        g = torch.Generator().manual_seed(int(hp.seed))
        rows = rows[torch.randperm(len(rows), generator=g)][: hp.limit]
        n_test, n_val = round(hp.test_fraction * len(rows)), round(hp.val_fraction * len(rows))
        parts = {"test": rows[:n_test], "val": rows[n_test : n_test + n_val], "train": rows[n_test + n_val :]}
        for split, idx in parts.items():
            clean = labels[idx] - digits[0]
            targets = clean.clone()
            if split == "train" and hp.corrupt_fraction:
                which = torch.randperm(len(idx), generator=g)[: round(hp.corrupt_fraction * len(idx))]
                shift = torch.randint(1, len(digits), (len(which),), generator=g)
                targets[which] = (clean[which] + shift) % len(digits)
            self.datasets[split] = DigitsDataset(images[idx], targets, clean, self.class_names, idx)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.hparams.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


StateDict = Mapping[str, torch.Tensor]


def read_weights(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file, a ``torch.save``'d state dict or a Lightning checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)


def load_backbone(module: nn.Module, state_dict: StateDict) -> None:
    """Copy the ``backbone.*`` entries of ``state_dict`` into ``module.backbone`` (all must be there)."""
    prefix = "backbone."
    entries = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not entries:
        raise KeyError(f"No '{prefix}*' entry in the state dict (keys: {sorted(state_dict)[:5]}...).")
    module.backbone.load_state_dict(entries, strict=True)


def backbone_of(arch: str, hidden: int) -> nn.Sequential:
    """``mlp``: 64 → hidden → hidden; ``cnn``: the 8×8 image through one 3×3 convolution (4 channels, 6×6), 2×2
    average pooling (3×3) and a linear layer to ``hidden`` (381 parameters with the head at hidden 8: small enough
    that the digits recipe retrains it to an exact optimum in seconds). Tanh throughout and average, not max,
    pooling: smooth, so Hessians are well behaved."""
    if arch == "mlp":
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
    if arch == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.Tanh(), nn.AvgPool2d(2),
                             nn.Flatten(), nn.Linear(4 * 3 * 3, hidden), nn.Tanh())
    raise ValueError(f"arch={arch!r}: choose 'mlp' or 'cnn'.")


class DigitsClassifier(L.LightningModule):
    """``backbone`` (``arch``: an MLP or a small CNN, tanh: smooth, so Hessians are well behaved) then ``head``.

    ``weight_decay`` λ is Adam's *coupled* L2 (λ·p added to the gradient), so training stops at a
    stationary point of ``loss + λ/2 ‖p‖²`` over the trainable parameters: use the same λ as the
    influence damping. The learning rate is annealed to zero over ``max_epochs`` (cosine) so training
    ends close to that stationary point; what negative curvature remains, the damping must cover.
    ``freeze_backbone`` makes the backbone untrainable (the "fixed" mode);
    ``pretrained`` (a weights file path or a state dict) loads the backbone from a pretrained model.
    """

    def __init__(self, hidden: int = 32, num_classes: int = 5, lr: float = 1e-2, weight_decay: float = 1e-3,
                 freeze_backbone: bool = False, pretrained: Optional[Union[str, StateDict]] = None, arch: str = "mlp"):
        super().__init__()
        self.save_hyperparameters(ignore=["pretrained"] if isinstance(pretrained, Mapping) else None)
        self.backbone = backbone_of(arch, hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.val_acc = Accuracy(task="multiclass", num_classes=num_classes)
        if pretrained is not None:
            load_backbone(self, pretrained if isinstance(pretrained, Mapping) else read_weights(pretrained))
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def per_example_loss(self, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of each example, shape ``[B]``."""
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_example_loss(batch).mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": schedule}
