"""``PretrainingSnapshot``: the pretraining ``Trainer``'s callback, which leaves what the finetune stage needs.

At the end of ``fit`` (and every ``snapshot_every_n_epochs``): the weights, the shared parameters' names
and shapes, records to rebuild the module and datamodule, and a fingerprint of the training data;
the pretraining curvature when it is one fitted from the data (EK-FAC/K-FAC factors), so the finetune
stage does not read the pretraining set for it; optionally the per-example gradients of the whole
pretraining set, or a gradient index of it (projected per-example gradients), so later scoring is one product.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import lightning.pytorch as pl
from omegaconf import OmegaConf

from ..atomic import PathLike
from ..core.arguments import InfluenceArguments
from ..core.data import dataset_of
from ..core.index import AUTOCAST, INDEX_DTYPES
from ..core.projection import KINDS as PROJECTIONS
from ..core.influence import capture_gradient_index, fit_pretraining_curvature, per_example_gradients
from ..core.scoring import DEFAULT_BLOCK
from ..core.objective import LossFn, module_loss
from ..distributed import current_comm
from ..errors import MSIFError
from ..snapshots import SnapshotDir
from .common import StageCallback, check_strategy, train_loader
from .step_index import INDEX_CAPTURES, LastEpochIndex


class PretrainingSnapshot(StageCallback):
    """Snapshot the pretraining stage for ``MultiStageInfluence`` (same ``snapshot_dir`` and ``shared``).

    ``shared``: name prefix of the embedding θ the finetune model reuses (``backbone`` → ``backbone.*``).
    ``loss_fn``: per-example loss ``(model, batch) → [B]`` when the module has no ``per_example_loss``.
    ``curvature``, ``curvature_options``, ``hessian_samples``, ``chunk_size``, ``gradients``: as in
    ``InfluenceArguments``; give the finetune stage the same ones and it reuses the fitted curvature
    (otherwise it fits its own, and says so in the run record). ``fit_curvature=False`` skips that step.
    ``index_dim``: capture a gradient index of the pretraining set after training (each layer's per-example
    gradient projected to ``index_dim`` per side onto its curvature's leading eigenvectors, or seeded random
    directions with ``index_projection="random"`` (seed ``index_seed``), kept in ``index_dtype``, ``index_block``
    examples per file, captured under ``torch.autocast`` in ``index_autocast`` when given), so scoring reads it
    instead of the pretraining data; None (default): no index. ``index_capture``: ``"after_fit"`` (default), a
    dedicated pass at the final weights in eval mode; ``"last_epoch"``, from the last epoch's own training steps
    (about one backward's worth of extra products instead of a pass; each row at the weights of its step, in
    training mode, balanced by K-FAC's empirical Fisher of the epoch before; examples the epoch missed are filled
    by a pass over just those; docs/architecture.md).
    """

    STAGE = "pretrain"

    def __init__(self, snapshot_dir: PathLike, shared: str = "backbone", *, loss_fn: Optional[LossFn] = None,
                 curvature: str = "auto", curvature_options: Optional[Dict[str, Any]] = None,
                 hessian_samples: Optional[int] = None, chunk_size: Optional[int] = None, gradients: str = "auto",
                 fit_curvature: bool = True, snapshot_every_n_epochs: Optional[int] = None,
                 store_gradients: bool = False, index_dim: Optional[int] = None, index_seed: int = 0,
                 index_projection: str = "eigen", index_dtype: str = "float32", index_block: int = DEFAULT_BLOCK,
                 index_autocast: Optional[str] = None, index_capture: str = "after_fit", progress: bool = True):
        self.arguments = InfluenceArguments(shared=shared, curvature=curvature, hessian_samples=hessian_samples,
                                            curvature_options=dict(curvature_options or {}), chunk_size=chunk_size,
                                            gradients=gradients)  # the same checks as the finetune stage's
        n = snapshot_every_n_epochs
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise MSIFError(f"snapshot_every_n_epochs={n!r}: must be a positive integer or None.")
        self.snapshots = SnapshotDir(snapshot_dir)
        self.shared = shared
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.snapshot_every_n_epochs = n
        self.store_gradients = bool(store_gradients)
        if index_dim is not None and (isinstance(index_dim, bool) or not isinstance(index_dim, int) or index_dim < 1):
            raise MSIFError(f"index_dim={index_dim!r}: must be a whole number ≥ 1 (the projected size per side of "
                            "each layer) or None for no gradient index.")
        if index_dtype not in INDEX_DTYPES:
            raise MSIFError(f"index_dtype must be one of {list(INDEX_DTYPES)}, got {index_dtype!r}.")
        if isinstance(index_block, bool) or not isinstance(index_block, int) or index_block < 1:
            raise MSIFError(f"index_block={index_block!r}: must be a whole number ≥ 1 (examples per index file).")
        if index_autocast is not None and index_autocast not in AUTOCAST:
            raise MSIFError(f"index_autocast must be one of {list(AUTOCAST)} or None, got {index_autocast!r}.")
        if index_projection not in PROJECTIONS:
            raise MSIFError(f"index_projection must be one of {list(PROJECTIONS)}, got {index_projection!r}.")
        if index_capture not in INDEX_CAPTURES:
            raise MSIFError(f"index_capture must be one of {list(INDEX_CAPTURES)}, got {index_capture!r}.")
        self.index = {"dim": index_dim, "seed": int(index_seed), "dtype": index_dtype, "block": index_block,
                      "projection": index_projection, "autocast": index_autocast, "capture": index_capture}
        self.steps: Optional[LastEpochIndex] = None  # index_capture="last_epoch": the training steps' side
        self.fit_curvature = bool(fit_curvature)
        self.progress = progress
        self.manifest: Any = None  # the last manifest written (rank 0)
        self.curvature_info: Dict[str, Any] = {}  # what was fitted at the end of fit, and why

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.index["dim"] is None or self.index["capture"] != "last_epoch":
            return
        if trainer.is_global_zero:  # rows left by an interrupted run belong to other steps
            self.snapshots.remove_index_pieces()
        trainer.strategy.barrier("msif_index_pieces_clear")
        self.steps = LastEpochIndex(self.snapshots, self.index, self.shared, self.arguments,
                                    module_loss(pl_module, self.loss_fn))
        self.steps.check(trainer, pl_module)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.steps is not None:
            self.steps.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.steps is not None:
            self.steps.on_train_batch_start(trainer, batch, batch_idx)

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.steps is not None:
            self.steps.on_after_backward(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.steps is not None:
            self.steps.on_train_batch_end()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.steps is not None:
            self.steps.on_train_epoch_end(trainer)
        n = self.snapshot_every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self._snapshot(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._snapshot(trainer, pl_module)
        if self.store_gradients:
            self._store_gradients(trainer, pl_module)
        if self.fit_curvature:
            self._fit_curvature(trainer, pl_module)
        if self.index["dim"] is not None:
            self._capture_index(trainer, pl_module)
        elif trainer.is_global_zero:  # an index left by an earlier run belongs to other weights
            self.snapshots.remove_index()

    def _weights_sha(self, trainer: "pl.Trainer") -> str:
        manifest = self.manifest if trainer.is_global_zero else self.snapshots.manifest("pretrain")
        return str(manifest.weights.sha256)

    def _fit_curvature(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The pretraining curvature over (θ, U), fitted once here and kept in the snapshot."""
        device = trainer.strategy.root_device
        factors = self.snapshots.factors(self._weights_sha(trainer))
        self.curvature_info = fit_pretraining_curvature(
            pl_module, train_loader(trainer), factors, shared=self.shared, arguments=self.arguments,
            loss_fn=module_loss(pl_module, self.loss_fn), progress=self.progress and trainer.is_global_zero,
            comm=current_comm(device))
        trainer.strategy.barrier("msif_curvature")

    def _capture_index(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The gradient index of the pretraining set (a dedicated pass, after training): every later scoring
        reads it instead of the data. A matching index left by an interrupted capture is completed. Balanced by the
        pretraining curvature just fitted (reused from the snapshot)."""
        loader = train_loader(trainer)
        dataset = dataset_of(loader)
        if trainer.is_global_zero:
            self.snapshots.open_index({**self.index, "n": len(dataset), "shared": self.shared,
                                       "weights_sha256": self._weights_sha(trainer),
                                       # as the snapshot just took it: the data is hashed once per fit
                                       "fingerprint": OmegaConf.to_container(self.manifest.fingerprint)})
        trainer.strategy.barrier("msif_index_open")
        if self.steps is not None and self.steps.started:
            described, duals, counts = self.steps.finish(trainer, pl_module, self.progress and trainer.is_global_zero)
            trainer.strategy.barrier("msif_index")
            if trainer.is_global_zero:
                self.snapshots.finish_index(described, duals, counts)
                self.snapshots.remove_index_pieces()
            trainer.strategy.barrier("msif_index_done")
            return
        settings = {k: v for k, v in self.index.items() if k != "capture"}
        index = capture_gradient_index(pl_module, loader, self.snapshots.index_store(), shared=self.shared,
                                       arguments=self.arguments,
                                       factors=self.snapshots.factors(self._weights_sha(trainer)),
                                       loss_fn=module_loss(pl_module, self.loss_fn),
                                       progress=self.progress and trainer.is_global_zero,
                                       comm=current_comm(trainer.strategy.root_device), **settings)
        trainer.strategy.barrier("msif_index")
        if trainer.is_global_zero:
            self.snapshots.finish_index(index.projection, index.duals)
        trainer.strategy.barrier("msif_index_done")

    def _snapshot(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.is_global_zero:
            dataset = dataset_of(train_loader(trainer))
            self.manifest = self.snapshots.write_stage(
                "pretrain", pl_module, self.shared, data=trainer.datamodule,
                train_dataset=dataset if hasattr(dataset, "__len__") else None,
                extra={"epoch": trainer.current_epoch, "global_step": trainer.global_step})
        trainer.strategy.barrier("msif_snapshot")

    def _store_gradients(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Per-example gradients of the pretraining set, so later scoring passes are one product."""
        device = trainer.strategy.root_device
        grads, names = per_example_gradients(pl_module, train_loader(trainer), shared=self.shared,
                                             loss_fn=module_loss(pl_module, self.loss_fn), chunk_size=self.chunk_size,
                                             progress=self.progress and trainer.is_global_zero,
                                             comm=current_comm(device))
        if trainer.is_global_zero:
            self.snapshots.write_gradients(grads, names, self._weights_sha(trainer))
        trainer.strategy.barrier("msif_gradients")
