"""Where the views go: always local files; W&B, TensorBoard and CSV loggers when the trainer has them.

Called on global rank 0 only (never through ``self.log``, which end-of-fit hooks may not use).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence

import numpy as np

from ..snapshots import PathLike, save_text
from . import figures
from .attribution import SIGN_SENTENCE, TOPK_COLUMNS, Attribution
from .render import ExampleViews

WANDB_MAX_ROWS = 10_000  # W&B refuses larger tables in one log call


def csv_text(rows: List[Dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
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


def write_csv_tables(folder: PathLike, attr: Attribution, top_k: int) -> List[Path]:
    """Every table as ``<folder>/<name>.csv`` (atomic)."""
    paths = []
    for name, (rows, cols) in tables(attr, top_k).items():
        path = Path(folder) / f"{name}.csv"
        save_text(path, csv_text(rows, cols))
        paths.append(path)
    return paths


# -- W&B -------------------------------------------------------------------------------------------
def _wandb_media(wandb: Any, rendered: Any) -> Any:
    if isinstance(rendered, np.ndarray):
        from .render import to_image

        return wandb.Image(to_image(rendered))
    return rendered


def log_wandb(run: Any, attr: Attribution, views: ExampleViews, top_k: int, artifact_files: Iterable[Path] = (),
              prefix: str = "msif") -> None:
    """Top-k tables with images, class tables + heatmap, histogram, removal candidates, summary, artifact."""
    import wandb

    rows = attr.top_k(top_k)
    columns = [*TOPK_COLUMNS, "query_example", "pretrain_example"]
    data = [[r[c] for c in TOPK_COLUMNS] + [_wandb_media(wandb, views.get("query", r["query_index"])),
                                            _wandb_media(wandb, views.get("pretrain", r["pretrain_index"]))] for r in rows]
    parts = [data[i : i + WANDB_MAX_ROWS] for i in range(0, len(data), WANDB_MAX_ROWS)] or [[]]
    payload: Dict[str, Any] = {}
    for p, part in enumerate(parts):
        key = f"{prefix}/top_k" if len(parts) == 1 else f"{prefix}/top_k_part{p + 1}"
        payload[key] = wandb.Table(columns=columns, data=part)
    for name, (trows, cols) in tables(attr, top_k).items():
        if name != "top_k":
            payload[f"{prefix}/{name}"] = wandb.Table(columns=list(cols), data=[[r.get(c) for c in cols] for r in trows])
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
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
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
    writer.add_figure(f"{prefix}/score_histogram", figures.histogram(attr.histogram()), step)
    writer.add_histogram(f"{prefix}/scores", attr.scores.detach().cpu().double().numpy(), step)
    writer.flush()


# -- dispatch ---------------------------------------------------------------------------------------
def publish(attr: Attribution, views: ExampleViews, out_dir: PathLike, top_k: int, loggers: Iterable[Any] = (),
            artifact_files: Iterable[Path] = (), step: int = 0) -> Dict[str, Any]:
    """Write the local files (CSV tables, report.html) and log to each known logger; returns where things went."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    from .html import write_html

    out = Path(out_dir)
    written: Dict[str, Any] = {"csv": write_csv_tables(out, attr, top_k), "html": write_html(out / "report.html", attr, views, top_k)}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            log_wandb(logger.experiment, attr, views, top_k, [*artifact_files, written["html"]])
            written["wandb"] = logger.experiment.id
        elif isinstance(logger, TensorBoardLogger):
            log_tensorboard(logger.experiment, attr, top_k, step)
            written["tensorboard"] = logger.log_dir
        elif isinstance(logger, CSVLogger):
            written.setdefault("csv_logger", []).extend(write_csv_tables(Path(logger.log_dir) / "msif", attr, top_k))
    return written

