"""The settings of an influence computation, as one frozen, validated object.

``ScoreArguments`` holds what any influence score needs (curvature, solver, damping, sampling,
scoring); ``InfluenceArguments`` adds the two-stage settings (shared prefix, mode, α). Every entry
point builds one of these and passes it down whole: the functional API from its keywords, the
callbacks, ``msif`` and the Hydra configs from theirs (their schemas are generated from these fields
by ``settings_schema``, help texts included), and the object is saved beside every result
(``scores.yaml``). Each value is checked once, in ``__post_init__``; a solver's or curvature's
options are checked by the plug-in that declares them.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import MSIFError
from .curvature import CURVATURES
from .registry import Registry, check_float, check_int
from .solvers import SOLVERS

AUTO = "auto"
MODES = ("fixed", "updated")
SCORING = ("auto", "grad", "jvp", "lowrank")
GRADIENTS = ("auto", "func", "hooks")


def setting(default: Any, help: str, *, factory: bool = False) -> Any:
    """A dataclass field with a one-line ``help`` (shown by ``msif --help`` and in the docs)."""
    if factory:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _choice(kind: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise MSIFError(f"Unknown {kind} {value!r}: {kind}={value!r} is not allowed; choose one of {list(allowed)}.")


@dataclass(frozen=True)
class ScoreArguments:
    """How influence scores are computed, in one stage or two."""

    damping: float = setting(0.0, "λ ≥ 0 added to every inverted Hessian (an L2 penalty's strength, or a stabiliser)")
    curvature: str = setting("auto", "curvature that stands for each Hessian: auto (exact Hessian for small models "
                             f"that allow it, else EK-FAC) | {' | '.join(CURVATURES.names())}")
    solver: str = setting("auto", "linear solver: auto (closed form when the curvature has one, else exact up to "
                          f"max_dense_params, else cg) | {' | '.join(SOLVERS.names())}")
    solver_options: Dict[str, Any] = setting(
        dict, "options of the solvers, e.g. solver_options.tol=1e-6 solver_options.max_iter=200 "
        "solver_options.lissa_depth=2000", factory=True)
    curvature_options: Dict[str, Any] = setting(
        dict, "options of the curvatures, e.g. curvature_options.rhs_chunk_size=128", factory=True)
    hessian_samples: Optional[int] = setting(None, "curvature from a fixed random subset of this many examples "
                                                   "(null: all)")
    chunk_size: Optional[int] = setting(None, "examples per vectorised gradient chunk (null: sized by memory)")
    scoring: str = setting("auto", "scoring pass: auto | grad (per-example gradients) | jvp (forward mode per query) | "
                                   "lowrank (each query's vector at rank query_rank per layer, no full gradients)")
    query_rank: int = setting(8, "scoring=lowrank: rank of each query's vector per layer (exact from min(out, in))")
    gradients: str = setting("auto", "per-example gradients: auto (torch.func where the model allows it, else "
                                     "module hooks) | func | hooks")
    stream_scores: Optional[bool] = setting(None, "write the score matrix to disk block by block and never hold it "
                                                  "in memory; the reports read the blocks (null: when it is over "
                                                  "1 GiB)")

    def __post_init__(self) -> None:
        check_float("damping", self.damping, strict=False, meaning="it is added to every inverted Hessian")
        object.__setattr__(self, "damping", float(self.damping))
        _choice("curvature", self.curvature, (AUTO, *CURVATURES.names()))
        _choice("solver", self.solver, (AUTO, *SOLVERS.names()))
        _choice("scoring", self.scoring, SCORING)
        check_int("query_rank", self.query_rank, meaning="the rank per layer of each query with scoring='lowrank'")
        check_int("hessian_samples", self.hessian_samples, optional=True, meaning="None: every example")
        check_int("chunk_size", self.chunk_size, optional=True, meaning="examples per gradient chunk; None: by memory")
        _choice("gradients", self.gradients, GRADIENTS)
        if self.stream_scores is not None and not isinstance(self.stream_scores, bool):
            raise MSIFError(f"stream_scores={self.stream_scores!r} must be true, false or null (null: stream a "
                            "score matrix over 1 GiB).")
        for name in ("solver_options", "curvature_options"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise MSIFError(f"{name} must be a mapping of option names to values, got {type(value).__name__}.")
            object.__setattr__(self, name, dict(value))
        SOLVERS.check_options(self.solver_options)
        CURVATURES.check_options(self.curvature_options)

    # -- what the computation takes from it ---------------------------------------------------------
    def solver_options_of(self, name: str) -> Any:
        """The options object of solver ``name`` from ``solver_options``."""
        return Registry.options_of(SOLVERS.get(name), self.solver_options)

    def curvature_options_of(self, name: str) -> Any:
        """The options object of curvature ``name`` from ``curvature_options``."""
        return Registry.options_of(CURVATURES.get(name), self.curvature_options)

    def record(self) -> Dict[str, Any]:
        """Plain values of every field, with a chosen plug-in's options in full (for ``scores.yaml``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.solver != AUTO:
            out["solver_options"] = {**self.solver_options, **dataclasses.asdict(self.solver_options_of(self.solver))}
        if self.curvature != AUTO:
            out["curvature_options"] = {**self.curvature_options,
                                        **dataclasses.asdict(self.curvature_options_of(self.curvature))}
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ScoreArguments":
        """Build from a mapping (a YAML record, a DictConfig); refuses keys that are not fields."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise MSIFError(f"Unknown setting(s) {unknown} for {cls.__name__}; the settings are {names}.")
        return cls(**dict(values))

    @classmethod
    def split_options(cls, options: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Flat keyword options → (solver options, curvature options), by which plug-ins declare them."""
        solver_names, curvature_names = set(SOLVERS.option_names()), set(CURVATURES.option_names())
        unknown = sorted(set(options) - solver_names - curvature_names)
        if unknown:
            raise MSIFError(f"Unknown solver option(s) {unknown}; the solver options are {sorted(solver_names)} "
                            f"and the curvature options {sorted(curvature_names)}.")
        return ({k: v for k, v in options.items() if k in solver_names},
                {k: v for k, v in options.items() if k in curvature_names})


@dataclass(frozen=True)
class InfluenceArguments(ScoreArguments):
    """How multi-stage influence scores are computed (docs/math.md): the two-stage settings too."""

    shared: str = setting("backbone", "name prefix of the shared embedding θ in both models (backbone → backbone.*)")
    mode: str = setting("fixed", "fixed (embedding frozen while finetuning) | updated (finetuned, tied by α/2‖θ − θ̂‖²)")
    alpha: Optional[float] = setting(None, "proximal strength α > 0 of mode=updated (ignored in fixed mode)")

    def __post_init__(self) -> None:
        if not isinstance(self.shared, str) or not self.shared or self.shared.endswith("."):
            raise MSIFError(
                f"shared={self.shared!r} is not a parameter-name prefix: pass the name of the shared module "
                "without a trailing dot, e.g. shared='backbone' for parameters 'backbone.*'."
            )
        _choice("mode", self.mode, MODES)
        if self.mode == "updated" and self.alpha is None:
            raise MSIFError(
                "mode='updated' needs alpha > 0, the strength of the proximal term α/2‖θ − θ̂‖² that ties the "
                "finetuned embedding to the pretrained one; got alpha=None. Pass e.g. alpha=0.1."
            )
        check_float("alpha", self.alpha, optional=True,
                    meaning="the proximal strength of mode='updated', e.g. alpha=0.1; None in fixed mode")
        super().__post_init__()

    @property
    def effective_alpha(self) -> Optional[float]:
        """α where it applies (updated mode), else None: a fixed-mode config may carry α for a later switch."""
        return float(self.alpha) if self.mode == "updated" else None

    def record(self) -> Dict[str, Any]:
        return {**super().record(), "alpha": self.effective_alpha}


# -- schemas for OmegaConf / Hydra / the CLI, generated from the fields above ------------------------------
def help_of(cls: type) -> Dict[str, str]:
    """``field name → help`` of a dataclass (fields without help are left out)."""
    return {f.name: f.metadata["help"] for f in fields(cls) if "help" in f.metadata}


def settings_schema(name: str, own: Sequence[Tuple[str, Any, Any]], base: type = InfluenceArguments, *,
                    exclude: Sequence[str] = (), defaults: Optional[Mapping[str, Tuple[Any, Any]]] = None,
                    doc: str = "") -> type:
    """A mutable dataclass with the ``own`` fields ``(name, type, field)`` first, then ``base``'s fields.

    This is how the Hydra structured configs, the ``msif`` commands and the evaluation settings hold the
    arguments without retyping them: OmegaConf checks types and ``msif --help`` reads the help texts.
    ``defaults`` replaces a base field's ``(type, default)``.
    """
    spec: List[Tuple[str, Any, Any]] = list(own)
    hints = typing.get_type_hints(base)
    for f in fields(base):
        if f.name in exclude:
            continue
        typ, default = (defaults or {}).get(f.name, (hints[f.name], MISSING))
        if default is MISSING:
            made = (field(default_factory=f.default_factory, metadata=f.metadata) if f.default_factory is not MISSING
                    else field(default=f.default, metadata=f.metadata))
        else:
            made = field(default=default, metadata=f.metadata)
        spec.append((f.name, typ, made))
    cls = dataclasses.make_dataclass(name, spec)
    cls.__doc__ = doc or f"Settings of {name}, with the fields of {base.__name__}."
    return cls


def arguments_from(cls: type, values: Any, **overrides: Any) -> Any:
    """``cls`` (an arguments class) from those entries of ``values`` (a dataclass or a mapping) that are its fields."""
    if dataclasses.is_dataclass(values):
        values = {f.name: getattr(values, f.name) for f in fields(values)}
    names = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in dict(values).items() if k in names}, **overrides})
