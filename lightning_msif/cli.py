"""``msif``: re-score from snapshots, rebuild the reports, evaluate against retraining; OmegaConf overrides.

    msif score  snapshot_dir=runs/msif mode=updated alpha=0.1 solver=cg solver_options.tol=1e-6
    msif report snapshot_dir=runs/msif top_k=10 wandb.project=my-project wandb.mode=offline
    msif evaluate recipe=digits loo.examples=50 lds.subsets=50 lds.fraction=0.5 methods=[multistage,random]
"""
from __future__ import annotations

import os
import sys
from dataclasses import MISSING as NO_DEFAULT, dataclass, fields
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from .core.arguments import InfluenceArguments, arguments_from, help_of, setting, settings_schema
from .errors import MSIFError
from .evaluation.config import EvaluationConfig
from .trust import TRUST_RECORDS_HELP, TRUSTED_CLASSES_HELP, Trust
from .reports.html import MAX_QUERIES, check_page_options


@dataclass
class WandbConfig:
    """Log the report to W&B: a new run in ``project``, or the existing run ``id``."""

    project: Optional[str] = None  # set to log to W&B
    mode: str = "online"  # online | offline | disabled
    id: Optional[str] = None  # an existing run to add the report to
    name: Optional[str] = None
    dir: Optional[str] = None  # where W&B keeps its files (default: ./wandb)


WANDB_HELP = "wandb.project=NAME wandb.mode=online|offline|disabled wandb.id=RUN_ID wandb.name=... wandb.dir=..."
MAX_QUERIES_HELP = "queries shown in report.html (the CSV tables and W&B hold all)"
THREADS_HELP = "torch intra-op threads (null: torch's default; small models run fastest on 1)"


@dataclass
class ReportCommand:
    snapshot_dir: str = setting(MISSING, "folder written by the callbacks (required)")
    top_k: int = setting(10, "pretraining examples per query and side in the report")
    max_queries: int = setting(MAX_QUERIES, MAX_QUERIES_HELP)
    wandb: WandbConfig = setting(WandbConfig, WANDB_HELP, factory=True)
    progress: bool = setting(True, "progress bars (true | false)")
    trust_records: bool = setting(False, TRUST_RECORDS_HELP)
    trusted_classes: List[str] = setting(list, TRUSTED_CLASSES_HELP, factory=True)


ScoreCommand = settings_schema("ScoreCommand", [
    ("snapshot_dir", str, setting(MISSING, "folder written by the callbacks (required)")),
    ("top_k", int, setting(10, "pretraining examples per query and side in the report")),
    ("max_queries", int, setting(MAX_QUERIES, MAX_QUERIES_HELP)),
    ("wandb", WandbConfig, setting(WandbConfig, WANDB_HELP, factory=True)),
    ("report", bool, setting(True, "rebuild the report after scoring (true | false)")),
    ("progress", bool, setting(True, "progress bars (true | false)")),
    ("trust_records", bool, setting(False, TRUST_RECORDS_HELP)),
    ("trusted_classes", List[str], setting(list, TRUSTED_CLASSES_HELP, factory=True)),
    ("threads", Optional[int], setting(1, THREADS_HELP)),
], doc="``msif score``: the report's settings, then InfluenceArguments' (defaults: the last run's).")

EvaluateCommand = settings_schema("EvaluateCommand", [
    ("recipe", str, setting("digits", "digits, or the import path of a recipe class/factory (lightning_msif.evaluation)")),
    ("recipe_options", Dict[str, Any], setting(dict, "keyword arguments of the recipe, e.g. recipe_options.hidden=8",
                                               factory=True)),
    ("mode", Optional[str], setting(None, "fixed | updated, passed to the recipe when set")),
    ("alpha", Optional[float], setting(None, "proximal strength α, passed to the recipe when set")),
    ("threads", Optional[int], setting(1, THREADS_HELP)),
    ("wandb", WandbConfig, setting(WandbConfig, WANDB_HELP, factory=True)),
], base=EvaluationConfig, doc="``msif evaluate``: the recipe, then EvaluationConfig's settings.")

COMMANDS = {"score": ScoreCommand, "report": ReportCommand, "evaluate": EvaluateCommand}
SUMMARY = {
    "score": "re-score from the saved snapshots without retraining (settings default to the last run's)",
    "report": "rebuild the tables, heatmap, histogram and report.html; log them to W&B if wandb.project is set",
    "evaluate": "retrain a small recipe many times: leave-one-out and LDS of the scores and baselines",
}
NESTED = ("wandb", "solver_options", "curvature_options", "recipe_options", "loo", "lds")  # "..." in the usage


def usage() -> str:
    """The help text, generated from the commands' fields and their help metadata."""
    lines = [f"usage: msif {{{','.join(COMMANDS)}}} key=value ...", "", "commands:"]
    lines += [f"  {name:<10}{text}" for name, text in SUMMARY.items()]
    for name, schema in COMMANDS.items():
        lines += ["", f"msif {name} options:"]
        helps = help_of(schema)
        for f in fields(schema):
            if f.name in NESTED:
                default: Any = "..."
            elif f.default is NO_DEFAULT:
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = "(required)" if f.default == MISSING else f.default
            lines.append(f"  {f.name:<18}{helps.get(f.name, ''):<90} default: {default}")
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
    if command in ("score", "report"):  # before scoring or rebuilding any example
        check_page_options(cfg.top_k, cfg.max_queries)
    if command == "score":
        arguments_from(InfluenceArguments, OmegaConf.to_container(cfg, resolve=True))  # every value checked
    return cfg


def _loggers(cfg: Any) -> List[Any]:
    if not cfg.wandb.project and not cfg.wandb.id:
        return []
    from lightning.pytorch.loggers import WandbLogger

    w = cfg.wandb
    return [WandbLogger(project=w.project, id=w.id, name=w.name, mode=w.mode, save_dir=w.dir or ".",
                        resume="allow" if w.id else None)]


def run_report(cfg: Any) -> Dict[str, Any]:
    """Views from the scores (read block by block) and the snapshots, to local files and the configured loggers."""
    from .reports.publish import report_scores
    from .resolve import from_snapshots
    from .snapshots import SnapshotDir

    snapshots = SnapshotDir(cfg.snapshot_dir)
    scores, record = snapshots.score_matrix()
    examples: Dict[str, Any] = {}
    trust = Trust.of(cfg.trust_records, cfg.trusted_classes)
    try:
        run = from_snapshots(snapshots, trust=trust)
    except MSIFError as err:  # the scores alone still make every table, without labels or pictures
        print(f"msif report: examples not shown ({err})", file=sys.stderr)
    else:
        examples = dict(pretrain_data=run.inputs.pretrain_data, query_data=run.inputs.query_data,
                        finetune_model=run.inputs.finetune_model, pretrain_class_names=run.pretrain_class_names,
                        query_class_names=run.query_class_names)
    loggers = _loggers(cfg)
    written = report_scores(scores, OmegaConf.to_container(record), snapshots.report_dir, top_k=cfg.top_k,
                            max_queries=cfg.max_queries, loggers=loggers, artifact_files=snapshots.scores_files,
                            progress=cfg.progress,
                            **examples)
    for logger in loggers:
        logger.experiment.finish()
    return written


def run_score(cfg: Any) -> None:
    from .rescoring import rescore

    arguments = arguments_from(InfluenceArguments, OmegaConf.to_container(cfg, resolve=True))
    outcome = rescore(cfg.snapshot_dir, arguments, progress=cfg.progress, trust_records=cfg.trust_records,
                      trusted_classes=cfg.trusted_classes, threads=cfg.threads)
    layout = "streamed blocks" if outcome.scores is None else "scores.safetensors"
    print(f"scores {outcome.shape} written to {cfg.snapshot_dir} ({layout}, scores.yaml)")


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
            from .scoring_job import last_arguments
            from .snapshots import SnapshotDir

            last = last_arguments(SnapshotDir(cfg.snapshot_dir))
            cfg = parse(command, overrides, {f.name: getattr(last, f.name) for f in fields(last)})
            run_score(cfg)
        if command == "report" or cfg.report:
            print(f"report: {run_report(cfg)['html']}")
    except MSIFError as err:
        print(f"msif {command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
