"""One scoring run from resolved models and data: compute (resumably) and write the score matrix.

Shared by the finetune callback (after finetuning) and by re-scoring from snapshots. Runs on every
rank of the process group; only global rank 0 writes the final files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .core.arguments import InfluenceArguments
from .core.comm import Communicator, LocalComm
from .core.data import dataset_of
from .core.influence import InfluenceResult, multistage_scores
from .core.objective import LossFn
from .core.params import split_shared
from .snapshots import SnapshotDir, fingerprint, settings_key, versions

SIGN = ("positive = harmful (upweighting the pretraining example raises the query loss); "
        "negative = helpful; removing example i changes the query loss by about -S[i, j] / n")


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
    pretrain_fingerprint: Optional[Dict[str, Any]] = None  # taken when the data was checked: not read again


@dataclass
class ScoringOutcome:
    """What a scoring run computed, the record written beside it (``scores.yaml``) and where it went;
    ``scores`` is None when the matrix was streamed to disk (``SnapshotDir.score_matrix`` reads it)."""

    scores: Optional[torch.Tensor]
    shape: Tuple[int, int]
    info: Dict[str, Any]
    record: Dict[str, Any] = field(default_factory=dict)  # filled on global rank 0
    files: List[Path] = field(default_factory=list)  # filled on global rank 0


def _plain(value: Any) -> Any:
    """YAML-safe copy of the solver's convergence record."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _fingerprint(data: Any) -> Optional[Dict[str, Any]]:
    """The data's fingerprint, or None for data that cannot be indexed (an iterable)."""
    return fingerprint(dataset_of(data)) if hasattr(dataset_of(data), "__getitem__") else None


def run_scoring(inputs: ScoringInputs, args: InfluenceArguments, snapshots: SnapshotDir,
                comm: Optional[Communicator] = None, progress: bool = False,
                identity: Optional[Dict[str, Any]] = None) -> ScoringOutcome:
    """Compute the scores (resuming from the work folder if an identical run was cut short), write them.

    ``identity``: the two stages' weight hashes; with them, stored pretraining gradients or a gradient index that
    fit are used (an index that does not fit is refused).
    """
    comm = comm or LocalComm()
    record = args.record()
    prints = {"pretrain": inputs.pretrain_fingerprint or _fingerprint(inputs.pretrain_data),
              "finetune": _fingerprint(inputs.finetune_data), "query": _fingerprint(inputs.query_data)}
    key = settings_key([sorted((k, repr(v)) for k, v in record.items()), prints, sorted((identity or {}).items())])
    store = snapshots.work(key)
    theta, rest = split_shared(inputs.pretrain_model, args.shared, "pretraining")
    stored = snapshots.read_gradients(identity["pretrain_weights"], theta + rest) if identity else None
    index = snapshots.read_index(identity["pretrain_weights"], prints["pretrain"]) \
        if identity and stored is None else None  # the fingerprint just taken: the data is read once
    result: InfluenceResult = multistage_scores(
        inputs.pretrain_model, inputs.finetune_model, inputs.pretrain_data, inputs.finetune_data, inputs.query_data,
        args, pretrain_loss_fn=inputs.pretrain_loss, finetune_loss_fn=inputs.finetune_loss,
        query_fn=inputs.query_fn or inputs.finetune_loss, comm=comm, store=store, progress=progress,
        pretrain_gradients=stored, factors=snapshots.factors(identity["pretrain_weights"]) if identity else None,
        index=index,
    )
    shape = (int(result.info["n_pretrain"]), int(result.info["n_query"]))
    outcome = ScoringOutcome(result.scores, shape, result.info)
    if comm.rank == 0:
        outcome.record = {
            **record,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "world_size": comm.world_size,
            "threads": torch.get_num_threads(),  # torch intra-op threads of rank 0 (the timings depend on them)
            "fingerprints": prints,
            "identity": identity or {},
            "info": _plain(result.info),
            "sign": SIGN,
        }
        if result.scores is None:
            snapshots.write_score_blocks(store, shape, outcome.record)
        else:
            snapshots.write_scores(result.scores.detach().cpu(), outcome.record)
        outcome.files = snapshots.scores_files
    comm.all_reduce_sum(torch.zeros(1))  # every rank has finished reading the work folder
    if comm.rank == 0:
        store.clear()
    return outcome


def last_arguments(snapshots: SnapshotDir) -> InfluenceArguments:
    """The settings of the last scoring run in the folder (``scores.yaml``), else the defaults."""
    from omegaconf import OmegaConf

    pre_manifest = snapshots.manifest("pretrain")
    last = snapshots.scores_record()
    if last is None:
        return InfluenceArguments(shared=str(pre_manifest.shared))
    values = OmegaConf.to_container(last, resolve=True)
    names = InfluenceArguments.__dataclass_fields__
    return InfluenceArguments(**{k: v for k, v in values.items() if k in names})
