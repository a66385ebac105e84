"""The digits task as a retraining recipe for ``lightning_msif.evaluation`` (``msif evaluate recipe=digits``).

Both stages of ``DigitsClassifier`` are trained in float64, full batch, to a tight optimum of the
objectives docs/math.md differentiates, so that the scores are exact derivatives at the trained models:

- pretraining: ``(1/n) Σ_{i ∈ subset} ℓ_i + λ/2 ‖(θ, U)‖²`` with n the size of the *whole* pretraining
  set: dropping an example sets its weight to zero, ε = −1/n exactly as the scores assume;
- finetuning, ``fixed``: W only, ``mean ℓ + λ/2 ‖W‖²`` on the pretrained θ; ``updated``: (θ, W),
  ``mean ℓ + α/2 ‖θ − θ̂‖² + λ/2 ‖(θ, W)‖²``, starting from θ̂.

From scratch each stage runs L-BFGS from the seed's initialisation. Warm (``init``, the full-data
models) it first takes Newton steps with the Hessian at the full-data optimum, factored once per
starting point: a few steps reach machine precision when one example is removed; when they stop
contracting (half the data removed) L-BFGS finishes. Either way a stage stops at max |gradient| ≤ ``tol``.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian
from torch.utils.data import Subset

from ..core.params import ParamSpace
from ..errors import MSIFError
from .digits import DigitsClassifier, DigitsDataModule, backbone_of

Objective = Callable[[torch.Tensor], torch.Tensor]
NEWTON_STEPS = 30  # cap on the warm-start Newton steps before L-BFGS takes over


class DigitsRecipe:
    """``recipe(pretrain_indices, seed, init=None) -> (pretrain_model, finetune_model)`` on sklearn digits.

    ``arch``: ``mlp`` or ``cnn`` (``backbone_of``); ``hidden``: backbone width; ``finetune_limit``: the first this
    many finetune examples only (a small finetune set, where the pretrained backbone helps);
    ``weight_decay``: λ of both stages (and the influence damping);
    ``corrupt_fraction``, ``limit``, ``data_seed``: as ``DigitsDataModule``; ``queries``: the first this many
    examples of the finetune ``query_split`` (all if None); ``tol``: max |gradient| at which a stage stops.
    """

    shared = "backbone"

    def __init__(self, mode: str = "fixed", alpha: Optional[float] = None, hidden: int = 8,
                 weight_decay: float = 1e-2, corrupt_fraction: float = 0.05, limit: Optional[int] = None,
                 queries: Optional[int] = None, query_split: str = "val", data_seed: int = 0, tol: float = 1e-9,
                 max_iter: int = 20_000, arch: str = "mlp", finetune_limit: Optional[int] = None):
        if mode not in ("fixed", "updated") or (mode == "updated") != (alpha is not None and alpha > 0):
            raise MSIFError(f"DigitsRecipe: mode={mode!r}, alpha={alpha!r}: use mode='fixed' without alpha, or "
                            "mode='updated' with alpha > 0.")
        if not weight_decay > 0:
            raise MSIFError(f"DigitsRecipe: weight_decay={weight_decay!r} must be > 0 (it makes the optimum unique).")
        self.mode, self.alpha, self.damping = mode, alpha, float(weight_decay)
        self.hidden, self.tol, self.max_iter, self.arch = hidden, tol, max_iter, arch
        self.config: Dict[str, Any] = dict(mode=mode, alpha=alpha, hidden=hidden, weight_decay=weight_decay,
                                           corrupt_fraction=corrupt_fraction, limit=limit, queries=queries,
                                           query_split=query_split, data_seed=data_seed, tol=tol, max_iter=max_iter)
        if arch != "mlp" or finetune_limit is not None:  # keep the identity (and cached retrains) of older recipes
            self.config.update(arch=arch, finetune_limit=finetune_limit)
        if arch != "mlp":  # the layers themselves: a changed CNN must not reuse the cached retrains of an older one
            with torch.random.fork_rng(devices=[]):
                self.config["backbone"] = repr(backbone_of(arch, hidden))
        pretrain = DigitsDataModule(task="pretrain", corrupt_fraction=corrupt_fraction, seed=data_seed, limit=limit)
        finetune = DigitsDataModule(task="finetune", seed=data_seed, limit=limit)
        self.pretrain_data = pretrain.train_dataset
        self.finetune_data = finetune.train_dataset
        if finetune_limit is not None:  # a small finetune set: where a pretrained backbone should help
            self.finetune_data = _first(self.finetune_data, finetune_limit)
        query = finetune.dataset(query_split)
        self.query_data = query if queries is None else Subset(query, range(min(queries, len(query))))
        self._pt = (self.pretrain_data.x.double(), self.pretrain_data.targets)
        self._ft = (self.finetune_data.x.double(), self.finetune_data.targets)
        self._factors: Dict[Tuple[str, str], Optional[torch.Tensor]] = {}

    def identity(self) -> Dict[str, Any]:
        return {**self.config, "training": "lbfgs+newton/1"}

    def _models(self, seed: int) -> Tuple[nn.Module, nn.Module]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pre = DigitsClassifier(hidden=self.hidden, weight_decay=self.damping, arch=self.arch).double()
            fine = DigitsClassifier(hidden=self.hidden, weight_decay=self.damping, arch=self.arch,
                                    freeze_backbone=self.mode == "fixed").double()
        return pre, fine

    def _pretrain_objective(self, model: nn.Module, indices: torch.Tensor) -> Tuple[ParamSpace, Objective]:
        x, y = self._pt[0][indices], self._pt[1][indices]
        n, lam = len(self._pt[1]), self.damping
        space = _space(model, lambda name: True)

        def objective(v: torch.Tensor) -> torch.Tensor:
            logits = functional_call(model, space.unflatten(v), (x,))
            return F.cross_entropy(logits, y, reduction="sum") / n + lam / 2 * v.pow(2).sum()

        return space, objective

    def _finetune_objective(self, model: nn.Module, pretrained: nn.Module) -> Tuple[ParamSpace, Objective]:
        """``model``'s finetune objective around ``pretrained``'s backbone θ̂ (fixed: held; updated: the centre)."""
        x, y = self._ft
        lam, alpha = self.damping, self.alpha
        if self.mode == "fixed":
            with torch.no_grad():
                features = pretrained.backbone(x)
            space = _space(model, lambda name: name.startswith("head."))

            def fixed(v: torch.Tensor) -> torch.Tensor:
                head = space.unflatten(v)
                logits = F.linear(features, head["head.weight"], head["head.bias"])
                return F.cross_entropy(logits, y) + lam / 2 * v.pow(2).sum()

            return space, fixed
        space = _space(model, lambda name: True)  # backbone.* first, then head.*
        center = _space(pretrained, lambda name: name.startswith("backbone.")).flatten(_params(pretrained))
        t = len(center)

        def updated(v: torch.Tensor) -> torch.Tensor:
            logits = functional_call(model, space.unflatten(v), (x,))
            return F.cross_entropy(logits, y) + alpha / 2 * (v[:t] - center).pow(2).sum() + lam / 2 * v.pow(2).sum()

        return space, updated

    def _factor(self, stage: str, start: nn.Module, space: ParamSpace, objective: Objective) -> Optional[torch.Tensor]:
        """Cholesky factor of ``objective``'s Hessian at ``start`` (None where it is not positive definite)."""
        v0 = space.flatten(_params(start))
        key = (stage, hashlib.sha256(v0.numpy().tobytes()).hexdigest())
        if key not in self._factors:
            self._factors[key] = _cholesky(hessian(objective)(v0))
        return self._factors[key]

    def _fit(self, model: nn.Module, space: ParamSpace, objective: Objective, factor: Optional[torch.Tensor],
             stage: str) -> None:
        v = _minimise(objective, space.flatten(_params(model)), factor, self.tol, self.max_iter, stage)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in space.unflatten(v).items():
                params[name].copy_(value)

    def __call__(self, pretrain_indices: Sequence[int], seed: int,
                 init: Optional[Tuple[nn.Module, nn.Module]] = None) -> Tuple[nn.Module, nn.Module]:
        idx = torch.as_tensor(list(pretrain_indices), dtype=torch.long)
        if not len(idx):
            raise MSIFError("DigitsRecipe: the pretraining subset is empty.")
        pre, fine = self._models(seed)
        factors: List[Optional[torch.Tensor]] = [None, None]
        if init is not None:  # Newton factors at the full-data optimum, of the full-data objectives
            pre.load_state_dict(init[0].state_dict())
            fine.load_state_dict(init[1].state_dict())
            every = torch.arange(len(self._pt[1]))
            factors = [self._factor("pretrain", init[0], *self._pretrain_objective(init[0], every)),
                       self._factor("finetune", init[1], *self._finetune_objective(init[1], init[0]))]
        self._fit(pre, *self._pretrain_objective(pre, idx), factors[0], "pretrain")
        if self.mode == "fixed" or init is None:  # fixed: θ is θ̂; updated from scratch: θ starts at θ̂
            fine.backbone.load_state_dict(pre.backbone.state_dict())
        self._fit(fine, *self._finetune_objective(fine, pre), factors[1], "finetune")
        return pre, fine

    def without_pretraining(self, seed: int) -> nn.Module:
        """The finetune stage on ``seed``'s initial, never pretrained backbone (and θ̂ = that backbone in updated
        mode): the baseline a pretrained backbone has to beat for pretraining to help."""
        pre, fine = self._models(seed)
        fine.backbone.load_state_dict(pre.backbone.state_dict())
        self._fit(fine, *self._finetune_objective(fine, pre), None, "finetune")
        return fine


def _first(data: Any, n: int) -> Any:
    """The first ``n`` examples of a ``DigitsDataset`` (same type: the recipe reads its ``x`` and ``targets``)."""
    keep = torch.arange(min(n, len(data)))
    return type(data)(data.images[keep], data.targets[keep], data.clean_targets[keep], data.class_names,
                      data.source_indices[keep])


def _params(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


def _space(module: nn.Module, keep: Callable[[str], bool]) -> ParamSpace:
    """The parameters of ``module`` whose names pass ``keep``, in module order."""
    params = _params(module)
    return ParamSpace.of(params, [name for name in params if keep(name)])


def _cholesky(matrix: torch.Tensor) -> Optional[torch.Tensor]:
    """Lower Cholesky factor of a symmetric matrix, or None if it is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    return factor if int(info) == 0 else None


def _newton(gradient: Objective, v: torch.Tensor, factor: torch.Tensor, tol: float) -> torch.Tensor:
    """Newton steps with a fixed Hessian factor while max |gradient| keeps shrinking (by ≥ 10% a step)."""
    g = gradient(v)
    for _ in range(NEWTON_STEPS):
        if g.abs().max() <= tol:
            break
        w = v - torch.cholesky_solve(g[:, None], factor)[:, 0]
        g_w = gradient(w)
        if not g_w.abs().max() < 0.9 * g.abs().max():
            break
        v, g = w, g_w
    return v


def _lbfgs(objective: Objective, v: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    v = v.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], lr=1, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=0.0, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(v)
        loss.backward()
        return loss

    opt.step(closure)
    return v.detach()


def _minimise(objective: Objective, start: torch.Tensor, factor: Optional[torch.Tensor], tol: float, max_iter: int,
              stage: str) -> torch.Tensor:
    """A point with max |∇objective| ≤ tol: Newton steps with ``factor`` while they contract, L-BFGS, then
    Newton steps again (``factor``, then the Hessian where L-BFGS stopped). L-BFGS stalls once the loss no
    longer resolves the gradient (near 1e-9 here) while Newton steps, which use only gradients, converge."""
    gradient = grad(objective)

    def done(v: torch.Tensor) -> bool:
        return bool(gradient(v).abs().max() <= tol)

    v = start if factor is None else _newton(gradient, start, factor, tol)
    if not done(v):
        v = _lbfgs(objective, v, tol, max_iter)
    for given in (factor, None):  # polish: with the given factor, then with the Hessian where we are
        if done(v):
            break
        polish = given if given is not None else _cholesky(hessian(objective)(v))
        if polish is not None:
            v = _newton(gradient, v, polish, tol)
    worst = gradient(v).abs().max().item()
    if worst > 10 * tol:  # a little above tol: a saddle or a flat valley L-BFGS cannot resolve further
        warnings.warn(f"DigitsRecipe: the {stage} stage stopped at max |gradient| {worst:.2g}, far above tol={tol:g}; "
                      "the retrained losses are that much less exact. Raise max_iter.", stacklevel=3)
    return v
