"""Rebuild what a scoring run needs from the snapshots: modules, data, the queried split.

The one resolver behind the finetune callback (which has the finetune module and data in hand and
rebuilds the pretraining side) and behind ``rescore`` / ``msif`` (which rebuild both stages).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from .core.data import class_names_of, dataset_of
from .core.objective import LossFn, module_loss
from .core.precision import compute_dtype
from .errors import MSIFError
from .scoring_job import ScoringInputs
from .snapshots import SnapshotDir, check_fingerprint, rebuild

QUERY_SPLITS = ("val", "test")

Prepare = Callable[[Any], None]
"""How a rebuilt datamodule downloads/prepares its data: ``dm.prepare_data()`` here; the callback runs it
on local rank 0 behind a barrier."""


def stage_dtype(manifest: DictConfig, weights: Dict[str, torch.Tensor]) -> torch.dtype:
    """The precision a stage was trained in: its shared parameters' dtype in the snapshot."""
    return weights[next(iter(manifest.shared_params))].dtype


def load_stage_module(manifest: DictConfig, weights: Dict[str, torch.Tensor], stage: str,
                      module: Optional[nn.Module] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``module`` (rebuilt from the snapshot's record when None) with the snapshot's weights and trainable set.

    The weights load in the dtype they were trained in (a module rebuilt at the default dtype would round
    float64 ones), are rounded to ``dtype`` when given (the finetune side's precision, so both stages hold
    the same shared values) and held in that precision's compute dtype (``core.precision``).
    """
    if module is None:
        if manifest.module is None:
            raise MSIFError(
                f"The {stage} snapshot cannot rebuild its module (no saved hyperparameters): call "
                "self.save_hyperparameters() in the module's __init__ and re-run that stage, or pass the "
                f"{stage} module explicitly (pretrain_model=... on the finetune callback)."
            )
        module = rebuild(manifest.module, f"{stage} module")
    trained = stage_dtype(manifest, weights)
    fit = module.to(trained).load_state_dict(weights, strict=False)
    if fit.missing_keys or fit.unexpected_keys:
        raise MSIFError(
            f"The {stage} snapshot's weights do not fit the {stage} module: missing {fit.missing_keys[:5]}, "
            f"unexpected {fit.unexpected_keys[:5]}. Pass the module class it was trained with."
        )
    trainable = set(manifest.trainable)
    for name, p in module.named_parameters():
        p.requires_grad_(name in trainable)  # θ/U/W follow what was trained in that stage
    precision = dtype or trained
    return module.to(precision).to(compute_dtype(precision))


def rebuild_datamodule(manifest: DictConfig, stage: str, prepare: Optional[Prepare] = None) -> Any:
    """The stage's datamodule from its record, prepared and set up for ``fit``."""
    if manifest.data is None:
        raise MSIFError(
            f"The {stage} snapshot has no record of its datamodule (plain DataLoaders, or no saved "
            f"hyperparameters): pass {stage}_data=<the {stage} DataLoader or Dataset> explicitly."
        )
    dm = rebuild(manifest.data, f"{stage} datamodule")
    (prepare or (lambda d: d.prepare_data()))(dm)
    dm.setup("fit")
    return dm


def query_loader(dm: Any, split: Any) -> Any:
    """The ``val`` or ``test`` loader of a datamodule (set up for ``test`` when needed)."""
    if split not in QUERY_SPLITS:
        raise MSIFError(f"query={split!r} is not a split to explain; choose one of {list(QUERY_SPLITS)} or pass "
                        "the query data itself.")
    if split == "test":
        dm.setup("test")
    return dm.val_dataloader() if split == "val" else dm.test_dataloader()


@dataclass
class PretrainingSide:
    """The pretraining stage as rebuilt from its snapshot (module, data) and what the reports want of it."""

    manifest: DictConfig
    weights: Dict[str, torch.Tensor]
    module: nn.Module
    data: Any
    class_names: Optional[List[str]] = None


def pretraining_side(snapshots: SnapshotDir, *, module: Optional[nn.Module] = None, data: Any = None,
                     prepare: Optional[Prepare] = None, dtype: Optional[torch.dtype] = None) -> PretrainingSide:
    """The pretraining module and data (rebuilt from the snapshot's records unless given), fingerprint checked;
    ``dtype``: the finetune side's precision (``load_stage_module``)."""
    manifest, weights = snapshots.load_stage("pretrain")
    module = load_stage_module(manifest, weights, "pretrain", module, dtype)
    names = None
    if data is None:
        dm = rebuild_datamodule(manifest, "pretrain", prepare)
        data, names = dm.train_dataloader(), class_names_of(dm)
    if manifest.fingerprint is not None:
        check_fingerprint(manifest.fingerprint, dataset_of(data), "pretraining data")
    return PretrainingSide(manifest, weights, module, data, names)


@dataclass
class SnapshotRun:
    """Everything rebuilt from the two stages' snapshots: inputs, weight hashes, class names."""

    inputs: ScoringInputs
    identity: Dict[str, str]
    pretrain_class_names: Optional[List[str]] = None
    query_class_names: Optional[List[str]] = None


def identity_of(pretrain: DictConfig, finetune: DictConfig) -> Dict[str, str]:
    """The two stages' weight hashes: which stored results belong to these models."""
    return {"pretrain_weights": str(pretrain.weights.sha256), "finetune_weights": str(finetune.weights.sha256)}


def from_snapshots(snapshots: SnapshotDir, *, pretrain_data: Any = None, finetune_data: Any = None,
                   query_data: Any = None, loss_fn: Optional[LossFn] = None) -> SnapshotRun:
    """Modules and data of both stages, rebuilt from the snapshots' records unless given."""
    ft_manifest, ft_weights = snapshots.load_stage("finetune")
    pre = pretraining_side(snapshots, data=pretrain_data, dtype=stage_dtype(ft_manifest, ft_weights))
    fine = load_stage_module(ft_manifest, ft_weights, "finetune")
    query_names = None
    if finetune_data is None or query_data is None:
        dm = rebuild_datamodule(ft_manifest, "finetune")
        query_names = class_names_of(dm)
        finetune_data = finetune_data if finetune_data is not None else dm.train_dataloader()
        if query_data is None:
            split = ft_manifest.get("query")
            if split not in QUERY_SPLITS:
                raise MSIFError("The finetune snapshot does not say which split was queried: pass query_data=...")
            query_data = query_loader(dm, split)
    inputs = ScoringInputs(pre.module, fine, pre.data, finetune_data, query_data,
                           module_loss(pre.module, loss_fn), module_loss(fine, loss_fn))
    return SnapshotRun(inputs, identity_of(pre.manifest, ft_manifest), pre.class_names, query_names)
