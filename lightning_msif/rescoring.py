"""``rescore``: the scores again from the two stages' snapshots, without retraining."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from .atomic import PathLike
from .core.arguments import InfluenceArguments
from .core.comm import Communicator
from .core.objective import LossFn
from .errors import MSIFError
from .resolve import check_mode, from_snapshots
from .scoring_job import ScoringOutcome, last_arguments, run_scoring
from .snapshots import SnapshotDir
from .trust import Trust


def rescore(snapshot_dir: PathLike, arguments: Optional[InfluenceArguments] = None, *,
            pretrain_model: Optional[nn.Module] = None, finetune_model: Optional[nn.Module] = None,
            pretrain_data: Any = None, finetune_data: Any = None, query_data: Any = None,
            loss_fn: Optional[LossFn] = None, comm: Optional[Communicator] = None, progress: bool = True,
            trust_records: bool = False, trusted_classes: Iterable[str] = (),
            threads: Optional[int] = 1) -> ScoringOutcome:
    """Scores from the snapshots of both stages (resumes an interrupted run); writes them like the callback.

    Modules and data are rebuilt from the snapshots' records unless given; ``arguments`` default to the
    settings of the last run in ``snapshot_dir`` (``scores.yaml``), else to ``InfluenceArguments()``; settings
    that contradict the snapshots (the shared prefix, the mode) are refused before anything is rebuilt.
    A record is rebuilt only if this user wrote the snapshot here (signed records), its class is in
    ``trusted_classes`` (or ``$MSIF_TRUSTED_CLASSES``), or ``trust_records=True``: a snapshot from elsewhere
    could name any code (docs/security.md).
    ``threads``: torch intra-op threads while scoring, restored after (None: leave torch's setting); 1 by default,
    as in the demo: small models' products gain nothing from more, and on a busy machine extra threads only contend.
    """
    trust = Trust.of(trust_records, trusted_classes)
    snapshots = SnapshotDir(snapshot_dir)
    arguments = arguments or last_arguments(snapshots)
    check_settings(snapshots, arguments)
    with torch_threads(threads):
        run = from_snapshots(snapshots, pretrain_model=pretrain_model, finetune_model=finetune_model,
                             pretrain_data=pretrain_data, finetune_data=finetune_data, query_data=query_data,
                             loss_fn=loss_fn, trust=trust)
        return run_scoring(run.inputs, arguments, snapshots, comm, progress, run.identity)


def check_settings(snapshots: SnapshotDir, arguments: InfluenceArguments) -> None:
    """Settings the snapshots contradict, from their manifests alone: another shared prefix, or a mode the finetune
    stage did not train in (a frozen θ scored in updated mode, a trained θ in fixed mode)."""
    pretrain, finetune = snapshots.manifest("pretrain"), snapshots.manifest("finetune")
    if arguments.shared != pretrain.shared:
        raise MSIFError(f"shared={arguments.shared!r}, but the snapshots were taken with shared={pretrain.shared!r}: "
                        f"drop the setting or give shared={pretrain.shared}.")
    check_mode(arguments.mode, pretrain.shared_params, finetune.trainable, snapshot=True)


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the previous count restored after (None: unchanged)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MSIFError(f"threads={threads!r}: must be a whole number ≥ 1, or None for torch's default.")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
