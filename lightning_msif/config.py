"""Structured configs (OmegaConf dataclasses) of the two callbacks, registered in Hydra's ConfigStore.

``hydra.utils.instantiate(cfg.callbacks.finetune)`` builds a ``MultiStageInfluence`` from YAML. The
finetune schema is generated from ``InfluenceArguments`` (its fields, types, defaults and help texts),
so a setting is declared once; OmegaConf checks types while composing and ``InfluenceArguments``
checks values when the callback is built, with a message naming the key and its allowed values.
"""
from __future__ import annotations

from typing import List, Optional

from .core.arguments import ScoreArguments, setting, settings_schema
from .trust import TRUST_RECORDS_HELP, TRUSTED_CLASSES_HELP
from .reports.html import MAX_QUERIES


PretrainingSnapshotConfig = settings_schema(
    "PretrainingSnapshotConfig",
    [
        ("_target_", str, setting("lightning_msif.PretrainingSnapshot", "the class Hydra instantiates")),
        ("snapshot_dir", str, setting("msif", "folder shared by both stages' callbacks")),
        ("shared", str, setting("backbone", "name prefix of the shared embedding θ in both models")),
        ("fit_curvature", bool, setting(True, "fit the pretraining curvature (EK-FAC factors) at the end of fit")),
        ("snapshot_every_n_epochs", Optional[int], setting(None, "also snapshot after every n-th epoch (null: at the "
                                                                 "end only)")),
        ("store_gradients", bool, setting(False, "keep the pretraining set's per-example gradients")),
        ("index_dim", Optional[int], setting(None, "capture a gradient index: projected size per side of each layer "
                                                   "(null: no index)")),
        ("index_projection", str, setting("eigen", "eigen | random: the gradient index's projection (leading "
                                                   "eigenvectors of the curvature's factors, or seeded Gaussian)")),
        ("index_seed", int, setting(0, "seed of the gradient index's random directions")),
        ("index_dtype", str, setting("float32", "float32 | float16 | bfloat16 | float64: the index's stored "
                                                "precision")),
        ("index_block", int, setting(4096, "examples per file of the gradient index")),
        ("index_autocast", Optional[str], setting(None, "bfloat16 | float16: capture the index under torch.autocast "
                                                       "(null: full precision)")),
        ("index_capture", str, setting("after_fit", "after_fit | last_epoch: the index from a dedicated pass after "
                                                    "training, or from the last epoch's own training steps")),
        ("progress", bool, setting(True, "progress bars on rank 0")),
    ],
    base=ScoreArguments,
    exclude=("damping", "solver", "solver_options", "scoring", "query_rank", "stream_scores"),
    doc="Everything ``PretrainingSnapshot`` takes that YAML can hold (curvature settings as in InfluenceArguments).",
)


MultiStageInfluenceConfig = settings_schema(
    "MultiStageInfluenceConfig",
    [
        ("_target_", str, setting("lightning_msif.MultiStageInfluence", "the class Hydra instantiates")),
        ("snapshot_dir", str, setting("msif", "folder shared by both stages' callbacks")),
        ("query", str, setting("val", "val | test: the finetune datamodule's split to explain (a DataLoader in Python)")),
        ("enforce_proximal", bool, setting(False, "updated mode: add α(θ − θ̂) to the shared gradients while finetuning")),
        ("top_k", int, setting(10, "pretraining examples per query and side in the reports")),
        ("max_queries", int, setting(MAX_QUERIES, "queries shown in report.html (the tables hold all)")),
        ("report", bool, setting(True, "write <snapshot_dir>/report/ and log to the trainer's loggers")),
        ("progress", bool, setting(True, "progress bars on rank 0")),
        ("trust_records", bool, setting(False, TRUST_RECORDS_HELP)),
        ("trusted_classes", List[str], setting(list, TRUSTED_CLASSES_HELP, factory=True)),
    ],
    doc="Everything ``MultiStageInfluence`` takes that YAML can hold: its own settings, then InfluenceArguments'.",
)


def register_configs() -> None:
    """Register the callbacks' schemas as ``msif/pretrain`` and ``msif/finetune`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="msif", name="pretrain", node=PretrainingSnapshotConfig)
    store.store(group="msif", name="finetune", node=MultiStageInfluenceConfig)
