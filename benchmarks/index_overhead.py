"""What a gradient index costs the pretraining ``fit``: caught during the last epoch's training steps
(``index_capture="last_epoch"``) against a dedicated pass after training (``"after_fit"``, the default).

The ResNet-9-shaped CNN of ``multistage_real.py`` (conv-BN-ReLU, residual blocks; BatchNorm in training mode
during the steps) on CIFAR-shaped random images with a learnable class signal, pretrained with Adam for two
epochs by a Lightning ``Trainer``, the same seed for every run (so the same weights). Printed, in epochs of the
plain run's own training epoch:

- the overhead on each training epoch (the epoch before the last feeds the K-FAC moments of its final
  ``basis_examples`` examples, the last epoch gives the rows);
- the work after ``fit`` (assembling the rows; the dedicated pass and its EK-FAC fit for ``after_fit``);
- agreement (Pearson, Spearman) of each index's single-stage scores for 32 held-out queries with the exact
  scores at the final weights (no index), and of the two indexes with each other.

    python benchmarks/index_overhead.py            # n = 10,000
    python benchmarks/index_overhead.py --quick    # n = 1,000: a smoke run
    python benchmarks/index_overhead.py --final-lr 0.01   # the last epoch at 1 % of the rate (an annealed end)
    python benchmarks/index_overhead.py --width 64 --n 4096 --batch-size 32 --timing-only
        # ResNet-9 at its original width (6.6M parameters): the overheads only (exact scores would take hours)
    python benchmarks/index_overhead.py --step-costs 8 16 32 64 --batch-size 32
        # one training step's cost with rows / with moments, by width, and the one-off costs (build, check)

The overhead on a step grows with ``dim`` against the layers' widths (the projections cost about ``dim / width``
of a layer's own products), so it is largest on the default narrow CNN (width 8, 1/8 of ResNet-9's).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from typing import Any, Dict, List

import lightning as L
import torch
import torch.nn.functional as F
from multistage_real import ResNet9, images
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from lightning_msif import MemoryIndexStore, PretrainingSnapshot, SnapshotDir, compute_single_stage
from lightning_msif.core.influence import step_index


class Classifier(L.LightningModule):
    def __init__(self, classes: int = 10, final_lr: float = 1.0, width: int = 8):
        super().__init__()
        self.model = ResNet9(classes, c=width)
        self.final_lr = final_lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def per_example_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self) -> Any:
        adam = torch.optim.Adam(self.parameters(), lr=1e-3)
        last = self.trainer.max_epochs - 1  # the learning rate × final_lr in the last epoch (an annealed end)
        schedule = torch.optim.lr_scheduler.LambdaLR(adam, lambda epoch: self.final_lr if epoch >= last else 1.0)
        return {"optimizer": adam, "lr_scheduler": schedule}


class Clock(L.Callback):
    """Seconds of each training epoch and of ``on_train_end`` (the callbacks after it run their work there)."""

    def __init__(self) -> None:
        self.epochs: List[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end = time.perf_counter()


def fit(data: Any, batch_size: int, folder: str, capture: str, dim: int, final_lr: float,
        width: int) -> Dict[str, Any]:
    L.seed_everything(0, verbose=False)
    module, clock = Classifier(final_lr=final_lr, width=width), Clock()
    callbacks: List[L.Callback] = [clock]
    if capture != "none":
        callbacks.append(PretrainingSnapshot(folder, shared="model", index_dim=dim, index_capture=capture,
                                             fit_curvature=capture == "after_fit", progress=False))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, DataLoader(data, batch_size=batch_size, shuffle=True))
    return {"module": module, "epochs": clock.epochs, "after": time.perf_counter() - clock.end}


def step_costs(width: int, batch_size: int, dim: int, batches: int = 4) -> str:
    """A training step (Adam) timed plain, feeding rows and feeding K-FAC moments (the best of two rounds over
    ``batches`` batches each), and the one-off costs: building the projection, the first step's check."""
    torch.manual_seed(0)
    model = ResNet9(10, c=width)
    loader = DataLoader(images(batch_size * batches, 10, seed=0), batch_size=batch_size)
    step = step_index(model, loader, MemoryIndexStore(), dim=dim,
                      loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    adam, data = torch.optim.Adam(model.parameters(), 1e-3), list(loader)
    model.train()

    def train(batch: Any, feed: Any) -> None:
        adam.zero_grad()
        if feed is None:
            F.cross_entropy(model(batch[0]), batch[1]).backward()
        else:
            with step.watch(len(batch[0])) as capture:
                F.cross_entropy(model(batch[0]), batch[1]).backward()
            feed(capture, len(batch[0]))
        adam.step()

    feeds = {"plain": None, "moments": lambda c, b: step.add_moments(c, b, b), "rows": lambda c, b: step.rows(c, b)}
    for batch in data:
        train(batch, feeds["moments"])
    start = time.perf_counter()
    step.build()
    build = time.perf_counter() - start
    start = time.perf_counter()
    step.reference(data[0])
    check = time.perf_counter() - start
    best = {name: float("inf") for name in feeds}
    for _ in range(2):
        for name, feed in feeds.items():
            start = time.perf_counter()
            for batch in data:
                train(batch, feed)
            best[name] = min(best[name], (time.perf_counter() - start) / len(data))
    plain = best["plain"]
    return (f"| {width} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | {plain * 1000:.0f} ms | "
            f"{best['rows'] / plain - 1:+.0%} | {best['moments'] / plain - 1:+.0%} | {build:.1f} s | {check:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--final-lr", type=float, default=1.0,
                        help="learning-rate factor in the last epoch (1: constant; 0.01: an annealed end)")
    parser.add_argument("--width", type=int, default=8, help="ResNet-9's width c (the original is 64)")
    parser.add_argument("--timing-only", action="store_true", help="skip the scores' agreement with exact ones")
    parser.add_argument("--step-costs", type=int, nargs="*", metavar="WIDTH",
                        help="only time one training step with rows / with moments at these widths")
    args = parser.parse_args()
    if args.step_costs:
        print(f"# one training step, batch {args.batch_size}, index dim {args.dim}, {torch.get_num_threads()} threads")
        print("\n| width | parameters | plain step | with rows | with moments | build (once) | check (once) |")
        print("|---|---|---|---|---|---|---|")
        for width in args.step_costs:
            print(step_costs(width, args.batch_size, args.dim))
        return
    n = 1_000 if args.quick else args.n
    data = images(n + 32, 10, seed=0)
    train, queries = Subset(data, range(n)), Subset(data, range(n, n + 32))
    print(f"# CNN (ResNet-9 shape, width {args.width}), n = {n}, batch {args.batch_size}, index dim {args.dim}, "
          f"last-epoch lr × {args.final_lr}; {platform.processor()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for capture in ("none", "last_epoch", "after_fit"):
            runs[capture] = fit(train, args.batch_size, f"{tmp}/{capture}", capture, args.dim, args.final_lr,
                                args.width)
            if capture != "none":
                runs[capture]["index"] = SnapshotDir(f"{tmp}/{capture}").read_index(
                    str(SnapshotDir(f"{tmp}/{capture}").manifest("pretrain").weights.sha256), None)
        plain = runs["none"]["epochs"][-1]
        print("\n| capture | epoch 1 overhead | epoch 2 overhead | after fit | total |")
        print("|---|---|---|---|---|")
        for capture in ("last_epoch", "after_fit"):
            r = runs[capture]
            extra = [(a - b) / plain for a, b in zip(r["epochs"], runs["none"]["epochs"])]
            after = r["after"] / plain
            print(f"| {capture} | {extra[0]:+.3f} | {extra[1]:+.3f} | {after:.3f} | {sum(extra) + after:.3f} |")
        print(f"\nplain epoch {plain:.1f} s")
        if args.timing_only:
            return
        loader = DataLoader(train, batch_size=args.batch_size)
        query = DataLoader(queries, batch_size=32)
        final = runs["none"]["module"]
        drift = max(float((a.double() - b.double()).abs().max()) for a, b in zip(
            final.state_dict().values(), runs["last_epoch"]["module"].state_dict().values()))
        print(f"\nlargest difference between the runs' final weights and buffers: {drift:.2e}")
        exact = compute_single_stage(final, loader, query, damping=1e-3).scores
        scores = {c: compute_single_stage(final, loader, query, damping=1e-3, index=runs[c]["index"]).scores
                  for c in ("last_epoch", "after_fit")}
    print("\n| scores | Pearson vs exact | Spearman vs exact |")
    print("|---|---|---|")
    for c, s in scores.items():
        print(f"| {c} | {float(pearson_corrcoef(s.flatten().double(), exact.flatten().double())):.3f} | "
              f"{float(spearman_corrcoef(s.flatten().double(), exact.flatten().double())):.3f} |")
    a, b = scores["last_epoch"].flatten().double(), scores["after_fit"].flatten().double()
    print(f"\nlast_epoch vs after_fit: Pearson {float(pearson_corrcoef(a, b)):.3f}")


if __name__ == "__main__":
    main()
