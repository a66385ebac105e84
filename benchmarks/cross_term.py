"""How close the fixed mode's cross term is under each curvature, against the exact Hessian's.

The fixed-mode query vector is ``g_j = ∇_θ f(q_j) − H_θW (H_WW + λI)⁻¹ ∇_W f(q_j)``. A layer-block-diagonal
curvature has no ``H_θW``; lightning-msif computes it as the Fisher cross block (``kfac``/``ekfac``) or the
Gauss-Newton cross block (``ggn``). This script measures, on the digits MLP of ``make demo`` (trained with Adam,
not at a minimum) and on a tiny two-stage problem solved to its exact optimum:

- the relative error of the cross term ``C_θW (C_WW + λI)⁻¹ ∇_W f`` against the exact Hessian's, with the same
  inner solve, and with each curvature's own inner solve;
- what dropping it would cost: the same error for a cross term of zero;
- Pearson/Spearman of the fixed-mode scores of each curvature against the exact-Hessian scores.

    python benchmarks/cross_term.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from lightning_msif import compute_multistage
from lightning_msif.core.arguments import ScoreArguments
from lightning_msif.core.curvature import CURVATURES
from lightning_msif.core.data import ExampleSource
from lightning_msif.core.objective import Objective, cross_entropy_loss, evaluation
from lightning_msif.core.params import ParamSpace, check_same_shared

CURVES = ("ggn", "kfac", "ekfac")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def cross_terms(fine, ft_data, q_data, shared: str, damping: float) -> Dict[str, Tuple[float, float]]:
    """``{curvature: (error with the exact inner solve, error with its own inner solve)}`` against the Hessian."""
    _, _, w = check_same_shared(fine, fine, shared)
    theta = [n for n, _ in fine.named_parameters() if n == shared or n.startswith(shared + ".")]
    with evaluation(fine):
        ft = Objective(fine, cross_entropy_loss, ExampleSource(ft_data, "finetune_data"), "finetune")
        q = Objective(fine, cross_entropy_loss, ExampleSource(q_data, "query_data"), "query")
        t_space, w_space = ParamSpace.of(ft.params, theta), ParamSpace.of(ft.params, w)
        grads_w = q.gradients(w_space)
        idx = range(len(ft.source))

        def inner(name: str) -> torch.Tensor:
            kind = CURVATURES.get(name)
            op = kind.build(ft, w_space, idx, damping=damping, shift=None,
                            options=ScoreArguments().curvature_options_of(name))
            dense = op.dense(100_000).double()
            return torch.linalg.solve(dense, grads_w.double().T).T.to(grads_w.dtype)

        def cross(name: str, a: torch.Tensor) -> torch.Tensor:
            return CURVATURES.get(name).cross_product(ft, t_space, w_space, a, idx,
                                                      ScoreArguments().curvature_options_of(name))

        a_exact = inner("hessian")
        exact = cross("hessian", a_exact)
        out = {"zero (dropped)": (1.0, 1.0)}
        for name in CURVES:
            out[name] = (_rel(cross(name, a_exact), exact), _rel(cross(name, inner(name)), exact))
    return out


def scores_agreement(pre, fine, pt, ft, q, shared: str, damping: float) -> Dict[str, Tuple[float, float]]:
    ref = compute_multistage(pre, fine, pt, ft, q, shared=shared, damping=damping, curvature="hessian",
                             solver="exact").scores.flatten()
    out = {}
    for name in CURVES:
        s = compute_multistage(pre, fine, pt, ft, q, shared=shared, damping=damping, curvature=name,
                               solver="exact").scores.flatten()
        out[name] = (pearson_corrcoef(s, ref).item(), spearman_corrcoef(s, ref).item())
    return out


def digits_problem():
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from reference import loader, trained_problem

    pre, fine, pt, ft, q = trained_problem("fixed", None, 0.1)
    return "tiny MLP at its exact optimum (tests/reference.py), λ = 0.1", pre, fine, loader(pt), loader(ft), loader(q), 0.1


def demo_problem():
    import lightning as L

    from lightning_msif.demo import DigitsClassifier, DigitsDataModule, load_backbone

    L.seed_everything(0)
    pre_dm, ft_dm = DigitsDataModule(task="pretrain", seed=0), DigitsDataModule(task="finetune", seed=0,
                                                                                corrupt_fraction=0.0)
    pre = DigitsClassifier(hidden=32)
    trainer = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    L.Trainer(max_epochs=60, **trainer).fit(pre, datamodule=pre_dm)
    fine = DigitsClassifier(hidden=32, freeze_backbone=True)
    load_backbone(fine, pre.state_dict())
    L.Trainer(max_epochs=60, **trainer).fit(fine, datamodule=ft_dm)
    ft_dm.setup("fit")
    pre_dm.setup("fit")
    return ("digits MLP of `make demo` (Adam, 60 epochs per stage), λ = 1e-2", pre.double(), fine.double(),
            pre_dm.train_dataloader(), ft_dm.train_dataloader(), ft_dm.val_dataloader(), 1e-2)


def main() -> None:
    torch.set_num_threads(1)
    for make in (digits_problem, demo_problem):
        start = time.perf_counter()
        title, pre, fine, pt, ft, q, damping = make()
        print(f"\n{title}")
        print("| curvature | cross term error, exact inner solve | cross term error, own inner solve |")
        print("|---|---|---|")
        for name, (same, own) in cross_terms(fine, ft, q, "backbone", damping).items():
            print(f"| {name} | {same:.3g} | {own:.3g} |")
        print("| curvature | fixed-mode scores: Pearson vs exact Hessian | Spearman |")
        print("|---|---|---|")
        for name, (p, s) in scores_agreement(pre, fine, pt, ft, q, "backbone", damping).items():
            print(f"| {name} | {p:.3f} | {s:.3f} |")
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
