"""Retraining both stages on subsets of the pretraining set: cached, resumable, sharded over processes.

Each run's outcome (the finetune loss of every query) is saved the moment it is measured, under a key
hashing everything it depends on: the recipe's class, identity and data, the subset, the seed and
warm start. A rerun reuses what exists, so an interrupted evaluation resumes and an evaluation of
other solvers or methods retrains nothing. Under ``torch.distributed`` the runs still missing on any
rank are dealt round-robin to the ranks and their outcomes all-gathered.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.comm import Communicator, LocalComm
from ..core.data import ExampleSource, to_device

from ..errors import MSIFError
from ..core.objective import LossFn, evaluation, module_loss
from ..atomic import PathLike
from ..snapshots import FileStore, fingerprint, settings_key
from .recipe import Models, TwoStageRecipe, check_models


@dataclass(frozen=True)
class Run:
    """One retraining of both stages: the pretraining examples kept (boolean mask) and the seed."""

    keep: torch.Tensor
    seed: int

    @property
    def full(self) -> bool:
        return bool(self.keep.all())


def recipe_loss(recipe: TwoStageRecipe, stage: str, model: nn.Module) -> LossFn:
    """The recipe's ``<stage>_loss`` if it has one, else the module's ``per_example_loss``, else cross-entropy."""
    fn = getattr(recipe, f"{stage}_loss", None)
    return fn if fn is not None else module_loss(model)


def query_losses(model: nn.Module, data: Any, loss_fn: LossFn) -> torch.Tensor:
    """``[k]`` float64: the loss of every query, in dataset order, with the model in eval mode."""
    source = ExampleSource(data, "query_data")
    first = next(model.parameters())
    out = []
    with evaluation(model), torch.no_grad():
        for batch, idx in source.batches(range(len(source))):
            losses = loss_fn(model, to_device(batch, first.device, first.dtype))
            if not isinstance(losses, torch.Tensor) or losses.shape != idx.shape:
                raise MSIFError(f"The finetune loss must return one loss per query (shape [{len(idx)}]), got "
                                f"{getattr(losses, 'shape', type(losses).__name__)}.")
            out.append(losses.detach().double().cpu())
    return torch.cat(out)


class Retrainer:
    """Outcomes of retraining runs of one recipe, from the cache in ``cache_dir`` or by training.

    ``reference(seed)`` is the full-data pair of a seed (trained once per process): the start of warm
    runs, and the models the scores are computed on.
    """

    def __init__(self, recipe: TwoStageRecipe, cache_dir: PathLike, warm_start: bool,
                 comm: Optional[Communicator] = None, progress: bool = True):
        self.recipe = recipe
        self.store = FileStore(cache_dir)
        self.warm_start = warm_start
        self.comm = comm or LocalComm()
        self.progress = progress
        self.n = len(recipe.pretrain_data)
        self.name = f"{type(recipe).__module__}.{type(recipe).__qualname__}"
        self.identity = [self.name, recipe.identity(),
                         [fingerprint(d) for d in (recipe.pretrain_data, recipe.finetune_data, recipe.query_data)]]
        self.trained = 0  # runs trained so far, over all processes
        self.reused = 0  # runs found in the cache
        self._references: Dict[int, Models] = {}

    def reference(self, seed: int) -> Models:
        if seed not in self._references:
            self._references[seed] = check_models(self.recipe(list(range(self.n)), seed), self.recipe)
        return self._references[seed]

    def key(self, run: Run) -> str:
        subset = hashlib.sha256(run.keep.numpy().tobytes()).hexdigest()
        return settings_key([self.identity, self.n, subset, run.seed, self.warm_start and not run.full])

    def _measure(self, run: Run) -> torch.Tensor:
        if run.full:
            fine = self.reference(run.seed)[1]
        else:
            warm = {"init": self.reference(run.seed)} if self.warm_start else {}
            fine = check_models(self.recipe(run.keep.nonzero().flatten().tolist(), run.seed, **warm), self.recipe)[1]
        return query_losses(fine, self.recipe.query_data, recipe_loss(self.recipe, "finetune", fine))

    def outcomes(self, runs: Sequence[Run]) -> torch.Tensor:
        """``[len(runs), n_query]`` query losses after each run; trains (and saves) only what is missing."""
        for run in runs:
            if run.keep.shape != (self.n,) or not run.keep.any():
                raise MSIFError(f"A retraining subset must be a non-empty mask over the {self.n} pretraining examples.")
        keys = [self.key(r) for r in runs]
        unique = list(dict.fromkeys(keys))
        found: Dict[str, Optional[torch.Tensor]] = {k: self.store.get(k) for k in unique}
        absent = torch.tensor([float(found[k] is None) for k in unique])
        todo = [k for k, a in zip(unique, self.comm.all_reduce_sum(absent).tolist()) if a > 0]  # missing on any rank
        rank, world = self.comm.rank, self.comm.world_size
        mine, by_key = todo[rank::world], dict(zip(keys, runs))
        bar = tqdm(total=len(mine), desc=f"retraining ({len(todo)} runs, {world} process{'es' * (world > 1)})",
                   unit="run", disable=None if self.progress and rank == 0 else True)
        rows: List[torch.Tensor] = []
        for key in mine:
            rows.append(self._measure(by_key[key]))
            self.store.put(key, rows[-1])  # saved at once: an interrupted evaluation resumes from here
            bar.update(1)
        bar.close()
        k = len(self.recipe.query_data)
        gathered = self.comm.all_gather_rows(torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.float64))
        found.update(zip([key for r in range(world) for key in todo[r::world]], gathered))
        self.trained += len(todo)
        self.reused += len(unique) - len(todo)
        return torch.stack([found[key] for key in keys])  # type: ignore[misc]
