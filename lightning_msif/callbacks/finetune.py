"""``MultiStageInfluence``: the finetuning ``Trainer``'s callback, which scores after finetuning.

``setup`` checks everything against the pretraining snapshot before any training step; updated mode can
enforce the proximal term while training; ``on_train_end`` (process group up, module on its device)
snapshots the finetune stage, computes the scores on every rank of the trainer's strategy, writes
``<snapshot_dir>/scores.safetensors`` and, on rank 0, reports to the local files and every logger.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from ..atomic import PathLike
from ..core.arguments import InfluenceArguments, arguments_from, help_of
from ..core.data import class_names_of, dataset_of
from ..core.objective import LossFn, module_loss
from ..distributed import current_comm
from ..errors import MSIFError
from ..reports.html import MAX_QUERIES, check_page_options
from ..reports.publish import report_scores
from ..reports.render import Renderer
from ..resolve import QUERY_SPLITS, check_mode, identity_of, pretraining_side, query_loader
from ..scoring_job import ScoringInputs, run_scoring
from ..snapshots import SnapshotDir, check_shared
from ..trust import Trust
from .common import StageCallback, check_strategy, train_loader, trained_dtype


class MultiStageInfluence(StageCallback):
    """Trace a finetuned model's predictions back to the pretraining examples that caused them.

    Give the finetuning ``Trainer`` this callback and the pretraining one a ``PretrainingSnapshot`` with the
    same ``snapshot_dir`` and ``shared`` prefix. After finetuning, ``scores`` holds ``S [n_pretrain, n_query]``
    on global rank 0 (positive = harmful: upweighting the pretraining example raises the query's loss;
    negative = helpful), also written to ``<snapshot_dir>/scores.safetensors`` (``load_scores``).

    How the scores are computed is an ``InfluenceArguments``: pass one as ``arguments=``, or its fields as
    keywords (they override ``arguments``); the fields are listed below. Per-example losses: the module's
    ``per_example_loss(batch)``, else ``loss_fn(model, batch)``, else cross-entropy on ``(x, y)`` batches.
    ``query`` is ``"val"``, ``"test"`` or a DataLoader. The pretraining data and module are rebuilt from the
    snapshot's records unless ``pretrain_data`` / ``pretrain_model`` are given; a record is rebuilt only if
    this user wrote the snapshot on this machine, its class is in ``trusted_classes`` (or
    ``$MSIF_TRUSTED_CLASSES``), or ``trust_records=True`` (docs/security.md).
    """

    STAGE = "finetune"

    def __init__(
        self,
        snapshot_dir: PathLike,
        *,
        query: Union[str, DataLoader] = "val",
        loss_fn: Optional[LossFn] = None,
        query_fn: Optional[LossFn] = None,
        pretrain_data: Any = None,
        pretrain_model: Optional[nn.Module] = None,
        enforce_proximal: bool = False,
        top_k: int = 10,
        max_queries: int = MAX_QUERIES,
        render: Optional[Renderer] = None,
        report: bool = True,
        progress: bool = True,
        trust_records: bool = False,
        trusted_classes: Iterable[str] = (),
        arguments: Optional[InfluenceArguments] = None,
        **settings: Any,
    ):
        names = [f.name for f in fields(InfluenceArguments)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise MSIFError(f"MultiStageInfluence got unknown setting(s) {unknown}; the influence settings are "
                            f"{names}, the callback's own are query, loss_fn, query_fn, pretrain_data, pretrain_model, "
                            "enforce_proximal, top_k, max_queries, render, report, progress, trust_records, "
                            "trusted_classes.")
        self.arguments = arguments_from(InfluenceArguments, arguments or InfluenceArguments(), **settings)
        if isinstance(query, str) and query not in QUERY_SPLITS:
            raise MSIFError(f"query={query!r} is not allowed; choose one of {list(QUERY_SPLITS)} or pass a DataLoader.")
        if enforce_proximal and self.arguments.mode != "updated":
            raise MSIFError("enforce_proximal=True applies to mode='updated' only (it adds α(θ − θ̂) to the gradients).")
        check_page_options(top_k, max_queries)
        self.trust = Trust.of(trust_records, trusted_classes)
        self.snapshots = SnapshotDir(snapshot_dir)
        self.query = query
        self.loss_fn = loss_fn
        self.query_fn = query_fn
        self.pretrain_data = pretrain_data
        self.pretrain_model = pretrain_model
        self.enforce_proximal = enforce_proximal
        self.top_k = top_k
        self.max_queries = max_queries
        self.render = render
        self.report = report
        self.progress = progress
        self.scores: Optional[torch.Tensor] = None  # on global rank 0, after finetuning (None when streamed)
        self.info: Dict[str, Any] = {}
        self._pretrain_class_names: Optional[List[str]] = None
        self._theta_hat: Dict[str, torch.Tensor] = {}
        self._pretrain_manifest: Any = None
        self._pretrain_fingerprint: Optional[Dict[str, Any]] = None

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "scored": bool(self.info)}

    @staticmethod
    def load_scores(snapshot_dir: PathLike) -> torch.Tensor:
        """The score matrix a finetune stage wrote under ``snapshot_dir``."""
        return SnapshotDir(snapshot_dir).read_scores()[0]

    # -- checks before training ---------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer)
        args = self.arguments
        manifest = self.snapshots.manifest("pretrain")
        check_shared(manifest, pl_module, args.shared)
        shared = {n: p for n, p in pl_module.named_parameters() if n in manifest.shared_params}
        check_mode(args.mode, shared, [n for n, p in shared.items() if p.requires_grad], snapshot=False)

        def prepare(dm: Any) -> None:
            if trainer.local_rank == 0:
                dm.prepare_data()
            trainer.strategy.barrier("msif_prepare_pretrain_data")

        dtype = trained_dtype(trainer, pl_module)  # both stages are scored as models of this precision
        pre = pretraining_side(self.snapshots, module=self.pretrain_model, data=self.pretrain_data, prepare=prepare,
                               dtype=dtype, trust=self.trust)
        if args.mode == "fixed":
            changed = [n for n, p in shared.items()
                       if not torch.equal(p.detach().cpu().to(dtype), pre.weights[n].to(dtype))]
            if changed:
                raise MSIFError(
                    f"mode='fixed' needs the finetune module to start from the pretrained shared weights, but "
                    f"{changed[:3]} differ from the pretraining snapshot in the precision this trainer trains in "
                    f"({dtype}). Load them first, e.g. lightning_msif.load_pretrained(module, snapshot_dir), into "
                    "the module as it is trained (created under `with trainer.init_module():` for a '-true' "
                    "precision), or use mode='updated'."
                )
        if args.mode == "updated" and self.enforce_proximal:
            self._theta_hat = {n: pre.weights[n].to(p.device, dtype) for n, p in shared.items()}
        self._pretrain_manifest = pre.manifest
        self.pretrain_model, self.pretrain_data = pre.module, pre.data
        self._pretrain_class_names = pre.class_names
        self._pretrain_fingerprint = pre.fingerprint

    # -- during training -------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        """Updated mode with ``enforce_proximal``: the gradient of α/2‖θ − θ̂‖², added once per step of the optimizer
        that updates θ (with several optimizers, manual optimization, the others' steps leave θ's gradient alone)."""
        if not self._theta_hat:
            return
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, p in pl_module.named_parameters():
            hat = self._theta_hat.get(name)
            if hat is not None and id(p) in stepped and p.grad is not None:
                p.grad.add_(p.detach() - hat, alpha=self.arguments.alpha)

    # -- after training ----------------------------------------------------------------------------
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        finetune_manifest = self._snapshot(trainer, pl_module)
        self._score(trainer, pl_module, finetune_manifest)

    def _snapshot(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
        """The finetune snapshot (written by rank 0); its weights hash is agreed by all ranks."""
        manifest = None
        if trainer.is_global_zero:
            dataset = dataset_of(train_loader(trainer))
            manifest = self.snapshots.write_stage(
                "finetune", pl_module, self.arguments.shared, data=trainer.datamodule,
                train_dataset=dataset if hasattr(dataset, "__len__") else None,
                extra={"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                       "query": self.query if isinstance(self.query, str) else None})
        trainer.strategy.barrier("msif_snapshot")
        return manifest if manifest is not None else self.snapshots.manifest("finetune")

    def _query_loader(self, trainer: "pl.Trainer") -> Any:
        if not isinstance(self.query, str):
            return self.query
        if trainer.datamodule is not None:
            return query_loader(trainer.datamodule, self.query)
        if self.query == "val" and trainer.val_dataloaders is not None:
            return trainer.val_dataloaders
        raise MSIFError(
            f"query={self.query!r} but the trainer has no {self.query} data (no datamodule, no val_dataloaders). "
            "Pass query=<a DataLoader of the examples to explain>."
        )

    def _score(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", finetune_manifest: Any) -> None:
        device = trainer.strategy.root_device
        pretrain_model = self.pretrain_model.to(device)
        query = self._query_loader(trainer)
        inputs = ScoringInputs(
            pretrain_model=pretrain_model, finetune_model=pl_module,
            pretrain_data=self.pretrain_data, finetune_data=train_loader(trainer), query_data=query,
            pretrain_loss=module_loss(pretrain_model, self.loss_fn), finetune_loss=module_loss(pl_module, self.loss_fn),
            query_fn=self.query_fn, pretrain_fingerprint=self._pretrain_fingerprint,
        )
        outcome = run_scoring(inputs, self.arguments, self.snapshots, current_comm(device),
                              progress=self.progress and trainer.is_global_zero,
                              identity=identity_of(self._pretrain_manifest, finetune_manifest))
        self.info = outcome.info
        if not trainer.is_global_zero:
            return
        self.scores = outcome.scores.detach().cpu() if outcome.scores is not None else None
        layout = "streamed blocks" if self.scores is None else self.snapshots.SCORES
        rank_zero_info(f"[msif] scores {outcome.shape} written to {self.snapshots.root} ({layout})")
        if self.report:
            matrix = self.scores if self.scores is not None else self.snapshots.score_matrix()[0]
            written = report_scores(
                matrix, outcome.record, self.snapshots.report_dir, pretrain_data=self.pretrain_data,
                query_data=query, finetune_model=pl_module, pretrain_class_names=self._pretrain_class_names,
                query_class_names=class_names_of(trainer.datamodule) if trainer.datamodule else None,
                render=self.render, top_k=self.top_k, loggers=trainer.loggers, artifact_files=outcome.files,
                step=trainer.global_step, max_queries=self.max_queries, progress=self.progress)
            rank_zero_info(f"[msif] report: {written['html']}")


MultiStageInfluence.__doc__ = (MultiStageInfluence.__doc__ or "") + "\n    Influence settings:\n" + "".join(
    f"        {name}: {text}\n" for name, text in help_of(InfluenceArguments).items())


def load_pretrained(module: nn.Module, snapshot_dir: PathLike, shared: str = "backbone",
                    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> nn.Module:
    """Copy the pretrained shared parameters (``shared.*``) from a pretraining snapshot into ``module``."""
    manifest, weights = SnapshotDir(snapshot_dir).load_stage("pretrain")
    check_shared(manifest, module, shared)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in manifest.shared_params:
            value = weights[name] if transform is None else transform(weights[name])
            params[name].copy_(value.to(params[name].dtype))
    return module
