"""What the finetune stage logs: W&B (read back from the offline run's files), TensorBoard, CSV, local files."""
import csv
import json
from pathlib import Path
from typing import List

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning_fixtures import TinyDataModule, TinyModule, trainer
from safetensors.torch import load_file
from wandb_offline import artifacts, media, run_dir, summary, table

from lightning_msif import MultiStageInfluence, PretrainingSnapshot, load_pretrained
from lightning_msif.reports.attribution import TOPK_COLUMNS, Attribution, header
from lightning_msif.reports.render import ExampleViews
from lightning_msif.reports.sinks import WANDB_MAX_ROWS, log_wandb

TOP_K = 3
IMAGES = dict(d=16)  # 16 inputs render as 4×4 images


def _two_stages(d: Path, logger) -> MultiStageInfluence:
    trainer(callbacks=[PretrainingSnapshot(d)]).fit(
        TinyModule(d_in=16), datamodule=TinyDataModule(**IMAGES))
    fine = load_pretrained(TinyModule(classes=2, freeze_backbone=True, init_seed=1, d_in=16), d)
    cb = MultiStageInfluence(d, damping=0.01, top_k=TOP_K, progress=False)
    trainer(callbacks=[cb], logger=logger).fit(fine, datamodule=TinyDataModule(n=11, classes=2, seed=5, **IMAGES))
    return cb


def test_wandb_offline_run_holds_tables_images_summary_and_artifact(tmp_path, wandb_env):
    import wandb

    cb = _two_stages(tmp_path / "msif", WandbLogger(project="msif-test", mode="offline", save_dir=str(tmp_path)))
    wandb.finish()
    run = run_dir(tmp_path)
    scores = cb.scores
    top = table(run, "msif/top_k")
    assert top["columns"] == [*map(header, TOPK_COLUMNS), "query_example", "pretrain_example"]
    assert {"score_nats", "delta_loss_if_removed_nats"} <= set(top["columns"])  # units where people read them
    assert len(top["data"]) == scores.shape[1] * 2 * TOP_K
    col = {c: i for i, c in enumerate(top["columns"])}
    for row in top["data"]:
        i, j = row[col["pretrain_index"]], row[col["query_index"]]
        assert row[col["score_nats"]] == pytest.approx(scores[i, j].item(), rel=1e-12)
        delta = row[col["delta_loss_if_removed_nats"]]
        assert delta == pytest.approx(-scores[i, j].item() / scores.shape[0], rel=1e-12)
        ranked = torch.sort(scores[:, j], descending=row[col["side"]] == "harmful").indices
        assert ranked[row[col["rank"]] - 1].item() == i
    assert {p.name.split("_")[0] for p in media(run, "images")} >= {"class", "score"}  # heatmap, histogram plot
    # Table media travel in the table's run_table artifact: one PNG per distinct example shown.
    (top_art,) = [a for a in artifacts(run) if a.type == "run_table" and "top_k" in a.name]
    files = {m.path: m.local_path for m in top_art.manifest.contents}
    pngs = [p for p in files if p.endswith(".png")]
    shown = {("q", r[col["query_index"]]) for r in top["data"]} | {("p", r[col["pretrain_index"]]) for r in top["data"]}
    assert 0 < len(pngs) <= len(shown) and all(Path(files[p]).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    staged_table = json.loads(Path(files["msif/top_k.table.json"]).read_text())
    assert staged_table["data"][0][col["pretrain_example"]]["_type"] == "image-file"
    for name in ("class_influence_mean", "class_influence_total", "most_harmful"):
        assert table(run, f"msif/{name}")["data"]
    s = summary(run)
    assert s["msif/n_pretrain"] == 13 and s["msif/n_query"] == 5 and s["msif/solver"] == "auto"
    assert s["msif/pretrain_solve/solver"] == "exact" and s["msif/pretrain_curvature"] == "hessian"  # what auto chose
    assert s["msif/score_histogram/_type"] == "histogram" and sum(s["msif/score_histogram/values"]) == 13 * 5
    (art,) = [a for a in artifacts(run) if a.type == "influence-scores"]
    staged = {m.path: m.local_path for m in art.manifest.contents}
    assert {"scores.safetensors", "scores.yaml", "report.html"} <= set(staged)
    assert torch.equal(load_file(staged["scores.safetensors"])["scores"], scores)


def test_tensorboard_sink(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path / "tb"))
    _two_stages(tmp_path / "msif", logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"msif/top_k/text_summary", "msif/how_to_read/text_summary"} <= set(tags["tensors"])
    assert {"msif/class_heatmap", "msif/score_histogram"} <= set(tags["images"])
    assert "msif/scores" in tags["histograms"]
    text = acc.Tensors("msif/top_k/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| query_index | query_label |" in text


def test_csv_logger_and_local_files(tmp_path):
    logger = CSVLogger(str(tmp_path / "csv"))
    cb = _two_stages(tmp_path / "msif", logger)
    for folder in (Path(logger.log_dir) / "msif", tmp_path / "msif" / "report"):
        with open(folder / "top_k.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 5 * 2 * TOP_K and list(rows[0]) == [*map(header, TOPK_COLUMNS)]
        for r in rows:
            want = cb.scores[int(r["pretrain_index"]), int(r["query_index"])].item()
            assert float(r["score_nats"]) == pytest.approx(want)
        assert (folder / "class_influence_mean.csv").exists() and (folder / "most_harmful.csv").exists()
    assert (tmp_path / "msif" / "report" / "report.html").stat().st_size > 1000


def test_no_logger_writes_only_local_files(tmp_path):
    cb = _two_stages(tmp_path / "msif", False)
    report = tmp_path / "msif" / "report"
    assert sorted(p.name for p in report.iterdir()) == [
        "class_influence_mean.csv", "class_influence_total.csv", "most_harmful.csv", "report.html", "top_k.csv"]
    assert cb.scores is not None


def test_wandb_tables_are_split_below_the_row_cap(tmp_path, wandb_env):
    import wandb

    scores = torch.randn(30, WANDB_MAX_ROWS // 10 + 5, dtype=torch.float64)  # 10 rows per query → over the cap
    attr = Attribution(scores, pretrain_labels=torch.arange(30) % 3, query_labels=torch.arange(scores.shape[1]) % 2)
    run = wandb.init(project="msif-test", mode="offline", dir=str(tmp_path))
    log_wandb(run, attr, ExampleViews(), top_k=5)
    run.finish()
    folder = run_dir(tmp_path)
    parts = [table(folder, "msif/top_k_part1"), table(folder, "msif/top_k_part2")]
    assert len(parts[0]["data"]) == WANDB_MAX_ROWS
    assert len(parts[0]["data"]) + len(parts[1]["data"]) == scores.shape[1] * 10


def test_examples_are_looked_up_in_the_scored_dataset_not_a_subsets_parent():
    """A Subset's ``.dataset`` is its parent: rows must index the Subset itself."""
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from lightning_msif.reports.metadata import labels_of

    parent = TensorDataset(torch.zeros(6, 16), torch.arange(6))
    subset = Subset(parent, [5, 3])
    for data in (subset, DataLoader(subset, batch_size=2)):
        assert labels_of(data).tolist() == [5, 3]
        assert ExampleViews(data).datasets["pretrain"] is subset


def _png_files(folder: Path) -> List[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x89PNG"]


def test_wandb_stores_each_example_image_once_inside_the_run(tmp_path, wandb_env):
    """A table shows each example in many cells: one image file per distinct example, all inside the run's folder,
    none in W&B's shared staging folder (WANDB_DATA_DIR), which an offline run never cleans."""
    import wandb

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 20, generator=g, dtype=torch.float64)
    attr = Attribution(scores, pretrain_labels=torch.arange(12) % 3, query_labels=torch.arange(20) % 2)
    pretrain, queries = ([(torch.rand(16, generator=g), 0) for _ in range(n)] for n in (12, 20))  # 4×4 pictures
    run = wandb.init(project="msif-test", mode="offline", dir=str(tmp_path))
    log_wandb(run, attr, ExampleViews(pretrain, queries), top_k=4)
    run.finish()
    folder = run_dir(tmp_path)
    rows = table(folder, "msif/top_k")["data"]
    shown = {("q", r[0]) for r in rows} | {("p", r[TOPK_COLUMNS.index("pretrain_index")]) for r in rows}
    assert len(rows) == 20 * 2 * 4 and len(shown) < len(rows)
    figures = media(folder, "images")  # the heatmap and the histogram plot
    assert len(_png_files(folder)) == len(shown) + len(figures)
    assert not [p for p in (wandb_env / "wandb_data_dir").rglob("*") if p.is_file()]


def test_figures_share_the_palette_and_say_the_units():
    from matplotlib.colors import to_hex

    from lightning_msif.reports import figures
    from lightning_msif.reports.palette import SIDES, hex_of

    scores = torch.tensor([[-2.0, 1.0], [0.5, -0.1], [3.0, 0.0]], dtype=torch.float64)
    attr = Attribution(scores, pretrain_labels=torch.tensor([0, 1, 1]), query_labels=torch.tensor([0, 1]))
    heat = figures.heatmap(attr.class_influence())
    cmap = heat.axes[0].images[0].get_cmap()
    assert (to_hex(cmap(0.0)), to_hex(cmap(1.0))) == (hex_of(SIDES["helpful"]), hex_of(SIDES["harmful"]))
    assert "nats" in heat.axes[0].get_title()
    hist = figures.histogram(attr.histogram(bins=4))
    ax = hist.axes[0]
    assert ax.get_yscale() == "log" and "nats" in ax.get_xlabel()
    assert {to_hex(p.get_facecolor()) for p in ax.patches} == {hex_of(SIDES["helpful"]), hex_of(SIDES["harmful"])}
    figures.close(heat)
    figures.close(hist)
