"""What both stages' callbacks do the same way: state, the training data, refusing unsupported strategies."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from ..core.precision import floating_dtype
from ..errors import MSIFError
from ..snapshots import SnapshotDir


class StageCallback(Callback):
    """What both stages' callbacks share: their snapshot folder, a state key and a small ``state_dict``."""

    STAGE = ""
    snapshots: SnapshotDir

    @property
    def snapshot_dir(self) -> Path:
        return self.snapshots.root

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stage=self.STAGE, snapshot_dir=str(self.snapshot_dir))

    def state_dict(self) -> Dict[str, Any]:
        return {"stage": self.STAGE, "snapshot_dir": str(self.snapshot_dir)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("stage", self.STAGE) != self.STAGE:
            raise MSIFError(f"This checkpoint holds a {state_dict['stage']!r}-stage callback, not a {self.STAGE!r} one: "
                            "give each Trainer its own stage's callback.")


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


def trained_dtype(trainer: "pl.Trainer", module: "pl.LightningModule") -> torch.dtype:
    """The dtype the trainer's precision plugin trains ``module``'s parameters in ("64-true": float64, "bf16-true":
    bfloat16, mixed and "32-true": the module's own). The plugin converts the module only after the callbacks'
    ``setup``; the dtype it converts inputs to is the one it converts the module to."""
    own = floating_dtype(module) or torch.get_default_dtype()
    return trainer.strategy.precision_plugin.convert_input(torch.zeros(0, dtype=own)).dtype
