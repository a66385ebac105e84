"""Sinks found by logger type (user sinks, subclasses of built-in loggers) and the one reporting entry."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from torch.utils.data import TensorDataset
from wandb_offline import run_dir, table

from lightning_msif.reports.attribution import TOPK_COLUMNS, Attribution, header
from lightning_msif.reports.publish import report_scores
from lightning_msif.reports.render import ExampleViews
from lightning_msif.reports.sinks import ReportContext, publish, register_sink, sink_for

N, K, TOP_K = 12, 4, 3
ROWS = K * 2 * TOP_K  # one row per (query, side, rank)
LOCAL_FILES = ["class_influence_mean.csv", "class_influence_total.csv", "most_harmful.csv", "report.html", "top_k.csv"]


class MinimalLogger(Logger):
    """The least a Lightning logger must implement; no sink is registered for it."""

    @property
    def name(self) -> str:
        return "minimal"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
        pass


class RecordingLogger(MinimalLogger):
    """A user's logger whose sink keeps the reports it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.received: List[ReportContext] = []


class SubRecordingLogger(RecordingLogger):
    """Registered through its parent only."""


@register_sink(RecordingLogger)
def _record(logger: RecordingLogger, report: ReportContext) -> Tuple[str, Any]:
    logger.received.append(report)
    return "recording", len(logger.received)


def _scores(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _attribution(scores: torch.Tensor) -> Attribution:
    return Attribution(scores, pretrain_labels=torch.arange(N) % 3, query_labels=torch.arange(K) % 2,
                       manifest={"mode": "exact"})


def _csv_rows(path: Path) -> List[Dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _check_top_k_csv(path: Path, scores: torch.Tensor) -> None:
    rows = _csv_rows(path)
    assert len(rows) == ROWS and list(rows[0]) == [*map(header, TOPK_COLUMNS)]
    for r in rows:
        assert float(r["score_nats"]) == pytest.approx(scores[int(r["pretrain_index"]), int(r["query_index"])].item())


def _check_received(report: ReportContext, scores: torch.Tensor, written: Dict[str, Any], step: int) -> None:
    assert torch.equal(report.attr.scores.scores, scores)
    assert report.top_k == TOP_K and report.step == step
    rows = report.attr.top_k(report.top_k)
    assert len(rows) == ROWS and {r["query_index"] for r in rows} == set(range(K))
    assert report.html == written["html"] and report.html.stat().st_size > 1000


def test_user_sink_receives_the_report_through_publish(tmp_path):
    scores = _scores()
    loggers = [RecordingLogger(), SubRecordingLogger()]  # the subclass matches through the MRO
    extra = tmp_path / "scores.safetensors"
    written = publish(_attribution(scores), ExampleViews(), tmp_path / "report", TOP_K, loggers, [str(extra)], step=7)
    for logger in loggers:
        (report,) = logger.received
        _check_received(report, scores, written, step=7)
        assert report.artifact_files == (extra,)
        assert report.attr.pretrain_labels is not None
    assert written["recording"] == 1  # the last sink's value under its key
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == LOCAL_FILES


def test_user_sink_receives_the_report_through_report_scores(tmp_path):
    scores = _scores(1)
    pretrain = TensorDataset(torch.rand(N, 16), torch.arange(N) % 3)
    query = TensorDataset(torch.rand(K, 16), torch.arange(K) % 2)
    logger = RecordingLogger()
    written = report_scores(scores, {"mode": "exact"}, tmp_path / "report", pretrain_data=pretrain, query_data=query,
                            query_class_names=["even", "odd"], render=lambda example: "seen", top_k=TOP_K,
                            loggers=[logger], step=3)
    (report,) = logger.received
    _check_received(report, scores, written, step=3)
    assert report.attr.pretrain_labels.tolist() == (torch.arange(N) % 3).tolist()
    assert report.attr.query_class_names == ["even", "odd"] and report.attr.manifest == {"mode": "exact"}
    assert report.views.get("pretrain", 0) == "seen"  # the render given reaches the views
    assert written["recording"] == 1


def test_report_scores_without_data_writes_tables_and_html(tmp_path):
    scores = _scores(2)
    logger = RecordingLogger()
    written = report_scores(scores, {"mode": "exact"}, tmp_path / "report", top_k=TOP_K, loggers=[logger])
    folder = tmp_path / "report"
    _check_top_k_csv(folder / "top_k.csv", scores)
    assert all(r["query_label"] == "" and r["pretrain_label"] == "" for r in _csv_rows(folder / "top_k.csv"))
    assert written["html"] == folder / "report.html" and written["html"].stat().st_size > 1000
    assert sorted(p.name for p in folder.iterdir()) == [  # no labels: no class tables
        "most_harmful.csv", "report.html", "top_k.csv"]
    (report,) = logger.received
    assert report.attr.manifest == {"mode": "exact"} and report.views.get("query", 0) is None


def test_csv_logger_subclass_uses_the_builtin_sink(tmp_path):
    class MyCSVLogger(CSVLogger):
        pass

    scores = _scores(3)
    loggers = [MyCSVLogger(str(tmp_path / "a")), CSVLogger(str(tmp_path / "b"))]
    written = publish(_attribution(scores), ExampleViews(), tmp_path / "report", TOP_K, loggers)
    for logger in loggers:
        folder = Path(logger.log_dir) / "msif"
        _check_top_k_csv(folder / "top_k.csv", scores)
        assert (folder / "class_influence_mean.csv").exists() and (folder / "most_harmful.csv").exists()
    assert len(written["csv_logger"]) == 2 * 4  # both loggers' four tables, in one list
    assert {p.parent for p in written["csv_logger"]} == {Path(logger.log_dir) / "msif" for logger in loggers}


def test_wandb_logger_subclass_uses_the_builtin_sink(tmp_path, wandb_env):
    import wandb

    class MyWandbLogger(WandbLogger):
        pass

    scores = _scores(4)
    logger = MyWandbLogger(project="msif-test", mode="offline", save_dir=str(tmp_path))
    written = publish(_attribution(scores), ExampleViews(), tmp_path / "report", TOP_K, [logger])
    assert written["wandb"] == logger.experiment.id
    wandb.finish()
    assert len(table(run_dir(tmp_path), "msif/top_k")["data"]) == ROWS


def test_nearest_registration_wins_over_a_builtin_sink(tmp_path):
    class OwnCSVLogger(CSVLogger):
        pass

    seen = []

    def own(logger: OwnCSVLogger, report: ReportContext) -> Tuple[str, str]:
        seen.append(report.top_k)
        return "own", "done"

    assert register_sink(OwnCSVLogger, own) is own
    logger = OwnCSVLogger(str(tmp_path / "csv"))
    written = publish(_attribution(_scores()), ExampleViews(), tmp_path / "report", TOP_K, [logger])
    assert seen == [TOP_K] and written["own"] == "done" and "csv_logger" not in written
    assert not (Path(logger.log_dir) / "msif").exists()


def test_a_later_registration_replaces_the_earlier_one(tmp_path):
    class TwiceLogger(MinimalLogger):
        pass

    register_sink(TwiceLogger, lambda logger, report: ("twice", "first"))
    register_sink(TwiceLogger)(lambda logger, report: ("twice", "second"))
    written = publish(_attribution(_scores()), ExampleViews(), tmp_path / "report", TOP_K, [TwiceLogger()])
    assert written["twice"] == "second"


def test_unregistered_logger_is_skipped(tmp_path):
    loggers = [MinimalLogger(), object()]
    assert all(sink_for(logger) is None for logger in loggers)
    written = publish(_attribution(_scores()), ExampleViews(), tmp_path / "report", TOP_K, loggers)
    assert set(written) == {"csv", "html"}
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == LOCAL_FILES


def test_sink_returning_none_adds_nothing(tmp_path):
    class QuietLogger(MinimalLogger):
        pass

    register_sink(QuietLogger, lambda logger, report: None)
    written = publish(_attribution(_scores()), ExampleViews(), tmp_path / "report", TOP_K, [QuietLogger()])
    assert set(written) == {"csv", "html"}


def test_register_sink_needs_a_class():
    with pytest.raises(TypeError, match="logger class"):
        register_sink(RecordingLogger(), _record)


def test_importing_the_reports_does_not_import_lightning():
    code = ("import sys, lightning_msif.reports.sinks, lightning_msif.reports.publish; "
            "sys.exit('lightning' in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
