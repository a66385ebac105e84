"""Structured configs (OmegaConf dataclasses) for the callback, registered in Hydra's ConfigStore.

``hydra.utils.instantiate(cfg.callbacks.msif)`` builds a ``MultiStageInfluence`` from YAML; every
value is checked by ``validate`` with a message naming the key and its allowed values.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from .core.influence import MODES, SCORING
from .core.solvers import SOLVERS, SolverOptions
from .errors import MSIFError

STAGES = ("pretrain", "finetune")
QUERY_SPLITS = ("val", "test")


@dataclass
class InfluenceConfig:
    """How the scores are computed (docs/math.md): what the finetune stage and ``msif score`` take."""

    shared: str = "backbone"  # name prefix of the shared embedding θ in both models
    mode: str = "fixed"  # fixed | updated
    alpha: Optional[float] = None  # proximal strength α (updated mode)
    damping: float = 0.0  # λ added to every inverted Hessian
    solver: str = "exact"  # exact | cg | lissa
    solver_options: Dict[str, Any] = field(default_factory=dict)  # tol, max_iter, lissa_depth, ...
    hessian_samples: Optional[int] = None  # curvature from a random subset of this many examples
    chunk_size: Optional[int] = None  # examples per vectorised gradient chunk (None: by memory)
    scoring: str = "auto"  # auto | grad | jvp


@dataclass
class CallbackConfig(InfluenceConfig):
    """Everything ``MultiStageInfluence`` takes that YAML can hold."""

    _target_: str = "lightning_msif.MultiStageInfluence"
    stage: str = "pretrain"  # pretrain | finetune
    snapshot_dir: str = "msif"
    query: str = "val"  # val | test (a DataLoader can be passed in Python)
    enforce_proximal: bool = False  # updated mode: add α(θ − θ̂) to the shared gradients while finetuning
    snapshot_every_n_epochs: Optional[int] = None
    store_gradients: bool = False  # pretrain stage: keep per-example gradients for one-product scoring
    top_k: int = 10  # examples per query and side in the reports
    report: bool = True  # write <snapshot_dir>/report/ and log to the trainer's loggers
    progress: bool = True


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise MSIFError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}.")


def validate(cfg: Any) -> None:
    """Check an ``InfluenceConfig``-like object (dataclass, DictConfig or namespace)."""
    get = (lambda k: cfg.get(k)) if hasattr(cfg, "get") else (lambda k: getattr(cfg, k, None))
    if not isinstance(get("shared"), str) or not get("shared"):
        raise MSIFError(f"shared={get('shared')!r}: give the name prefix of the shared module, e.g. 'backbone'.")
    _choice("mode", get("mode"), MODES)
    _choice("solver", get("solver"), SOLVERS)
    _choice("scoring", get("scoring"), SCORING)
    damping = get("damping")
    if not isinstance(damping, (int, float)) or damping < 0:
        raise MSIFError(f"damping={damping!r}: must be a number ≥ 0.")
    alpha = get("alpha")
    if get("mode") == "updated" and (not isinstance(alpha, (int, float)) or alpha <= 0):
        raise MSIFError(f"alpha={alpha!r}: mode='updated' needs alpha > 0 (the proximal strength), e.g. alpha=0.1.")
    SolverOptions.from_kwargs(dict(get("solver_options") or {}))
    for key in ("hessian_samples", "chunk_size"):
        value = get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise MSIFError(f"{key}={value!r}: must be a positive integer or null.")


def influence_kwargs(cfg: InfluenceConfig) -> Dict[str, Any]:
    """Keyword arguments of ``compute_multistage`` for this config."""
    d = asdict(cfg) if not isinstance(cfg, dict) else dict(cfg)
    opts = d.pop("solver_options") or {}
    keys = ("shared", "mode", "alpha", "damping", "solver", "hessian_samples", "chunk_size", "scoring")
    out = {**{k: d[k] for k in keys}, **dict(opts)}
    if out["mode"] == "fixed":  # a config may carry α for a later switch to updated mode
        out["alpha"] = None
    return out


def register_configs() -> None:
    """Register ``CallbackConfig`` as ``msif/callback`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="msif", name="callback", node=CallbackConfig)
