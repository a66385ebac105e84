"""A bar over a whole training stage's epochs, with the time left (Lightning's own bar restarts every epoch)."""
from __future__ import annotations

from typing import Any, Optional

import lightning as L

from ..core.progress import closing, new_bar


class EpochProgress(L.Callback):
    """``<desc>: 37/150 epochs [00:02<00:07]`` with the last ``val_acc``; on a terminal only, like every bar.

    Put it before an influence callback in ``callbacks``: the bar closes before that callback's scoring starts
    (its own bars take over), since Lightning calls ``on_train_end`` in list order.
    """

    def __init__(self, desc: str):
        self.desc = desc
        self.bar: Optional[Any] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = new_bar(trainer.max_epochs, self.desc, "epoch")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            accuracy = trainer.callback_metrics.get("val_acc")
            if accuracy is not None:
                self.bar.set_postfix(val_acc=f"{float(accuracy):.3f}", refresh=False)
            self.bar.update(1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        closing(self.bar)
        self.bar = None
