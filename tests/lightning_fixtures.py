"""Tiny float64 Lightning modules and datamodules for the callback tests and the DDP script."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from reference import blobs


class TinyDataModule(L.LightningDataModule):
    """Gaussian blobs: ``n`` training, ``n_val`` validation examples of ``classes`` classes."""

    def __init__(self, n: int = 13, n_val: int = 5, classes: int = 3, seed: int = 0, batch_size: int = 4, d: int = 3):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train_set = blobs(hp.n, hp.classes, d=hp.d, seed=hp.seed)
        self.val_set = blobs(hp.n_val, hp.classes, d=hp.d, seed=hp.seed + 100)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


class TinyModule(L.LightningModule):
    """backbone (shared) → head, float64, SGD with weight decay."""

    def __init__(self, classes: int = 3, hidden: int = 4, lr: float = 0.3, weight_decay: float = 0.01,
                 freeze_backbone: bool = False, init_seed: int = 0, d_in: int = 3):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(init_seed)
        self.backbone = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)
        self.double()
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def per_example_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_example_loss(batch).mean())

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def trainer(**kwargs) -> L.Trainer:
    base = dict(max_epochs=15, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**base, **kwargs})
