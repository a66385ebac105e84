"""Scale on a 2-core CPU: 100,000 pretraining examples, a model of about a million parameters, both modes, end to end
through the callbacks, with the gradient index; peak memory at n and 4n.

The pretraining set is generated from each example's index (256 features, 10 classes, class-dependent means), so
the data itself takes no memory and peak memory shows what the library holds. One run (a fresh process per n):

1. pretrain 1 epoch with Adam under ``PretrainingSnapshot(index_dim=...)``: snapshot, EK-FAC fit, index capture;
2. finetune a 2-class task (n/10 examples, 64 queries) in fixed mode and in updated mode (α = 1) under
   ``MultiStageInfluence``: each scores against the index and writes the reports.

    python benchmarks/scale.py                 # n = 25,000 and 100,000, each in its own process
    python benchmarks/scale.py --n 1000        # a smoke run
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_msif import MultiStageInfluence, PretrainingSnapshot, load_pretrained

FEATURES = 256


class Generated(Dataset):
    """``n`` examples made from their index: no storage, the same on every read."""

    def __init__(self, n: int, classes: int, seed: int):
        self.n, self.classes, self.seed = n, classes, seed
        self.means = torch.randn(classes, FEATURES, generator=torch.Generator().manual_seed(seed)) * 0.5

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        y = (i * 7919 + self.seed) % self.classes
        x = self.means[y] + torch.randn(FEATURES, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i))
        return x, y


class Data(L.LightningDataModule):
    def __init__(self, n: int, n_val: int, classes: int, seed: int):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train_set = Generated(hp.n, hp.classes, hp.seed)
        self.val_set = Generated(hp.n_val, hp.classes, hp.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=256, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class Net(L.LightningModule):
    """256 → 1024 → 512 → 256 (the shared backbone, GELU) → head: 920k parameters with 10 classes."""

    def __init__(self, classes: int, freeze_backbone: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Linear(FEATURES, 1024), nn.GELU(), nn.Linear(1024, 512), nn.GELU(),
                                      nn.Linear(512, 256), nn.GELU())
        self.head = nn.Linear(256, classes)
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def per_example_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def one_run(n: int, index_dim: int, folder: Path) -> Dict[str, Any]:
    torch.manual_seed(0)
    times: Dict[str, float] = {}
    start = time.perf_counter()
    pre, data = Net(10), Data(n, 64, 10, 0)
    callback = PretrainingSnapshot(folder / "fixed", shared="backbone", index_dim=index_dim, progress=False)
    trainer(callbacks=[callback]).fit(pre, datamodule=data)
    times["pretrain (1 epoch + snapshot, EK-FAC, index)"] = time.perf_counter() - start
    for mode in ("fixed", "updated"):
        if mode == "updated":  # the same pretraining snapshot, copied: each mode writes its own scores
            import shutil

            shutil.copytree(folder / "fixed" / "pretrain", folder / "updated" / "pretrain")
        start = time.perf_counter()
        fine = load_pretrained(Net(2, freeze_backbone=mode == "fixed"), folder / mode)
        settings = dict(mode=mode, alpha=1.0) if mode == "updated" else dict(mode=mode)
        influence = MultiStageInfluence(folder / mode, shared="backbone", progress=False, **settings)
        trainer(callbacks=[influence]).fit(fine, datamodule=Data(max(n // 10, 64), 64, 2, 5))
        times[f"finetune + influence + reports ({mode})"] = time.perf_counter() - start
        assert influence.info["scoring"] == "gradient_index", influence.info["scoring"]
        assert torch.isfinite(influence.scores).all() and influence.scores.shape == (n, 64)
    return {"n": n, "params": sum(p.numel() for p in pre.parameters()), "seconds": times,
            "total_s": sum(times.values()), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="25000,100000", help="pretraining set sizes, each run in its own process")
    parser.add_argument("--index-dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one_run(int(args.n), args.index_dim, Path(tmp))))
        return
    for n in args.n.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", "--n", n, "--index-dim", str(args.index_dim),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"n = {row['n']:,}, {row['params']:,} parameters: total {row['total_s']:.0f} s, "
              f"peak memory {row['peak_rss_mb']:.0f} MB")
        for phase, seconds in row["seconds"].items():
            print(f"  {phase}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
