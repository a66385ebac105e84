"""Multi-stage influence on models shaped like the ones people pretrain, timed in epochs of plain training.

- a CNN shaped like ResNet-9 (conv-BN-ReLU stages, two residual blocks) on CIFAR-shaped random images
  (3×32×32, 10 classes, a learnable class signal), n_pretrain = 10,000;
- a GPT-2-shaped text classifier (Hugging Face GPT2Model from a small config, sdpa attention) on token
  sequences with class-dependent token distributions.

Both pretrained for one epoch with Adam (deliberately not converged), finetuned on a 2-class task; 32 queries;
default influence settings (``curvature="auto"`` → EK-FAC here). One "epoch" is one plain forward+backward pass
over the pretraining set (no optimizer step), measured on the same machine in the same process.

Then, updated mode, the default scores against those with the factors' eigenbases fitted on all the examples
(``basis_examples=None``) and against those from another draw of the true Fisher's labels (the noise floor).

    python benchmarks/multistage_real.py            # both models, both modes
    python benchmarks/multistage_real.py --quick    # n = 1,000: a smoke run
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from lightning_msif import compute_multistage
from lightning_msif.core.arguments import ScoreArguments
from lightning_msif.core.influence import fit_pretraining_curvature


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ResNet9(nn.Module):
    """ResNet-9's layout (Page 2018) at width ``c`` (the original is c = 64)."""

    def __init__(self, classes: int, c: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, c), conv_bn(c, 2 * c, pool=True), Residual(2 * c),
                                      conv_bn(2 * c, 4 * c, pool=True), conv_bn(4 * c, 8 * c, pool=True),
                                      Residual(8 * c), nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(8 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def images(n: int, classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(0.5 * templates[y] + torch.randn(n, 3, 32, 32, generator=g), y)


class Tokens(Dataset):
    def __init__(self, n: int, classes: int, seed: int, length: int = 32, vocab: int = 256):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, classes, (n,), generator=g)
        band = vocab // classes
        own = torch.randint(0, band, (n, length), generator=g) + self.y[:, None] * band
        self.ids = torch.where(torch.rand(n, length, generator=g) < 0.5, own, torch.randint(0, vocab, (n, length),
                                                                                               generator=g))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.y[i]}


class GPT2Classifier(nn.Module):
    def __init__(self, classes: int, vocab: int = 256, width: int = 64, layers: int = 2):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.backbone = GPT2Model(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=width, n_layer=layers,
                                             n_head=4, bos_token_id=0, eos_token_id=0))
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, -1])


def logits(model: nn.Module, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return model(batch["input_ids"], batch["attention_mask"]), batch["labels"]
    return model(batch[0]), batch[1]


def epoch_seconds(model: nn.Module, loader: DataLoader) -> float:
    """One plain forward+backward pass over the data (train mode, no optimizer step)."""
    model.train()
    start = time.perf_counter()
    for batch in loader:
        out, y = logits(model, batch)
        F.cross_entropy(out, y).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - start


def adam(model: nn.Module, loader: DataLoader, epochs: int = 1) -> nn.Module:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            out, y = logits(model, batch)
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
            opt.step()
    return model.eval()


def run(kind: str, n: int, queries: int, batch_size: int, curvature_options: Dict[str, Any]) -> List[Dict[str, Any]]:
    torch.manual_seed(0)
    if kind == "cnn":
        pre, make = ResNet9(10), lambda: ResNet9(2)
        pt, ft, q = images(n, 10, 0), images(n // 5, 2, 1), images(queries, 2, 2)
    else:
        pre, make = GPT2Classifier(4), lambda: GPT2Classifier(2)
        pt, ft, q = Tokens(n, 4, 0), Tokens(n // 5, 2, 1), Tokens(queries, 2, 2)
    pt_loader = DataLoader(pt, batch_size=batch_size, shuffle=True)
    adam(pre, pt_loader)
    epoch = epoch_seconds(pre, DataLoader(pt, batch_size=batch_size))
    params = sum(p.numel() for p in pre.parameters())
    rows = []
    for mode in ("fixed", "updated"):
        fine = make()
        fine.backbone.load_state_dict(pre.backbone.state_dict())
        if mode == "fixed":
            fine.backbone.requires_grad_(False)
        adam(fine, DataLoader(ft, batch_size=batch_size, shuffle=True))
        loaders = [DataLoader(d, batch_size=batch_size) for d in (pt, ft, q)]
        start = time.perf_counter()
        fitted = fit_pretraining_curvature(pre, loaders[0], _Memory(), shared="backbone",
                                           arguments=ScoreArguments(curvature_options=curvature_options))
        fit = time.perf_counter() - start
        settings = dict(shared="backbone", mode=mode, alpha=1.0 if mode == "updated" else None,
                        curvature_options=curvature_options)
        start = time.perf_counter()
        result = compute_multistage(pre, fine, *loaders, **settings)
        total = time.perf_counter() - start
        sec = result.info["seconds"]
        rows.append({"model": kind, "mode": mode, "n": n, "params": params, "epoch_s": epoch,
                     "pretrain_curvature": fitted["name"], "fit_pretrain_epochs": fit / epoch,
                     "finetune_side_epochs": (sec.get("finetune", 0) + sec.get("finetune_cross", 0)
                                              + sec.get("query_gradients", 0)) / epoch,
                     "pretrain_solve_epochs": sec.get("pretrain", 0) / epoch,
                     "score_pass_epochs": sec.get("score_pass", 0) / epoch, "total_epochs": total / epoch,
                     "finite": bool(torch.isfinite(result.scores).all())})
    others = {label: compute_multistage(pre, fine, *loaders,
                                        **{**settings, "curvature_options": {**curvature_options, **opts}}).scores
              for label, opts in (("bases from all examples", {"basis_examples": None}),
                                  ("another label draw", {"fisher_seed": 1}))}
    print(f"{kind}, updated mode, default scores against: "
          + "; ".join(f"{label} {agreement(result.scores, other)}" for label, other in others.items()))
    return rows


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    """Pearson / Spearman over all pairs and the relative error ``‖a − b‖ / ‖b‖``."""
    a, b = a.double().flatten(), b.double().flatten()
    return (f"Pearson {float(pearson_corrcoef(a, b)):.4f}, Spearman {float(spearman_corrcoef(a, b)):.4f}, "
            f"rel. error {float((a - b).norm() / b.norm()):.3f}")


class _Memory(dict):
    """A FactorStore in memory (timing only)."""

    def get(self, key: str) -> Any:  # type: ignore[override]
        return super().get(key)

    def put(self, key: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        self[key] = (tensors, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 1,000 instead of 10,000 (CNN) / 5,000 (text)")
    parser.add_argument("--models", default="cnn,gpt2")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--basis-examples", type=int, default=None, help="EK-FAC's basis_examples (default: its own)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    rows = []
    for kind in args.models.split(","):
        n = 1000 if args.quick else (10_000 if kind == "cnn" else 5_000)
        options = {} if args.basis_examples is None else {"basis_examples": args.basis_examples}
        rows += run(kind, n, args.queries, args.batch_size, options)
    cols = ["model", "mode", "n", "params", "epoch_s", "pretrain_curvature", "fit_pretrain_epochs",
            "finetune_side_epochs", "pretrain_solve_epochs", "score_pass_epochs", "total_epochs", "finite"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
