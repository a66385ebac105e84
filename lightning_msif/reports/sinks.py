"""Where the views go: always local files; then each logger of the trainer that has a registered sink.

Sinks are looked up by logger type along its MRO, so subclasses of a registered logger match too; the
built-in ones (lightning's W&B, TensorBoard and CSV loggers) are registered on first use, which keeps this
module free of a lightning import. Called on global rank 0 only (never through ``self.log``, which
end-of-fit hooks may not use).
"""
from __future__ import annotations

import csv
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, overload

import numpy as np

from ..atomic import PathLike, save_text
from . import figures
from .attribution import SIGN_SENTENCE, TOPK_COLUMNS, Attribution, header
from .render import ExampleViews

WANDB_MAX_ROWS = 10_000  # W&B refuses larger tables in one log call
WANDB_DATA_DIR = "WANDB_DATA_DIR"  # W&B's data folder: artifact files are staged under it before upload


def csv_text(rows: List[Dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writerow({c: header(c) for c in columns})
    writer.writerows(rows)
    return buf.getvalue()


def _matrix_rows(classes: Dict[str, Any], key: str) -> List[Dict[str, Any]]:
    m = classes[key]
    return [{"pretrain_class": p, **{q: float(m[a, b]) for b, q in enumerate(classes["query_classes"])}}
            for a, p in enumerate(classes["pretrain_classes"])]


def tables(attr: Attribution, top_k: int) -> Dict[str, tuple]:
    """``name -> (rows, columns)`` of every tabular view."""
    out = {"top_k": (attr.top_k(top_k), TOPK_COLUMNS)}
    harm = attr.most_harmful(top_k)
    out["most_harmful"] = (harm, ("pretrain_index", "pretrain_label", "queries_harmed", "total_harmful_score", "mean_score"))
    classes = attr.class_influence()
    if classes is not None:
        cols = ("pretrain_class", *classes["query_classes"])
        out["class_influence_mean"] = (_matrix_rows(classes, "mean"), cols)
        out["class_influence_total"] = (_matrix_rows(classes, "total"), cols)
    return out


def csv_files(attr: Attribution, top_k: int) -> Dict[str, str]:
    """Every table as ``{<name>.csv: its text}``."""
    return {f"{name}.csv": csv_text(rows, cols) for name, (rows, cols) in tables(attr, top_k).items()}


def write_texts(folder: PathLike, texts: Dict[str, str]) -> List[Path]:
    """``{file name: text}`` written into ``folder``, each file atomically."""
    return [save_text(Path(folder) / name, text) for name, text in texts.items()]


def write_csv_tables(folder: PathLike, attr: Attribution, top_k: int) -> List[Path]:
    """Every table as ``<folder>/<name>.csv`` (atomic)."""
    return write_texts(folder, csv_files(attr, top_k))


# -- W&B -------------------------------------------------------------------------------------------
def _wandb_media(wandb: Any, rendered: Any) -> Any:
    if isinstance(rendered, np.ndarray):
        from .render import to_image

        return wandb.Image(to_image(rendered))
    return rendered


def _example_media(wandb: Any, views: ExampleViews) -> Callable[[str, int], Any]:
    """``(which, index) -> cell``, one ``wandb.Image`` per distinct example: W&B stores an image object once per
    table however many cells show it (a new object per cell was a file per cell)."""
    cells: Dict[Tuple[str, int], Any] = {}

    def cell(which: str, index: int) -> Any:
        if (which, index) not in cells:
            cells[which, index] = _wandb_media(wandb, views.get(which, index))
        return cells[which, index]

    return cell


@contextmanager
def _staging_inside(run: Any) -> Iterator[None]:
    """Point W&B's staging folder into ``run``'s own folder while the report is logged.

    W&B copies every file of an artifact (a logged table, its images, the scores) to ``<WANDB_DATA_DIR>/artifacts/
    staging`` before the upload, a folder shared by all runs of the user; an offline run's copies stay there until a
    sync. Inside the run's folder they go wherever the run goes. W&B reads the variable on each copy.
    """
    folder = getattr(run, "dir", None)
    if not folder:
        yield
        return
    before = os.environ.get(WANDB_DATA_DIR)
    os.environ[WANDB_DATA_DIR] = str(Path(folder).parent / "msif-staging")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(WANDB_DATA_DIR, None)
        else:
            os.environ[WANDB_DATA_DIR] = before


def log_wandb(run: Any, attr: Attribution, views: ExampleViews, top_k: int, artifact_files: Iterable[Path] = (),
              prefix: str = "msif") -> None:
    """Top-k tables with images, class tables + heatmap, histogram, removal candidates, summary, artifact."""
    with _staging_inside(run):
        _log_wandb(run, attr, views, top_k, artifact_files, prefix)


def _log_wandb(run: Any, attr: Attribution, views: ExampleViews, top_k: int, artifact_files: Iterable[Path],
               prefix: str) -> None:
    import wandb

    rows = attr.top_k(top_k)
    columns = [*map(header, TOPK_COLUMNS), "query_example", "pretrain_example"]
    example = _example_media(wandb, views)
    data = [[r[c] for c in TOPK_COLUMNS] + [example("query", r["query_index"]),
                                            example("pretrain", r["pretrain_index"])] for r in rows]
    parts = [data[i : i + WANDB_MAX_ROWS] for i in range(0, len(data), WANDB_MAX_ROWS)] or [[]]
    payload: Dict[str, Any] = {}
    for p, part in enumerate(parts):
        key = f"{prefix}/top_k" if len(parts) == 1 else f"{prefix}/top_k_part{p + 1}"
        payload[key] = wandb.Table(columns=columns, data=part)
    for name, (trows, cols) in tables(attr, top_k).items():
        if name != "top_k":
            payload[f"{prefix}/{name}"] = wandb.Table(columns=[header(c) for c in cols],
                                                      data=[[r.get(c) for c in cols] for r in trows])
    classes = attr.class_influence()
    figs = []
    if classes is not None:
        figs.append(figures.heatmap(classes))
        payload[f"{prefix}/class_heatmap"] = wandb.Image(figs[-1])
    hist = attr.histogram()
    payload[f"{prefix}/score_histogram"] = wandb.Histogram(np_histogram=(hist["counts"], hist["edges"]))
    figs.append(figures.histogram(hist))
    payload[f"{prefix}/score_histogram_plot"] = wandb.Image(figs[-1])
    payload[f"{prefix}/how_to_read"] = wandb.Html(f"<p>{SIGN_SENTENCE}</p>")
    run.log(payload)
    for fig in figs:
        figures.close(fig)
    run.summary.update({f"{prefix}/{k}": v for k, v in attr.summary().items() if v is not None})
    files = [Path(f) for f in artifact_files if Path(f).exists()]
    if files:
        artifact = wandb.Artifact(name=f"{prefix}-scores-{run.id}", type="influence-scores",
                                  description=SIGN_SENTENCE, metadata=attr.summary())
        for f in files:
            artifact.add_file(str(f))
        run.log_artifact(artifact)


# -- TensorBoard -------------------------------------------------------------------------------------
def _markdown(rows: List[Dict[str, Any]], cols: Sequence[str], limit: int = 200) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(header, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"\n({len(rows) - limit} more rows in the local CSV files)")
    return "\n".join(lines)


def log_tensorboard(writer: Any, attr: Attribution, top_k: int, step: int = 0, prefix: str = "msif") -> None:
    """Tables as markdown text, heatmap and histogram as figures, raw scores as a histogram."""
    writer.add_text(f"{prefix}/how_to_read", SIGN_SENTENCE, step)
    for name, (rows, cols) in tables(attr, top_k).items():
        writer.add_text(f"{prefix}/{name}", _markdown(rows, cols), step)
    classes = attr.class_influence()
    if classes is not None:
        writer.add_figure(f"{prefix}/class_heatmap", figures.heatmap(classes), step)
    hist = attr.histogram()
    writer.add_figure(f"{prefix}/score_histogram", figures.histogram(hist), step)
    writer.add_histogram_raw(f"{prefix}/scores", min=hist["min"], max=hist["max"], num=hist["total"], sum=hist["sum"],
                             sum_squares=hist["sum_squares"], bucket_limits=hist["edges"][1:],
                             bucket_counts=hist["counts"], global_step=step)
    writer.flush()


# -- registry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportContext:
    """Everything a sink may log: the views, how many rows per query and side, the step, files to attach."""

    attr: Attribution
    views: ExampleViews
    top_k: int
    step: int
    artifact_files: Tuple[Path, ...]  # scores and manifest, to upload where the logger keeps files
    html: Path  # the local report.html, already written


Sink = Callable[[Any, ReportContext], Optional[Tuple[str, Any]]]
"""``sink(logger, report) -> (key, value) for publish's result, or None``."""

_SINKS: Dict[type, Sink] = {}
_builtins_registered = False


@overload
def register_sink(logger_type: type) -> Callable[[Sink], Sink]:
    ...


@overload
def register_sink(logger_type: type, sink: Sink) -> Sink:
    ...


def register_sink(logger_type: type, sink: Optional[Sink] = None) -> Any:
    """Send reports to loggers of ``logger_type`` (and its subclasses) through ``sink``; also a decorator.

    A later registration for the same type replaces the earlier one, built-in sinks included.
    """
    if not isinstance(logger_type, type):
        raise TypeError(f"register_sink needs a logger class, got {logger_type!r}.")
    if sink is None:
        return lambda fn: register_sink(logger_type, fn)
    _SINKS[logger_type] = sink
    return sink


def sink_for(logger: Any) -> Optional[Sink]:
    """The sink registered for the nearest class in ``type(logger).__mro__``, or None."""
    _register_builtins()
    return next((_SINKS[cls] for cls in type(logger).__mro__ if cls in _SINKS), None)


def _wandb_sink(logger: Any, report: ReportContext) -> Tuple[str, Any]:
    run = logger.experiment
    log_wandb(run, report.attr, report.views, report.top_k, [*report.artifact_files, report.html])
    return "wandb", run.id


def _tensorboard_sink(logger: Any, report: ReportContext) -> Tuple[str, Any]:
    log_tensorboard(logger.experiment, report.attr, report.top_k, report.step)
    return "tensorboard", logger.log_dir


def _csv_logger_sink(logger: Any, report: ReportContext) -> Tuple[str, Any]:
    return "csv_logger", write_csv_tables(Path(logger.log_dir) / "msif", report.attr, report.top_k)


def _register_builtins() -> None:
    """Lightning's loggers, on first lookup (importing lightning is slow); earlier user registrations win."""
    global _builtins_registered
    if _builtins_registered:
        return
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    for logger_type, sink in ((WandbLogger, _wandb_sink), (TensorBoardLogger, _tensorboard_sink),
                              (CSVLogger, _csv_logger_sink)):
        _SINKS.setdefault(logger_type, sink)
    _builtins_registered = True


# -- dispatch ---------------------------------------------------------------------------------------
def publish(attr: Attribution, views: ExampleViews, out_dir: PathLike, top_k: int, loggers: Iterable[Any] = (),
            artifact_files: Iterable[PathLike] = (), step: int = 0,
            max_queries: Optional[int] = None) -> Dict[str, Any]:
    """Write the local files (CSV tables, report.html), then hand the report to each logger's sink.

    ``max_queries`` bounds the query sections of report.html (None: its default); the tables hold every query.
    Returns where things went: ``csv`` and ``html`` paths plus each sink's ``(key, value)``; a list value
    extends the list already under its key (several CSV loggers). Loggers without a sink are skipped.
    """
    from .html import MAX_QUERIES, html_page

    # Everything is rendered before anything is written: a rendering error leaves the last report whole.
    texts = {**csv_files(attr, top_k), "report.html": html_page(
        attr, views, top_k, max_queries=MAX_QUERIES if max_queries is None else max_queries)}
    paths = write_texts(out_dir, texts)
    written: Dict[str, Any] = {"csv": paths[:-1], "html": paths[-1]}
    report = ReportContext(attr, views, top_k, step, tuple(Path(f) for f in artifact_files), written["html"])
    for logger in loggers:
        sink = sink_for(logger)
        result = sink(logger, report) if sink is not None else None
        if result is None:
            continue
        key, value = result
        if isinstance(value, list) and isinstance(written.get(key), list):
            written[key].extend(value)
        else:
            written[key] = value
    return written
