"""The two set-ups that gave no scores before, through both callbacks with default influence settings.

1. A CNN with BatchNorm (ResNet-9 layout, ~131k parameters) pretrained 2 epochs with SGD on 2,000 random
   32×32 images (10 classes), its head finetuned on a 2-class task, fixed mode. Before: CG met negative
   curvature after 234 s (28× an epoch); kronfluence's single-stage EK-FAC took 65 s (7.5 epochs).
2. A Hugging Face ``BertModel`` backbone (2 layers, hidden 64, default sdpa attention) with a classification
   head, updated mode (α = 1, enforced while finetuning). Before: forward-mode AD is not implemented for the
   fused attention kernel.

Prints the wall time of the finetune stage's influence computation in epochs of plain training, the curvature
chosen and why, and whether the scores are finite.

    python benchmarks/callback_defaults.py
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))

from multistage_real import ResNet9, Tokens, epoch_seconds, images, logits  # noqa: E402

from lightning_msif import MultiStageInfluence, PretrainingSnapshot, load_pretrained  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Module(L.LightningModule):
    """A classifier (``backbone`` + ``head``) trained with SGD or Adam; dict batches for the text model."""

    def __init__(self, net: nn.Module, optimizer: str, lr: float, frozen: bool = False):
        super().__init__()
        self.backbone, self.head = net.backbone, net.head  # parameter names backbone.* / head.*
        object.__setattr__(self, "_net", net)  # its forward, over these same modules (not registered twice)
        self.optimizer, self.lr = optimizer, lr
        if frozen:
            self.backbone.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._net(*args, **kwargs)

    def per_example_loss(self, batch: Any) -> torch.Tensor:
        out, y = logits(self, batch)
        return F.cross_entropy(out, y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        return torch.optim.Adam(params, lr=self.lr)


class Data(L.LightningDataModule):
    def __init__(self, data: Any, batch_size: int = 64):
        super().__init__()
        self.data, self.batch_size = data, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.queries, batch_size=self.batch_size)


def trainer(epochs: int, callback: L.Callback) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=[callback])


def run(name: str, make, data, ft_data, queries, optimizer: str, lr: float, settings: Dict[str, Any]) -> None:
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="msif-bench-"))
    pre = Module(make(10 if name == "cnn" else 4), optimizer, lr)
    dm = Data(data)
    start = time.perf_counter()
    trainer(2, PretrainingSnapshot(folder, progress=False)).fit(pre, datamodule=dm)
    pretrain_s = time.perf_counter() - start
    epoch = epoch_seconds(pre, DataLoader(data, batch_size=64))
    fine = Module(make(2), optimizer, lr, frozen=settings.get("mode", "fixed") == "fixed")
    load_pretrained(fine, folder)
    ft_dm = Data(ft_data)
    ft_dm.queries = queries
    cb = MultiStageInfluence(folder, progress=False, report=False, pretrain_model=pre, pretrain_data=dm.train_dataloader(),
                             **settings)
    trainer(2, cb).fit(fine, datamodule=ft_dm)
    sec = cb.info["seconds"]
    influence = sum(sec.values())
    chosen = cb.info["curvature"]["pretrain"]
    print(f"{name}: {sum(p.numel() for p in pre.parameters()):,} parameters, n_pretrain {len(data)}, "
          f"{len(queries)} queries; pretraining fit (2 epochs + snapshot + factors) {pretrain_s:.1f} s; one plain "
          f"epoch {epoch:.2f} s")
    print(f"  pretraining curvature: {chosen['name']} ({chosen['why']}; {chosen.get('factors', 'fitted now')})")
    print(f"  finetune-stage influence: {influence:.1f} s = {influence / epoch:.1f} epochs "
          f"({', '.join(f'{k} {v:.1f}' for k, v in sec.items())}); scores {tuple(cb.scores.shape)}, "
          f"finite: {bool(torch.isfinite(cb.scores).all())}")


def main() -> None:
    torch.set_num_threads(2)
    run("cnn", lambda c: ResNet9(c, c=9), images(2000, 10, 0), images(400, 2, 1), images(16, 2, 2), "sgd", 0.05,
        {})
    run("bert", lambda c: BertClassifier(c), Tokens(2000, 4, 0), Tokens(400, 2, 1), Tokens(16, 2, 2), "adam",
        1e-3, dict(mode="updated", alpha=1.0, enforce_proximal=True))


class BertClassifier(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64)
        self.backbone = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(64, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


if __name__ == "__main__":
    main()
