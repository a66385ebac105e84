"""``MultiStageInfluence``: the Lightning callback that snapshots each stage and scores after finetuning.

Pretrain stage: at the end of ``fit`` (and every ``snapshot_every_n_epochs``), the weights, shared
names/shapes, a record to rebuild the module and datamodule, and a fingerprint of the training data.
Finetune stage: checks everything against the pretraining snapshot in ``setup`` (before any
training), optionally enforces the proximal term of updated mode, and in ``on_train_end`` computes
the scores on every rank of the trainer's strategy (the process group is still up there, the module
on its device) and writes ``<snapshot_dir>/scores.safetensors``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from .config import QUERY_SPLITS, STAGES, InfluenceConfig, validate
from .core.data import dataset_of
from .core.influence import per_example_gradients
from .core.objective import LossFn
from .distributed import current_comm
from .errors import MSIFError
from .reports.metadata import build_attribution, class_names_of
from .reports.render import ExampleViews, Renderer
from .reports.sinks import publish
from .scoring_job import ScoringInputs, load_stage_module, module_loss, run_scoring
from .snapshots import (
    PathLike, check_fingerprint, check_shared, read_manifest, read_scores, read_weights, rebuild, write_gradients,
    write_stage,
)


def _train_loader(trainer: "pl.Trainer") -> Any:
    """The training data of ``fit``: the datamodule's train loader, else the trainer's."""
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    loader = trainer.train_dataloader
    iterables = getattr(loader, "iterables", None)  # a CombinedLoader around the user's loader
    return iterables if iterables is not None and not isinstance(iterables, (dict, list)) else loader


class MultiStageInfluence(Callback):
    """Trace a finetuned model's predictions back to the pretraining examples that caused them.

    Add one to the pretraining ``Trainer`` (``stage="pretrain"``) and one to the finetuning ``Trainer``
    (``stage="finetune"``) with the same ``snapshot_dir`` and ``shared`` prefix. After finetuning,
    ``scores`` holds ``S [n_pretrain, n_query]`` on global rank 0 (positive = harmful: upweighting the
    pretraining example raises the query's loss; negative = helpful), also written to
    ``<snapshot_dir>/scores.safetensors`` (``MultiStageInfluence.load_scores``).

    Per-example losses: the module's ``per_example_loss(batch)``, else ``loss_fn(model, batch)``, else
    cross-entropy on ``(x, y)`` batches. ``query`` is ``"val"``, ``"test"`` or a DataLoader. The
    pretraining data is rebuilt from the snapshot's datamodule record unless ``pretrain_data`` is given,
    and the pretraining model likewise unless ``pretrain_model`` is given.
    """

    def __init__(
        self,
        stage: str,
        snapshot_dir: PathLike,
        shared: str = "backbone",
        mode: str = "fixed",
        alpha: Optional[float] = None,
        damping: float = 0.0,
        solver: str = "exact",
        solver_options: Optional[Dict[str, Any]] = None,
        query: Union[str, DataLoader] = "val",
        loss_fn: Optional[LossFn] = None,
        query_fn: Optional[LossFn] = None,
        pretrain_data: Any = None,
        pretrain_model: Optional[nn.Module] = None,
        hessian_samples: Optional[int] = None,
        chunk_size: Optional[int] = None,
        scoring: str = "auto",
        enforce_proximal: bool = False,
        snapshot_every_n_epochs: Optional[int] = None,
        store_gradients: bool = False,
        top_k: int = 10,
        render: Optional[Renderer] = None,
        report: bool = True,
        progress: bool = True,
    ):
        if stage not in STAGES:
            raise MSIFError(f"stage={stage!r} is not allowed; choose one of {list(STAGES)}.")
        self.config = InfluenceConfig(shared=shared, mode=mode, alpha=alpha, damping=damping, solver=solver,
                                      solver_options=dict(solver_options or {}), hessian_samples=hessian_samples,
                                      chunk_size=chunk_size, scoring=scoring)
        validate(self.config)
        if isinstance(query, str) and query not in QUERY_SPLITS:
            raise MSIFError(f"query={query!r} is not allowed; choose one of {list(QUERY_SPLITS)} or pass a DataLoader.")
        if store_gradients and stage != "pretrain":
            raise MSIFError("store_gradients=True applies to stage='pretrain' (it stores the pretraining set's gradients).")
        if enforce_proximal and mode != "updated":
            raise MSIFError("enforce_proximal=True applies to mode='updated' only (it adds α(θ − θ̂) to the gradients).")
        if snapshot_every_n_epochs is not None and (not isinstance(snapshot_every_n_epochs, int) or snapshot_every_n_epochs < 1):
            raise MSIFError(f"snapshot_every_n_epochs={snapshot_every_n_epochs!r}: must be a positive integer or None.")
        self.stage = stage
        self.snapshot_dir = Path(snapshot_dir)
        self.query = query
        self.loss_fn = loss_fn
        self.query_fn = query_fn
        self.pretrain_data = pretrain_data
        self.pretrain_model = pretrain_model
        self.enforce_proximal = enforce_proximal
        self.snapshot_every_n_epochs = snapshot_every_n_epochs
        self.store_gradients = store_gradients
        if not isinstance(top_k, int) or top_k < 1:
            raise MSIFError(f"top_k={top_k!r}: must be a positive integer (examples per query and side in the reports).")
        self.top_k = top_k
        self.render = render
        self.report = report
        self._pretrain_class_names: Optional[List[str]] = None
        self.progress = progress
        self.scores: Optional[torch.Tensor] = None
        self.info: Dict[str, Any] = {}
        self._theta_hat: Dict[str, torch.Tensor] = {}
        self._pretrain_weights_sha: Optional[str] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stage=self.stage, snapshot_dir=str(self.snapshot_dir))

    def state_dict(self) -> Dict[str, Any]:
        return {"stage": self.stage, "snapshot_dir": str(self.snapshot_dir), "scored": self.scores is not None}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("stage", self.stage) != self.stage:
            raise MSIFError(f"This checkpoint holds a {state_dict['stage']!r}-stage MultiStageInfluence, not {self.stage!r}.")

    @staticmethod
    def load_scores(snapshot_dir: PathLike) -> torch.Tensor:
        """The score matrix a finetune stage wrote under ``snapshot_dir``."""
        return read_scores(snapshot_dir)[0]

    # -- checks before training ---------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise MSIFError(
                f"MultiStageInfluence supports single-device and DDP strategies, not {type(strategy).__name__}: "
                "the influence computation needs every parameter whole on each rank. Use strategy='ddp' "
                "(or 'auto' on one device)."
            )
        if self.stage == "finetune":
            self._check_against_pretraining(trainer, pl_module)

    def _check_against_pretraining(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        cfg = self.config
        manifest, weights = read_weights(self.snapshot_dir, "pretrain")
        self._pretrain_weights_sha = str(manifest.weights.sha256)
        check_shared(manifest, pl_module, cfg.shared)
        shared = {n: p for n, p in pl_module.named_parameters() if n in manifest.shared_params}
        if cfg.mode == "fixed":
            trainable = [n for n, p in shared.items() if p.requires_grad]
            if trainable:
                raise MSIFError(
                    f"mode='fixed' assumes the shared embedding is frozen while finetuning, but {trainable[:3]} "
                    "require gradients. Freeze it (requires_grad_(False)) or use mode='updated' with alpha."
                )
            changed = [n for n, p in shared.items() if not torch.equal(p.detach().cpu(), weights[n].to(p.dtype))]
            if changed:
                raise MSIFError(
                    f"mode='fixed' needs the finetune module to start from the pretrained shared weights, but "
                    f"{changed[:3]} differ from the pretraining snapshot. Load them first, e.g. "
                    "lightning_msif.load_pretrained(module, snapshot_dir)."
                )
        if cfg.mode == "updated" and self.enforce_proximal:
            self._theta_hat = {n: weights[n].to(p.device, p.dtype) for n, p in shared.items()}
        self.pretrain_model = load_stage_module(manifest, weights, "pretrain", self.pretrain_model)
        if self.pretrain_data is None:
            if manifest.data is None:
                raise MSIFError(
                    "The pretraining snapshot has no record of its datamodule (plain DataLoaders, or no saved "
                    "hyperparameters): pass pretrain_data=<the pretraining DataLoader or Dataset> to the "
                    "finetune-stage callback."
                )
            dm = rebuild(manifest.data, "pretraining datamodule")
            if trainer.local_rank == 0:
                dm.prepare_data()
            trainer.strategy.barrier("msif_prepare_pretrain_data")
            dm.setup("fit")
            self.pretrain_data = dm.train_dataloader()
            self._pretrain_class_names = class_names_of(dm)
        if manifest.fingerprint is not None:
            check_fingerprint(manifest.fingerprint, dataset_of(self.pretrain_data),
                              "pretraining data")

    # -- during training -------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        """Updated mode with ``enforce_proximal``: the gradient of α/2‖θ − θ̂‖², added once per step."""
        if not self._theta_hat:
            return
        params = dict(pl_module.named_parameters())
        for name, hat in self._theta_hat.items():
            p = params[name]
            if p.grad is not None:
                p.grad.add_(p.detach() - hat, alpha=self.config.alpha)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        n = self.snapshot_every_n_epochs
        if self.stage == "pretrain" and n and (trainer.current_epoch + 1) % n == 0:
            self._snapshot(trainer, pl_module)

    # -- after training ----------------------------------------------------------------------------
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._snapshot(trainer, pl_module)
        if self.stage == "finetune":
            self._score(trainer, pl_module)
        elif self.store_gradients:
            self._store_gradients(trainer, pl_module)

    def _store_gradients(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Per-example gradients of the pretraining set, so later scoring passes are one product."""
        device = trainer.strategy.root_device
        grads, names = per_example_gradients(pl_module, _train_loader(trainer), shared=self.config.shared,
                                       loss_fn=module_loss(pl_module, self.loss_fn), chunk_size=self.config.chunk_size,
                                       progress=self.progress and trainer.is_global_zero, comm=current_comm(device))
        if trainer.is_global_zero:
            sha = str(read_manifest(self.snapshot_dir, "pretrain").weights.sha256)
            write_gradients(self.snapshot_dir, grads, names, sha)
        trainer.strategy.barrier("msif_gradients")

    def _snapshot(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.is_global_zero:
            dataset = dataset_of(_train_loader(trainer))
            query = self.query if isinstance(self.query, str) and self.stage == "finetune" else None
            write_stage(self.snapshot_dir, self.stage, pl_module, self.config.shared, data=trainer.datamodule,
                        train_dataset=dataset if hasattr(dataset, "__len__") else None,
                        extra={"epoch": trainer.current_epoch, "global_step": trainer.global_step, "query": query})
        trainer.strategy.barrier("msif_snapshot")

    def _query_loader(self, trainer: "pl.Trainer") -> Any:
        if not isinstance(self.query, str):
            return self.query
        dm = trainer.datamodule
        if dm is not None:
            if self.query == "test":
                dm.setup("test")
            return dm.val_dataloader() if self.query == "val" else dm.test_dataloader()
        if self.query == "val" and trainer.val_dataloaders is not None:
            return trainer.val_dataloaders
        raise MSIFError(
            f"query={self.query!r} but the trainer has no {self.query} data (no datamodule, no val_dataloaders). "
            "Pass query=<a DataLoader of the examples to explain>."
        )

    def _score(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        device = trainer.strategy.root_device
        pretrain_model = self.pretrain_model.to(device)
        query = self._query_loader(trainer)
        inputs = ScoringInputs(
            pretrain_model=pretrain_model, finetune_model=pl_module,
            pretrain_data=self.pretrain_data, finetune_data=_train_loader(trainer), query_data=query,
            pretrain_loss=module_loss(pretrain_model, self.loss_fn), finetune_loss=module_loss(pl_module, self.loss_fn),
            query_fn=self.query_fn,
        )
        finetune_sha = read_manifest(self.snapshot_dir, "finetune").weights.sha256
        identity = {"pretrain_weights": self._pretrain_weights_sha, "finetune_weights": str(finetune_sha)}
        result = run_scoring(inputs, self.config, self.snapshot_dir, current_comm(device),
                             progress=self.progress and trainer.is_global_zero, identity=identity)
        self.info = result.info
        if trainer.is_global_zero:
            self.scores = result.scores.detach().cpu()
            rank_zero_info(f"[msif] scores {tuple(self.scores.shape)} written to {self.snapshot_dir / 'scores.safetensors'}")
            if self.report:
                self._publish(trainer, pl_module, query)

    def _publish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", query: Any) -> None:
        """Rank 0: the report views to the local files and every logger of the trainer."""
        manifest = OmegaConf.to_container(read_scores(self.snapshot_dir)[1])
        attr = build_attribution(self.scores, self.pretrain_data, query, pl_module, manifest,
                                 pretrain_class_names=self._pretrain_class_names,
                                 query_class_names=class_names_of(trainer.datamodule) if trainer.datamodule else None)
        views = ExampleViews(self.pretrain_data, query, self.render)
        files = [self.snapshot_dir / "scores.safetensors", self.snapshot_dir / "scores.yaml"]
        written = publish(attr, views, self.snapshot_dir / "report", self.top_k, trainer.loggers, files, trainer.global_step)
        rank_zero_info(f"[msif] report: {written['html']}")


def load_pretrained(module: nn.Module, snapshot_dir: PathLike, shared: str = "backbone",
                    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> nn.Module:
    """Copy the pretrained shared parameters (``shared.*``) from a pretraining snapshot into ``module``."""
    manifest, weights = read_weights(snapshot_dir, "pretrain")
    check_shared(manifest, module, shared)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in manifest.shared_params:
            value = weights[name] if transform is None else transform(weights[name])
            params[name].copy_(value.to(params[name].dtype))
    return module
