"""What both stages' callbacks do the same way: state, the training data and its loss, refusing unsupported
strategies."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.utils.data import IterableDataset

from ..core.data import ExampleSource, dataset_of
from ..core.objective import LossFn, Objective, evaluation, module_loss
from ..core.precision import floating_dtype
from ..errors import MSIFError
from ..resolve import single_loader
from ..snapshots import SnapshotDir


class StageCallback(Callback):
    """What both stages' callbacks share: their snapshot folder, a state key and a small ``state_dict``."""

    STAGE = ""
    snapshots: SnapshotDir
    loss_fn: Optional[LossFn]

    @property
    def snapshot_dir(self) -> Path:
        return self.snapshots.root

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stage=self.STAGE, snapshot_dir=str(self.snapshot_dir))

    def state_dict(self) -> Dict[str, Any]:
        return {"stage": self.STAGE, "snapshot_dir": str(self.snapshot_dir)}

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Before the first step (the loaders are set up by now): training data or a loss that the scoring would
        refuse after training is refused now. The global random state is restored after (reading a loader draws from
        it), so training runs as it would without the check."""
        with torch.random.fork_rng(devices=[]):
            check_loss(pl_module, module_loss(pl_module, self.loss_fn), train_loader(trainer), self.STAGE)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("stage", self.STAGE) != self.STAGE:
            raise MSIFError(f"This checkpoint holds a {state_dict['stage']!r}-stage callback, not a {self.STAGE!r} one: "
                            "give each Trainer its own stage's callback.")


def train_loader(trainer: "pl.Trainer") -> Any:
    """The training data of ``fit``: the datamodule's train loader, else the trainer's, as one loader."""
    source = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.train_dataloader
    return single_loader(source)


def check_loss(module: nn.Module, loss_fn: LossFn, loader: Any, stage: str) -> None:
    """The per-example loss of the first two training examples, in eval mode: one finite loss per example, or the
    error the scoring would give after training. A stream (an iterable dataset) is left to the scoring, which reads
    it once."""
    dataset = dataset_of(loader)
    if isinstance(dataset, IterableDataset):
        return
    objective = Objective(module, loss_fn, ExampleSource(loader, f"the {stage} training data"), role=stage)
    with evaluation(module):
        next(objective.batches(range(min(2, len(objective.source))), shard=False))


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
