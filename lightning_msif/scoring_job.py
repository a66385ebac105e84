"""One scoring run from resolved models and data: compute (resumably) and write the score matrix.

Shared by the callback (after finetuning) and by re-scoring from snapshots. Runs on every rank of
the process group; only global rank 0 writes the final files.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from .config import InfluenceConfig, influence_kwargs, validate
from .core.comm import Communicator, LocalComm
from .core.data import dataset_of
from .core.influence import InfluenceResult, compute_multistage
from .core.objective import LossFn, cross_entropy_loss
from .core.params import split_shared
from .core.solvers import SolverOptions
from .errors import MSIFError
from .reports.metadata import class_names_of
from .snapshots import (
    FileStore, PathLike, check_fingerprint, fingerprint, read_gradients, read_manifest, read_weights, rebuild, settings_key, versions,
    write_scores,
)


def module_loss(module: nn.Module, loss_fn: Optional[LossFn] = None) -> LossFn:
    """The per-example loss of a module: its ``per_example_loss(batch)``, else ``loss_fn``, else cross-entropy."""
    if callable(getattr(module, "per_example_loss", None)):
        return lambda m, batch: m.per_example_loss(batch)
    if loss_fn is not None:
        return loss_fn

    def default(m: nn.Module, batch: Any) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise MSIFError(
                f"{type(module).__name__} gives no per-example loss for batches of type {type(batch).__name__}. "
                "Give one of: (1) a method `per_example_loss(self, batch) -> Tensor[B]` on the module; "
                "(2) `loss_fn=lambda model, batch: ...` (per-example losses, shape [B]) to the callback; "
                "(3) (x, y) batches, for the default cross-entropy of model(x) against y."
            )
        return cross_entropy_loss(m, batch)

    return default


@dataclass
class ScoringInputs:
    """Both models (at their trained optima) and the three datasets, in dataset-index order."""

    pretrain_model: nn.Module
    finetune_model: nn.Module
    pretrain_data: Any
    finetune_data: Any
    query_data: Any
    pretrain_loss: LossFn
    finetune_loss: LossFn
    query_fn: Optional[LossFn] = None


def _plain(value: Any) -> Any:
    """YAML-safe copy of the solver's convergence record."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def run_scoring(inputs: ScoringInputs, cfg: InfluenceConfig, snapshot_dir: PathLike,
                comm: Optional[Communicator] = None, progress: bool = False,
                identity: Optional[Dict[str, Any]] = None) -> InfluenceResult:
    """Compute the scores (resuming from ``snapshot_dir/work`` if an identical run was cut short), write them."""
    validate(cfg)
    comm = comm or LocalComm()
    kwargs = influence_kwargs(cfg)
    prints = {name: fingerprint(dataset_of(d)) if hasattr(dataset_of(d), "__getitem__") else None
              for name, d in (("pretrain", inputs.pretrain_data), ("finetune", inputs.finetune_data),
                              ("query", inputs.query_data))}
    key = settings_key([sorted(kwargs.items()), prints, sorted((identity or {}).items())])
    store = FileStore(Path(snapshot_dir) / "work" / key)
    theta, rest = split_shared(inputs.pretrain_model, cfg.shared, "pretraining")
    stored = read_gradients(snapshot_dir, identity["pretrain_weights"], theta + rest) if identity else None
    result = compute_multistage(
        inputs.pretrain_model, inputs.finetune_model, inputs.pretrain_data, inputs.finetune_data, inputs.query_data,
        pretrain_loss_fn=inputs.pretrain_loss, finetune_loss_fn=inputs.finetune_loss,
        query_fn=inputs.query_fn or inputs.finetune_loss, comm=comm, store=store, progress=progress,
        pretrain_gradients=stored, **kwargs,
    )
    if comm.rank == 0:
        options = SolverOptions.from_kwargs(dict(cfg.solver_options or {})).as_dict()
        manifest = {
            **{k: v for k, v in asdict(cfg).items() if k in InfluenceConfig.__dataclass_fields__},
            "alpha": kwargs["alpha"],
            "solver_options": options,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "world_size": comm.world_size,
            "fingerprints": prints,
            "identity": identity or {},
            "info": _plain(result.info),
            "sign": "positive = harmful (upweighting the pretraining example raises the query loss); "
                    "negative = helpful; removing example i changes the query loss by about -S[i, j] / n",
        }
        write_scores(snapshot_dir, result.scores.detach().cpu(), manifest)
    comm.all_reduce_sum(torch.zeros(1))  # every rank has finished reading the work folder
    if comm.rank == 0:
        store.clear()
    return result


def load_stage_module(manifest: Any, weights: Dict[str, torch.Tensor], stage: str,
                      module: Optional[nn.Module] = None) -> nn.Module:
    """``module`` (rebuilt from the snapshot's record when None) with the snapshot's weights and trainable set."""
    if module is None:
        if manifest.module is None:
            raise MSIFError(
                f"The {stage} snapshot cannot rebuild its module (no saved hyperparameters): call "
                "self.save_hyperparameters() in the module's __init__ and re-run that stage, or pass the "
                f"{stage} module explicitly (pretrain_model=... on the finetune callback)."
            )
        module = rebuild(manifest.module, f"{stage} module")
    fit = module.load_state_dict(weights, strict=False)
    if fit.missing_keys or fit.unexpected_keys:
        raise MSIFError(
            f"The {stage} snapshot's weights do not fit the {stage} module: missing {fit.missing_keys[:5]}, "
            f"unexpected {fit.unexpected_keys[:5]}. Pass the module class it was trained with."
        )
    trainable = set(manifest.trainable)
    for name, p in module.named_parameters():
        p.requires_grad_(name in trainable)  # θ/U/W follow what was trained in that stage
    return module


def _rebuild_data(manifest: Any, stage: str) -> Any:
    if manifest.data is None:
        raise MSIFError(
            f"The {stage} snapshot has no record of its datamodule (plain DataLoaders, or no saved "
            f"hyperparameters): pass {stage}_data=... explicitly."
        )
    dm = rebuild(manifest.data, f"{stage} datamodule")
    dm.prepare_data()
    dm.setup("fit")
    return dm


def last_config(snapshot_dir: PathLike) -> InfluenceConfig:
    """The settings of the last scoring run in ``snapshot_dir`` (``scores.yaml``), else the defaults."""
    pre_manifest = read_manifest(snapshot_dir, "pretrain")
    if not (Path(snapshot_dir) / "scores.yaml").exists():
        return InfluenceConfig(shared=str(pre_manifest.shared))
    last = OmegaConf.load(Path(snapshot_dir) / "scores.yaml")
    return InfluenceConfig(**{k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
                              for k, v in last.items() if k in InfluenceConfig.__dataclass_fields__})


@dataclass
class SnapshotRun:
    """Everything rebuilt from the two stages' snapshots: inputs, weight hashes, class names."""

    inputs: ScoringInputs
    identity: Dict[str, str]
    pretrain_class_names: Optional[List[str]] = None
    query_class_names: Optional[List[str]] = None


def from_snapshots(snapshot_dir: PathLike, *, pretrain_data: Any = None, finetune_data: Any = None,
                   query_data: Any = None, loss_fn: Optional[LossFn] = None) -> SnapshotRun:
    """Modules and data of both stages, rebuilt from the snapshots' records unless given."""
    pre_manifest, pre_weights = read_weights(snapshot_dir, "pretrain")
    ft_manifest, ft_weights = read_weights(snapshot_dir, "finetune")
    pre = load_stage_module(pre_manifest, pre_weights, "pretrain")
    fine = load_stage_module(ft_manifest, ft_weights, "finetune")
    names: Dict[str, Optional[List[str]]] = {"pretrain": None, "query": None}
    if pretrain_data is None:
        pdm = _rebuild_data(pre_manifest, "pretrain")
        pretrain_data, names["pretrain"] = pdm.train_dataloader(), class_names_of(pdm)
    if pre_manifest.fingerprint is not None:
        check_fingerprint(pre_manifest.fingerprint, dataset_of(pretrain_data), "pretraining data")
    if finetune_data is None or query_data is None:
        dm = _rebuild_data(ft_manifest, "finetune")
        names["query"] = class_names_of(dm)
        finetune_data = finetune_data if finetune_data is not None else dm.train_dataloader()
        if query_data is None:
            split = ft_manifest.get("query")
            if split not in ("val", "test"):
                raise MSIFError("The finetune snapshot does not say which split was queried: pass query_data=...")
            if split == "test":
                dm.setup("test")
            query_data = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    inputs = ScoringInputs(pre, fine, pretrain_data, finetune_data, query_data,
                           module_loss(pre, loss_fn), module_loss(fine, loss_fn))
    identity = {"pretrain_weights": str(pre_manifest.weights.sha256), "finetune_weights": str(ft_manifest.weights.sha256)}
    return SnapshotRun(inputs, identity, names["pretrain"], names["query"])


def rescore(snapshot_dir: PathLike, cfg: Optional[InfluenceConfig] = None, *, pretrain_data: Any = None,
            finetune_data: Any = None, query_data: Any = None, loss_fn: Optional[LossFn] = None,
            comm: Optional[Communicator] = None, progress: bool = True) -> InfluenceResult:
    """Scores from the snapshots of both stages, without retraining (resumes an interrupted run).

    Modules and data are rebuilt from the snapshots' records unless given; ``cfg`` defaults to the
    settings of the last run in ``snapshot_dir`` (``scores.yaml``), else to ``InfluenceConfig()``.
    """
    run = from_snapshots(snapshot_dir, pretrain_data=pretrain_data, finetune_data=finetune_data,
                         query_data=query_data, loss_fn=loss_fn)
    return run_scoring(run.inputs, cfg or last_config(snapshot_dir), snapshot_dir, comm, progress, run.identity)
