"""``evaluate``: do the scores predict what retraining does? Leave-one-out and LDS against baselines.

1. The scores of every method, on the recipe's full-data models of ``seed`` (first: a bad setting fails
   before any retraining).
2. Every retraining run at once, through the cache (``retrain.Retrainer``): the full set and each
   leave-one-out subset for every ``loo.seeds``, each LDS subset for every ``lds.seeds``.
3. Per method: leave-one-out Pearson/Spearman of ``−S/n`` with the measured loss changes, and the LDS
   mean ± std over seeds (``metrics``); files and W&B on global rank 0 (``report``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..core.arguments import InfluenceArguments, ScoreArguments, arguments_from
from ..core.comm import Communicator
from ..core.influence import multistage_scores
from ..distributed import current_comm
from ..errors import MSIFError
from .baselines import grad_dot_scores, random_scores, single_stage_scores
from .config import METHODS, EvaluationConfig, LDSConfig, LOOConfig
from .metrics import lds, loo_correlations
from .recipe import TwoStageRecipe, build_recipe
from .report import log_wandb, write_outputs
from .result import EvaluationResult
from .retrain import Retrainer, Run, recipe_loss

def _config(config: Optional[EvaluationConfig], settings: Dict[str, Any]) -> EvaluationConfig:
    cfg = config or EvaluationConfig()
    for key in ("loo", "lds"):
        if isinstance(settings.get(key), Mapping):
            settings[key] = dataclasses.replace(getattr(cfg, key), **settings[key])
    try:
        return dataclasses.replace(cfg, **settings)
    except TypeError as err:
        names = [f.name for f in dataclasses.fields(EvaluationConfig)]
        raise MSIFError(f"Unknown evaluate setting ({err}); the settings are {names}.") from None


def _check(cfg: EvaluationConfig, n: int, extra: Mapping[str, torch.Tensor], k: int) -> None:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or len(set(cfg.methods)) != len(cfg.methods):
        raise MSIFError(f"methods={list(cfg.methods)}: each must be one of {list(METHODS)}, at most once.")
    for name, s in extra.items():
        if name in cfg.methods or tuple(s.shape) != (n, k):
            raise MSIFError(f"extra_scores[{name!r}] must be a [n_pretrain, n_query] = [{n}, {k}] tensor with a name "
                            f"other than the methods'; got shape {tuple(s.shape)}.")
    if not cfg.methods and not extra:
        raise MSIFError(f"No scores to evaluate: give methods (from {list(METHODS)}) or extra_scores.")
    loo, sub = cfg.loo, cfg.lds
    if loo.indices is not None:
        if not loo.indices or len(set(loo.indices)) != len(loo.indices) or not all(0 <= i < n for i in loo.indices):
            raise MSIFError(f"loo.indices must be distinct pretraining indices in [0, {n}), got {loo.indices}.")
    elif not 0 <= loo.examples <= n:
        raise MSIFError(f"loo.examples={loo.examples}: must be between 0 (no leave-one-out) and n={n}.")
    if not 0.0 < sub.fraction < 1.0:
        raise MSIFError(f"lds.fraction={sub.fraction}: must lie strictly between 0 and 1.")
    if sub.subsets and not 1 <= round(sub.fraction * n) < n:
        raise MSIFError(f"lds.fraction={sub.fraction} keeps {round(sub.fraction * n)} of {n} examples: an empty or "
                        "full subset. Pick a fraction that keeps between 1 and n − 1 examples.")
    if sub.subsets == 1 or sub.subsets < 0:
        raise MSIFError(f"lds.subsets={sub.subsets}: a rank correlation needs at least 2 subsets (0: no LDS).")
    removed = len(loo.indices) if loo.indices is not None else loo.examples
    if not removed and not sub.subsets:
        raise MSIFError("Nothing to measure: loo.examples (or loo.indices) and lds.subsets are both 0.")
    for name, seeds, used in (("loo.seeds", loo.seeds, removed), ("lds.seeds", sub.seeds, sub.subsets)):
        if used and (not seeds or len(set(seeds)) != len(seeds)):
            raise MSIFError(f"{name}={list(seeds)}: give one or more distinct seeds.")


def _loo_indices(cfg: LOOConfig, n: int, seed: int) -> torch.Tensor:
    """The removed examples: as given, or the first ``examples`` of a seeded permutation (stable as it grows)."""
    if cfg.indices is not None:
        return torch.tensor(cfg.indices, dtype=torch.long)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: cfg.examples]


def _lds_masks(cfg: LDSConfig, n: int, seed: int) -> torch.Tensor:
    """``[subsets, n]`` random subsets of ``round(fraction·n)`` examples; the first m do not depend on ``subsets``."""
    g = torch.Generator().manual_seed(seed + 1)
    masks = torch.zeros(cfg.subsets, n, dtype=torch.bool)
    for m in range(cfg.subsets):
        masks[m, torch.randperm(n, generator=g)[: round(cfg.fraction * n)]] = True
    return masks


def _method_scores(method: str, recipe: TwoStageRecipe, retrainer: Retrainer, cfg: Any,
                   args: InfluenceArguments, comm: Communicator) -> torch.Tensor:
    n, k = len(recipe.pretrain_data), len(recipe.query_data)
    if method == "random":
        return random_scores(n, k, cfg.seed)
    pre, fine = retrainer.reference(cfg.seed)
    pt_loss, q_loss = recipe_loss(recipe, "pretrain", pre), recipe_loss(recipe, "finetune", fine)
    if method == "grad_dot":
        return grad_dot_scores(pre, fine, recipe.pretrain_data, recipe.query_data, recipe.shared, pt_loss, q_loss, comm,
                               args.chunk_size)
    if method == "single_stage":
        single = {f.name: getattr(args, f.name) for f in dataclasses.fields(ScoreArguments)}
        return single_stage_scores(fine, recipe.pretrain_data, recipe.query_data, pt_loss, q_loss,
                                   {**single, "comm": comm, "progress": cfg.progress})
    return multistage_scores(pre, fine, recipe.pretrain_data, recipe.finetune_data, recipe.query_data, args,
                             pretrain_loss_fn=pt_loss, finetune_loss_fn=q_loss, query_fn=q_loss, comm=comm,
                             progress=cfg.progress).scores


def _measure(retrainer: Retrainer, loo_idx: torch.Tensor, masks: torch.Tensor, loo_seeds: List[int],
             lds_seeds: List[int], k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One pass over every retraining run: leave-one-out loss changes ``[E, k]`` (mean over seeds), LDS losses
    ``[seeds, subsets, k]``."""
    full = torch.ones(retrainer.n, dtype=torch.bool)
    runs = [Run(full, s) for s in loo_seeds]
    runs += [Run(full.index_fill(0, i.reshape(1), False), s) for i in loo_idx for s in loo_seeds]
    runs += [Run(m, s) for s in lds_seeds for m in masks]
    losses = retrainer.outcomes(runs)
    base, n_loo = losses[: len(loo_seeds)], len(loo_idx) * len(loo_seeds)
    removed = losses[len(loo_seeds) : len(loo_seeds) + n_loo].reshape(len(loo_idx), len(loo_seeds), k)
    return (removed - base).mean(1), losses[len(loo_seeds) + n_loo :].reshape(len(lds_seeds), len(masks), k)


def _row(name: str, scores: torch.Tensor, loo_idx: torch.Tensor, loo_actual: torch.Tensor, masks: torch.Tensor,
         lds_losses: torch.Tensor, seconds: float) -> Tuple[Dict[str, Any], List[float]]:
    """The table row of one method, and its LDS per seed."""
    n = scores.shape[0]
    loo = loo_correlations(-scores[loo_idx] / n, loo_actual) if len(loo_idx) else {"pearson": None, "spearman": None}
    per_seed = lds(scores, masks, lds_losses).tolist() if len(masks) else []
    vals = torch.tensor(per_seed, dtype=torch.float64)
    return ({"method": name, "loo_pearson": loo["pearson"], "loo_spearman": loo["spearman"],
             "lds_mean": vals.mean().item() if len(vals) else None,
             "lds_std": vals.std().item() if len(vals) > 1 else None, "score_seconds": seconds}, per_seed)


def evaluate(recipe: Union[TwoStageRecipe, str, Mapping[str, Any]], config: Optional[EvaluationConfig] = None, *,
             extra_scores: Optional[Mapping[str, torch.Tensor]] = None, wandb: Any = None,
             comm: Optional[Communicator] = None, **settings: Any) -> EvaluationResult:
    """Leave-one-out and LDS of each method's scores against retraining ``recipe`` (see the module docstring).

    ``recipe``: a ``TwoStageRecipe``, a built-in name (``"digits"``) or a Hydra config with ``_target_``.
    ``settings`` override fields of ``config`` (``loo``/``lds`` may be dicts). ``extra_scores``: more
    ``[n_pretrain, n_query]`` score matrices to rank (same sign convention), e.g. another library's.
    ``wandb``: a ``WandbLogger`` or a W&B run to log the table and plots to. Call it on every rank of a
    process group: the retraining runs and the scores are shared out, files are written by rank 0.
    The full-data models of ``seed`` are trained in every call (the scores are computed on them); every
    other training run is read from the cache when an earlier evaluation saved it.
    """
    cfg = _config(config, settings)
    recipe = build_recipe(recipe)
    extra = {name: s.detach().double().cpu() for name, s in (extra_scores or {}).items()}
    n, k = len(recipe.pretrain_data), len(recipe.query_data)
    _check(cfg, n, extra, k)
    damping = recipe.damping if cfg.damping is None else cfg.damping
    args = arguments_from(InfluenceArguments, cfg, shared=recipe.shared, mode=recipe.mode, alpha=recipe.alpha,
                          damping=damping)
    comm = comm or current_comm()
    retrainer = Retrainer(recipe, cfg.cache_dir or Path(cfg.out_dir) / "retrains", cfg.warm_start, comm, cfg.progress)
    if set(cfg.methods) - {"random"}:
        retrainer.reference(cfg.seed)  # the scored models, trained before the methods are timed
    scores, seconds = {}, {}
    for method in cfg.methods:
        start = time.perf_counter()
        scores[method] = _method_scores(method, recipe, retrainer, cfg, args, comm).double().cpu()
        seconds[method] = time.perf_counter() - start
    scores.update(extra)

    loo_idx, masks = _loo_indices(cfg.loo, n, cfg.seed), _lds_masks(cfg.lds, n, cfg.seed)
    loo_seeds = list(cfg.loo.seeds) if len(loo_idx) else []
    lds_seeds = list(cfg.lds.seeds) if len(masks) else []
    loo_actual, lds_losses = _measure(retrainer, loo_idx, masks, loo_seeds, lds_seeds, k)
    rows, per_seed = [], {}
    for name, s in scores.items():
        row, per_seed[name] = _row(name, s, loo_idx, loo_actual, masks, lds_losses, seconds.get(name, 0.0))
        rows.append(row)
    summary = {"recipe": retrainer.name, "recipe_identity": recipe.identity(), "n_pretrain": n, "n_query": k,
               "mode": recipe.mode, "alpha": recipe.alpha, "damping": damping, "solver": cfg.solver,
               "solver_options": dict(cfg.solver_options), "warm_start": cfg.warm_start, "seed": cfg.seed,
               "loo_seeds": loo_seeds, "lds_seeds": lds_seeds, "lds_fraction": cfg.lds.fraction,
               "world_size": comm.world_size}
    result = EvaluationResult(rows, scores, loo_idx, loo_actual, masks, lds_losses, per_seed, summary,
                              retrainer.trained, retrainer.reused)
    if comm.rank == 0:
        result.files = write_outputs(result, Path(cfg.out_dir))
        if wandb is not None:
            log_wandb(wandb, result)
    return result
