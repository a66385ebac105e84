"""``msif``: re-score from snapshots, rebuild the reports, evaluate against retraining; OmegaConf overrides.

    msif score  snapshot_dir=runs/msif mode=updated alpha=0.1 solver=cg solver_options.tol=1e-6
    msif report snapshot_dir=runs/msif top_k=10 wandb.project=my-project wandb.mode=offline
    msif evaluate recipe=digits loo.examples=50 lds.subsets=50 lds.fraction=0.5 methods=[multistage,random]
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from .config import InfluenceConfig, validate
from .errors import MSIFError
from .evaluation.config import EvaluationConfig
from .scoring_job import last_config


@dataclass
class WandbConfig:
    """Log the report to W&B: a new run in ``project``, or the existing run ``id``."""

    project: Optional[str] = None  # set to log to W&B
    mode: str = "online"  # online | offline | disabled
    id: Optional[str] = None  # an existing run to add the report to
    name: Optional[str] = None
    dir: Optional[str] = None  # where W&B keeps its files (default: ./wandb)


@dataclass
class ReportCommand:
    snapshot_dir: str = MISSING  # folder written by the callbacks (or `msif score`)
    top_k: int = 10  # pretraining examples per query and side
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ScoreCommand(InfluenceConfig, ReportCommand):
    report: bool = True  # rebuild the report after scoring
    progress: bool = True


@dataclass
class EvaluateCommand(EvaluationConfig):
    recipe: str = "digits"  # a built-in recipe, or the import path of a recipe class or factory
    recipe_options: Dict[str, Any] = field(default_factory=dict)  # its keyword arguments
    mode: Optional[str] = None  # passed to the recipe when set
    alpha: Optional[float] = None  # passed to the recipe when set
    threads: Optional[int] = 1  # torch intra-op threads (null: torch's default)
    wandb: WandbConfig = field(default_factory=WandbConfig)


HELP: Dict[str, str] = {
    "snapshot_dir": "folder written by the callbacks (required)",
    "top_k": "pretraining examples per query and side in the report",
    "shared": "name prefix of the shared embedding θ",
    "mode": "fixed | updated",
    "alpha": "proximal strength α (mode=updated)",
    "damping": "λ ≥ 0 added to every inverted Hessian",
    "solver": "exact | cg | lissa",
    "solver_options": "e.g. solver_options.tol=1e-6 solver_options.max_iter=200 solver_options.lissa_depth=2000",
    "hessian_samples": "curvature from a random subset of this many examples (null: all)",
    "chunk_size": "examples per vectorised gradient chunk (null: sized by memory)",
    "scoring": "auto | grad | jvp",
    "report": "rebuild the report after scoring (true | false)",
    "progress": "progress bars (true | false)",
    "wandb": "wandb.project=NAME wandb.mode=online|offline|disabled wandb.id=RUN_ID wandb.name=... wandb.dir=...",
    "recipe": "digits, or the import path of a recipe class/factory (see lightning_msif.evaluation)",
    "recipe_options": "keyword arguments of the recipe, e.g. recipe_options.hidden=8 recipe_options.queries=40",
    "out_dir": "where evaluation.csv, evaluation.html, loo_scatter.png go",
    "cache_dir": "retraining cache, reused by later evaluations (null: <out_dir>/retrains)",
    "methods": "[multistage,single_stage,grad_dot,random] or a subset",
    "loo": "leave-one-out: loo.examples=50 (0: none) loo.indices=[3,17] loo.seeds=[0]",
    "lds": "linear datamodeling: lds.subsets=50 (0: none) lds.fraction=0.5 lds.seeds=[0,1,2]",
    "warm_start": "retrain from the full-data models (true) or from the seed's initialisation (false)",
    "seed": "seed of the scored models and of the random draws",
    "threads": "torch threads per process: small models retrain fastest on 1 (null: torch's default)",
}
COMMANDS = {"score": ScoreCommand, "report": ReportCommand, "evaluate": EvaluateCommand}
SUMMARY = {
    "score": "re-score from the saved snapshots without retraining (settings default to the last run's)",
    "report": "rebuild the tables, heatmap, histogram and report.html; log them to W&B if wandb.project is set",
    "evaluate": "retrain a small recipe many times: leave-one-out and LDS of the scores and baselines",
}
NESTED = ("wandb", "solver_options", "recipe_options", "loo", "lds")  # shown as "..." in the usage


def usage() -> str:
    lines = [f"usage: msif {{{','.join(COMMANDS)}}} key=value ...", "", "commands:"]
    lines += [f"  {name:<10}{text}" for name, text in SUMMARY.items()]
    for name, schema in COMMANDS.items():
        lines += ["", f"msif {name} options:"]
        for f in fields(schema):
            default = getattr(schema(), f.name) if f.name != "snapshot_dir" else "(required)"
            if f.name in NESTED:
                default = "..."
            lines.append(f"  {f.name:<16}{HELP.get(f.name, ''):<70} default: {default}")
    return "\n".join(lines)


def parse(command: str, overrides: Sequence[str], base: Optional[Dict[str, Any]] = None) -> Any:
    """The typed config of ``command`` with ``base`` then the ``key=value`` overrides merged in."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise MSIFError(f"Arguments must be key=value, got {bad}. See `msif --help`.")
    schema = OmegaConf.structured(COMMANDS[command])
    keys = ", ".join(f.name for f in fields(COMMANDS[command]))
    try:
        cfg = OmegaConf.merge(schema, base or {}, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except ConfigKeyError as err:
        raise MSIFError(f"unknown key {err.full_key!r}. The keys are: {keys}.") from None
    except MissingMandatoryValue as err:
        raise MSIFError(f"{err.full_key} is required, e.g. {err.full_key}=runs/msif.") from None
    except OmegaConfBaseException as err:
        raise MSIFError(f"bad value for {err.full_key!r}: {str(err).splitlines()[0]}") from None
    if command == "score":
        validate(cfg)
    return cfg


def _loggers(cfg: Any) -> List[Any]:
    if not cfg.wandb.project and not cfg.wandb.id:
        return []
    from lightning.pytorch.loggers import WandbLogger

    w = cfg.wandb
    return [WandbLogger(project=w.project, id=w.id, name=w.name, mode=w.mode, save_dir=w.dir or ".",
                        resume="allow" if w.id else None)]


def run_report(cfg: Any) -> Dict[str, Any]:
    """Views from ``scores.safetensors`` and the snapshots, to local files and the configured loggers."""
    from pathlib import Path

    from .reports.attribution import Attribution
    from .reports.metadata import build_attribution
    from .reports.render import ExampleViews
    from .reports.sinks import publish
    from .scoring_job import from_snapshots
    from .snapshots import read_scores

    scores, manifest = read_scores(cfg.snapshot_dir)
    try:
        run = from_snapshots(cfg.snapshot_dir)
    except MSIFError as err:  # the scores alone still make every table, without labels or pictures
        print(f"msif report: examples not shown ({err})", file=sys.stderr)
        attr, views = Attribution(scores, manifest=OmegaConf.to_container(manifest)), ExampleViews()
    else:
        inputs = run.inputs
        attr = build_attribution(scores, inputs.pretrain_data, inputs.query_data, inputs.finetune_model,
                                 OmegaConf.to_container(manifest), run.pretrain_class_names, run.query_class_names)
        views = ExampleViews(inputs.pretrain_data, inputs.query_data)
    loggers = _loggers(cfg)
    folder = Path(cfg.snapshot_dir)
    written = publish(attr, views, folder / "report", cfg.top_k, loggers,
                      [folder / "scores.safetensors", folder / "scores.yaml"])
    for logger in loggers:
        logger.experiment.finish()
    return written


def run_score(cfg: Any) -> None:
    from .scoring_job import rescore

    influence = InfluenceConfig(**{f.name: OmegaConf.to_container(cfg)[f.name] for f in fields(InfluenceConfig)})
    result = rescore(cfg.snapshot_dir, influence, progress=cfg.progress)
    print(f"scores {tuple(result.scores.shape)} written to {cfg.snapshot_dir}/scores.safetensors")


def run_evaluate(cfg: Any) -> None:
    """Build the recipe, evaluate, print the table. Under ``torchrun`` the processes share the retraining runs
    through a gloo process group (its collectives are small: flags and query losses)."""
    import torch
    import torch.distributed as dist

    from .evaluation import build_recipe, evaluate

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("gloo")
    try:
        forwarded = {key: cfg[key] for key in ("mode", "alpha") if cfg[key] is not None}
        recipe = build_recipe(cfg.recipe, **OmegaConf.to_container(cfg.recipe_options), **forwarded)
        settings = OmegaConf.to_object(cfg)
        config = EvaluationConfig(**{f.name: getattr(settings, f.name) for f in fields(EvaluationConfig)})
        loggers = _loggers(cfg)
        result = evaluate(recipe, config, wandb=loggers[0] if loggers else None)
        for logger in loggers:
            logger.experiment.finish()
    finally:
        if joined:
            dist.destroy_process_group()
    if result.files:  # global rank 0
        print(result.table())
        print(f"retraining runs: {result.retrained} trained, {result.reused} from the cache; "
              f"report: {result.files['html']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    command, overrides = args[0], args[1:]
    if command not in COMMANDS:
        print(f"msif: unknown command {command!r}; choose one of {list(COMMANDS)}. See `msif --help`.", file=sys.stderr)
        return 2
    if "--help" in overrides or "-h" in overrides:
        print(usage())
        return 0
    try:
        cfg = parse(command, overrides)
        if command == "evaluate":
            run_evaluate(cfg)
            return 0
        if command == "score":  # settings not given default to the last run's
            cfg = parse(command, overrides, asdict(last_config(cfg.snapshot_dir)))
            run_score(cfg)
        if command == "report" or cfg.report:
            print(f"report: {run_report(cfg)['html']}")
    except MSIFError as err:
        print(f"msif {command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
