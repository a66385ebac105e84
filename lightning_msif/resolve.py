"""Rebuild what a scoring run needs from the snapshots: modules, data, the queried split.

The one resolver behind the finetune callback (which has the finetune module and data in hand and
rebuilds the pretraining side) and behind ``rescore`` / ``msif`` (which rebuild both stages).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .core.data import class_names_of, dataset_of
from .core.objective import LossFn, module_loss
from .core.precision import compute_dtype
from .errors import MSIFError
from .scoring_job import ScoringInputs
from .snapshots import SnapshotDir, check_fingerprint, rebuild
from .trust import Trust

QUERY_SPLITS = ("val", "test")

Prepare = Callable[[Any], None]
"""How a rebuilt datamodule downloads/prepares its data: ``dm.prepare_data()`` here; the callback runs it
on local rank 0 behind a barrier."""


def _hint(stage: str, kind: str) -> str:
    """The keywords that pass a stage's module or data instead of rebuilding it (callback and ``rescore`` alike)."""
    if kind == "module":
        return f"{stage}_model=..."
    return "pretrain_data=..." if stage == "pretrain" else "finetune_data=... and query_data=..."


def _rebuild(manifest: DictConfig, stage: str, kind: str, trust: Trust) -> Any:
    record = manifest.module if kind == "module" else manifest.data
    return rebuild(record, kind, f"{stage} {kind}", trust, _hint(stage, kind))


def admit(manifest: DictConfig, stage: str, trust: Trust, *, module: bool, data: bool) -> None:
    """Refuse, before anything is rebuilt, a record of ``stage`` that will be rebuilt (``module`` / ``data``)
    and that ``trust`` does not admit: a run stops before any work, and nothing a snapshot names is imported."""
    for kind, record, wanted in (("module", manifest.module, module), ("datamodule", manifest.data, data)):
        if wanted and record is not None:
            trust.check(OmegaConf.to_container(record), f"{stage} {kind}", _hint(stage, kind))


def stage_dtype(manifest: DictConfig, weights: Dict[str, torch.Tensor]) -> torch.dtype:
    """The precision a stage was trained in: its shared parameters' dtype in the snapshot."""
    return weights[next(iter(manifest.shared_params))].dtype


def load_stage_module(manifest: DictConfig, weights: Dict[str, torch.Tensor], stage: str,
                      module: Optional[nn.Module] = None, dtype: Optional[torch.dtype] = None,
                      trust: Trust = Trust()) -> nn.Module:
    """``module`` (rebuilt from the snapshot's record when None and ``trust`` admits it) with the snapshot's
    weights and trainable set.

    The weights load in the dtype they were trained in (a module rebuilt at the default dtype would round
    float64 ones), are rounded to ``dtype`` when given (the finetune side's precision, so both stages hold
    the same shared values) and held in that precision's compute dtype (``core.precision``).
    """
    if module is None:
        if manifest.module is None:
            raise MSIFError(
                f"The {stage} snapshot cannot rebuild its module (no saved hyperparameters): call "
                "self.save_hyperparameters() in the module's __init__ and re-run that stage, or pass the "
                f"{stage} module explicitly ({_hint(stage, 'module')})."
            )
        module = _rebuild(manifest, stage, "module", trust)
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


def rebuild_datamodule(manifest: DictConfig, stage: str, prepare: Optional[Prepare] = None,
                       trust: Trust = Trust(), missing: Sequence[str] = ()) -> Any:
    """The stage's datamodule from its record (if ``trust`` admits it), prepared and set up for ``fit``; without a
    record, the error names the ``missing`` keywords that give the data instead (default: ``<stage>_data``)."""
    if manifest.data is None:
        given = " and ".join(f"{name}=..." for name in (missing or [f"{stage}_data"]))
        raise MSIFError(
            f"The {stage} snapshot cannot rebuild its datamodule (fit was given plain DataLoaders, or the "
            "datamodule has no saved hyperparameters: call self.save_hyperparameters() in its __init__ to record "
            f"them). Pass the data in hand instead: {given} (DataLoaders or Datasets, in the order trained on) to "
            f"lightning_msif.rescore(snapshot_dir, ...){' or to MultiStageInfluence' if stage == 'pretrain' else ''}; "
            "msif score cannot take data."
        )
    dm = _rebuild(manifest, stage, "datamodule", trust)
    (prepare or (lambda d: d.prepare_data()))(dm)
    dm.setup("fit")
    return dm


def single_loader(source: Any) -> Any:
    """The one loader of a ``CombinedLoader``, dict or list that holds a single one; several are refused, since
    a score matrix indexes one training set."""
    iterables = getattr(source, "iterables", source)  # a CombinedLoader around the user's loader(s)
    if isinstance(iterables, Mapping):
        named = list(iterables.items())
    elif isinstance(iterables, (list, tuple)):
        named = list(enumerate(iterables))
    else:
        return iterables
    if len(named) == 1:
        return named[0][1]
    raise MSIFError(
        f"The training data of fit is {len(named)} loaders ({[name for name, _ in named]}); lightning-msif scores "
        "one training set, indexed from 0. Train on one loader (a CombinedLoader, dict or list holding a single "
        "loader is fine), or join the datasets into one (torch.utils.data.ConcatDataset) in one loader."
    )


def query_loader(dm: Any, split: Any) -> Any:
    """The ``val`` or ``test`` loader of a datamodule (set up for ``test`` when needed)."""
    if split not in QUERY_SPLITS:
        raise MSIFError(f"query={split!r} is not a split to explain; choose one of {list(QUERY_SPLITS)} or pass "
                        "the query data itself.")
    if split == "test":
        dm.setup("test")
    return dm.val_dataloader() if split == "val" else dm.test_dataloader()


def check_mode(mode: str, shared: Iterable[str], trainable: Iterable[str], snapshot: bool) -> None:
    """The finetune stage treats the shared parameters θ as ``mode`` assumes: frozen in fixed mode, trained in
    updated mode (else the scores answer another question: updated mode on a frozen θ meets an indefinite Hessian).
    ``snapshot``: the stage is over and the fix is the other mode; else the module is about to train."""
    trainable = set(trainable)
    trained = [name for name in shared if name in trainable]
    if mode == "fixed" and trained:
        fix = ("score it with mode=updated (and the alpha it was trained with)" if snapshot else
               "Freeze it (requires_grad_(False)) or use mode='updated' with alpha")
        raise MSIFError(f"mode='fixed' assumes the shared embedding is frozen while finetuning, but {trained[:3]} "
                        f"{'were trained' if snapshot else 'require gradients'}. {fix}.")
    if mode == "updated" and not trained:
        fix = "score it with mode=fixed" if snapshot else "Let it train (requires_grad_(True)) or use mode='fixed'"
        raise MSIFError(f"mode='updated' assumes the shared embedding is finetuned (with the proximal term), but "
                        f"none of its parameters {'were trained' if snapshot else 'require gradients'}. {fix}.")


@dataclass
class PretrainingSide:
    """The pretraining stage as rebuilt from its snapshot (module, data) and what the reports want of it."""

    manifest: DictConfig
    weights: Dict[str, torch.Tensor]
    module: nn.Module
    data: Any
    class_names: Optional[List[str]] = None
    fingerprint: Optional[Dict[str, Any]] = None  # of ``data``, taken when it was checked against the snapshot


def pretraining_side(snapshots: SnapshotDir, *, module: Optional[nn.Module] = None, data: Any = None,
                     prepare: Optional[Prepare] = None, dtype: Optional[torch.dtype] = None,
                     trust: Trust = Trust()) -> PretrainingSide:
    """The pretraining module and data (rebuilt from the snapshot's records unless given, as far as ``trust``
    admits), fingerprint checked; ``dtype``: the finetune side's precision (``load_stage_module``)."""
    manifest, weights = snapshots.load_stage("pretrain")
    admit(manifest, "pretrain", trust, module=module is None, data=data is None)
    module = load_stage_module(manifest, weights, "pretrain", module, dtype, trust)
    names = None
    if data is None:
        dm = rebuild_datamodule(manifest, "pretrain", prepare, trust)
        data, names = single_loader(dm.train_dataloader()), class_names_of(dm)
    checked = None
    if manifest.fingerprint is not None:
        checked = check_fingerprint(manifest.fingerprint, dataset_of(data), "pretraining data")
    return PretrainingSide(manifest, weights, module, data, names, checked)


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


def from_snapshots(snapshots: SnapshotDir, *, pretrain_model: Optional[nn.Module] = None,
                   finetune_model: Optional[nn.Module] = None, pretrain_data: Any = None, finetune_data: Any = None,
                   query_data: Any = None, loss_fn: Optional[LossFn] = None, trust: Trust = Trust()) -> SnapshotRun:
    """Modules and data of both stages, rebuilt from the snapshots' records unless given (as far as ``trust``
    admits: ``trust.py``)."""
    ft_manifest, ft_weights = snapshots.load_stage("finetune")
    admit(ft_manifest, "finetune", trust, module=finetune_model is None,
          data=finetune_data is None or query_data is None)
    pre = pretraining_side(snapshots, module=pretrain_model, data=pretrain_data,
                           dtype=stage_dtype(ft_manifest, ft_weights), trust=trust)
    fine = load_stage_module(ft_manifest, ft_weights, "finetune", finetune_model, trust=trust)
    query_names = None
    if finetune_data is None or query_data is None:
        given = (("finetune_data", finetune_data), ("query_data", query_data))
        missing = [name for name, data in given if data is None]
        dm = rebuild_datamodule(ft_manifest, "finetune", trust=trust, missing=missing)
        query_names = class_names_of(dm)
        finetune_data = finetune_data if finetune_data is not None else single_loader(dm.train_dataloader())
        if query_data is None:
            split = ft_manifest.get("query")
            if split not in QUERY_SPLITS:
                raise MSIFError("The finetune snapshot does not say which split was queried: pass query_data=...")
            query_data = query_loader(dm, split)
    inputs = ScoringInputs(pre.module, fine, pre.data, finetune_data, query_data,
                           module_loss(pre.module, loss_fn), module_loss(fine, loss_fn),
                           pretrain_fingerprint=pre.fingerprint)
    return SnapshotRun(inputs, identity_of(pre.manifest, ft_manifest), pre.class_names, query_names)
