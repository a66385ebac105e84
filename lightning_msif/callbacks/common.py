"""What both stages' callbacks do the same way: find the training data, refuse unsupported strategies."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from ..errors import MSIFError


def train_loader(trainer: "pl.Trainer") -> Any:
    """The training data of ``fit``: the datamodule's train loader, else the trainer's."""
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    loader = trainer.train_dataloader
    iterables = getattr(loader, "iterables", None)  # a CombinedLoader around the user's loader
    return iterables if iterables is not None and not isinstance(iterables, (dict, list)) else loader


def check_strategy(trainer: "pl.Trainer") -> None:
    """Single device or DDP: the influence computation needs every parameter whole on each rank."""
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise MSIFError(
            f"lightning-msif supports single-device and DDP strategies, not {type(strategy).__name__}: "
            "the influence computation needs every parameter whole on each rank. Use strategy='ddp' "
            "(or 'auto' on one device)."
        )
