"""The trainer's side of a gradient index caught during the last epoch's own training steps
(``PretrainingSnapshot(index_capture="last_epoch")``; what that gives up: ``core/training_index.py``).

Which steps feed it: the final ``basis_examples`` examples of the epoch before the last give the K-FAC moments
that balance the projection (the first ones of the last epoch when there was no such epoch), the last epoch's
steps give the rows. Each batch's dataset indices come from the loader's sampler, recorded as it hands them out;
each step's loss scale from the trainer (the batch mean, gradient accumulation, a loss scaler).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Deque, Dict, Iterator, Optional, Tuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..core.data import batch_size_of
from ..core.influence import finish_step_index, step_index
from ..core.curvature.kfac import BASIS_EXAMPLES
from ..core.layers import LayerMap, StepCapture
from ..core.objective import LossFn
from ..core.training_index import StepIndex, refuse_leftovers
from ..distributed import current_comm
from ..errors import MSIFError
from ..resolve import single_loader
from ..snapshots import SnapshotDir
from .common import train_loader

INDEX_CAPTURES = ("after_fit", "last_epoch")


class SamplerLog:
    """Stands in for a loader's sampler: hands out the same indices and keeps them, in order, until taken."""

    def __init__(self, sampler: Any):
        self.inner = sampler
        self.queue: Deque[int] = deque()

    def __iter__(self) -> Iterator[Any]:
        for i in self.inner:
            self.queue.append(int(i))
            yield i

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # set_epoch, num_replicas, ... of the sampler it stands in for
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def take(self, count: int) -> Optional[torch.Tensor]:
        """The next ``count`` indices handed out, or None when fewer were (the loader did not draw through it)."""
        if len(self.queue) < count:
            return None
        return torch.tensor([self.queue.popleft() for _ in range(count)])


def _loader(trainer: "pl.Trainer") -> Any:
    """The loader the fit loop iterates (after Lightning put its distributed sampler in)."""
    return single_loader(trainer.train_dataloader)


def epochs_left(trainer: "pl.Trainer") -> Optional[int]:
    """The epochs still to run, this one included, as ``max_epochs``/``max_steps`` set them (None: unbounded)."""
    left = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        left.append(trainer.max_epochs - trainer.current_epoch)
    steps_per_epoch = trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)
    if trainer.max_steps is not None and trainer.max_steps > 0 and math.isfinite(steps_per_epoch):
        left.append(math.ceil((trainer.max_steps - trainer.global_step) / max(1.0, steps_per_epoch)))
    return min(left) if left else None


def untouched_rng(trainer: "pl.Trainer") -> Any:
    """The random state as it was once the block ends: the index's work draws nothing from training's stream."""
    device = trainer.strategy.root_device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


def random_state(device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The CPU generator's state and, on CUDA, the device's: dropout on a GPU draws from the device's generator."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_random_state(state: Tuple[torch.Tensor, Optional[torch.Tensor]], device: torch.device) -> None:
    """Put back what ``random_state`` took (so a replayed step draws the same dropout masks)."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class LastEpochIndex:
    """The hooks of ``PretrainingSnapshot`` that feed a ``StepIndex`` from the training steps."""

    def __init__(self, snapshots: SnapshotDir, index: Dict[str, Any], shared: str, arguments: Any, loss_fn: LossFn):
        self.snapshots, self.index, self.shared, self.arguments, self.loss_fn = snapshots, index, shared, arguments, \
            loss_fn
        self.step: Optional[StepIndex] = None
        self.phase: Optional[str] = None  # "moments" (the epoch before the last) | "rows" (the last)
        self.log: Optional[SamplerLog] = None
        self.capture: Optional[StepCapture] = None
        self.doing: Optional[str] = None  # what the current step feeds
        self.batch: Any = None
        self.idx: Optional[torch.Tensor] = None
        self.rng: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    @staticmethod
    def check(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Refuse, before training, what cannot be read from training steps: manual optimization, and parameters
        no layer hook covers in the module as the precision plugin converted it (e.g. Transformer Engine's)."""
        if not pl_module.automatic_optimization:
            raise MSIFError("index_capture='last_epoch' reads each training step's one backward pass; with manual "
                            "optimization a step may run several. Use index_capture='after_fit'.")
        names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        refuse_leftovers(LayerMap(pl_module, names).leftover, str(trainer.precision))

    def start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The index's state, on first need (the training loader exists once the fit loop has set it up)."""
        if self.step is None:
            self.step = step_index(pl_module, train_loader(trainer), self.snapshots.index_pieces(), shared=self.shared,
                                   dim=self.index["dim"], seed=self.index["seed"], dtype=self.index["dtype"],
                                   projection=self.index["projection"], arguments=self.arguments,
                                   loss_fn=self.loss_fn, comm=current_comm(trainer.strategy.root_device))

    def _basis_batches(self, trainer: "pl.Trainer") -> int:
        per_step = max(1, (getattr(_loader(trainer), "batch_size", None) or 1) * trainer.world_size)
        return math.ceil(BASIS_EXAMPLES / per_step)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        with untouched_rng(trainer):
            self._epoch_start(trainer, pl_module)

    def _epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        left = epochs_left(trainer)
        self.phase = {2: "moments", 1: "rows"}.get(left) if left is not None else None
        if self.phase is None:
            return
        self.start(trainer, pl_module)
        if self.phase == "rows":
            if self.step.offered:
                self.step.build()
            self._attach(trainer)

    def _attach(self, trainer: "pl.Trainer") -> None:
        """Record the indices the sampler hands out this epoch. A loader reads its batch sampler's sampler when it
        draws its first batch; one that drew before any callback ran (the first epoch's worker processes start in
        the fit loop's set-up) is found out at that batch (``_traced``)."""
        batch_sampler = getattr(_loader(trainer), "batch_sampler", None)
        if getattr(batch_sampler, "sampler", None) is None:
            self._untraced("a loader without a sampler inside a batch sampler")
            return
        self.log = SamplerLog(batch_sampler.sampler)
        batch_sampler.sampler = self.log

    @staticmethod
    def _untraced(why: str) -> None:
        rank_zero_warn(f"lightning-msif: the batches of this epoch cannot be traced to dataset indices ({why}); the "
                       "gradient index is captured after training instead.")

    def _detach(self, trainer: "pl.Trainer") -> None:
        if self.log is not None:
            getattr(_loader(trainer), "batch_sampler").sampler = self.log.inner
            self.log = None

    def on_train_epoch_end(self, trainer: "pl.Trainer") -> None:
        self._detach(trainer)

    def on_train_batch_start(self, trainer: "pl.Trainer", batch: Any, batch_idx: int) -> None:
        if self.phase is None:
            return
        b = batch_size_of(batch)
        self.idx = self.log.take(b) if self.log is not None else None
        if self.log is not None and self.idx is None and batch_idx == 0:
            self._detach(trainer)
            self._untraced("the loader's worker processes drew them before the epoch began, as in the first epoch")
        k = self._basis_batches(trainer)
        self.doing = None
        if self.phase == "moments":
            self.doing = "moments" if batch_idx >= trainer.num_training_batches - k else None
        elif self.step.projection is None and (not self.step.offered or batch_idx < k):
            self.doing = "moments"  # no earlier epoch gave the moments: this epoch's first batches do
        else:
            if self.step.projection is None:
                self.step.build()  # every rank at the same batch: the moments are summed over ranks
            self.doing = "rows" if self.idx is not None else None
        if self.doing is not None:
            self.batch, self.rng = batch, random_state(trainer.strategy.root_device)
            self.capture = self.step.watch(b).__enter__()

    def on_after_backward(self, trainer: "pl.Trainer") -> None:
        capture = self._close()
        if capture is not None:
            with untouched_rng(trainer):
                self._after_backward(trainer, capture)

    def _after_backward(self, trainer: "pl.Trainer", capture: StepCapture) -> None:
        scale = capture.batch_size * trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scale = scale / scaler.get_scale()
        if self.doing == "moments":
            self.step.add_moments(capture, scale, capture.batch_size)
            return
        rows = self.step.rows(capture, scale)
        if self.step.check_error is None and bool(torch.isfinite(rows).all()):  # the first step the scaler kept
            # the step's dropout masks; inside untouched_rng: training's stream goes on
            set_random_state(self.rng, trainer.strategy.root_device)
            self.step.check(rows, self.step.reference(self.batch))
        self.step.add_rows(rows, self.idx, len(self.step.obj.source), self.index["block"])

    def _close(self) -> Optional[StepCapture]:
        capture, self.capture = self.capture, None
        if capture is not None:
            capture.__exit__(None, None, None)
        return capture

    def on_train_batch_end(self) -> None:
        self._close()  # a step that ran no backward (training_step returned None)

    @property
    def started(self) -> bool:
        """Whether any training step fed the index (a run stopped before the epoch before the last has none: its
        index then comes from the dedicated pass)."""
        return self.step is not None and (self.step.projection is not None or self.step.offered > 0)

    def finish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
               progress: bool) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Dict[str, Any]]:
        """Assemble the index (the examples no step gave are captured now); returns its projection's description
        and matrices for vectors, and how many rows the steps gave."""
        self.start(trainer, pl_module)
        self.step.flush()
        trainer.strategy.barrier("msif_index_pieces")
        index, counts = finish_step_index(self.step, self.snapshots.index_store(), block=self.index["block"],
                                          progress=progress)
        return index.projection, index.duals, {**counts, "check_error": self.step.check_error}
