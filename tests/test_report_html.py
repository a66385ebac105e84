"""The HTML report: its structure and numbers (parsed), and the page as a real headless browser renders it."""
from __future__ import annotations

import base64
import io
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_msif.reports.attribution import SIGN_SENTENCE, Attribution
from lightning_msif.reports.html import PX, write_html
from lightning_msif.reports.render import ExampleViews

N, K, TOP_K, MAX_QUERIES = 30, 4, 3, 3
CLASSES = ["bar", "stick", "<b>cross</b> & co"]  # markup in a class name must come out escaped
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


class Page(HTMLParser):
    """The parts of a report the tests look at: tables (rows of cells), images, histogram bars, text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: List[Dict[str, Any]] = []
        self.images: List[Dict[str, str]] = []
        self.bars: List[Dict[str, str]] = []
        self.body: Dict[str, str] = {}
        self.text: List[str] = []
        self._cell: Optional[Dict[str, Any]] = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.tables.append({"class": a.get("class", "").split(), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = {"attrs": a, "text": ""}
            self.tables[-1]["rows"][-1].append(self._cell)
        elif tag == "img":
            self.images.append(a)
        elif tag == "rect":
            self.bars.append(a)
        elif tag == "body":
            self.body = a

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data

    def of(self, kind: str) -> List[List[List[Dict[str, Any]]]]:
        """The body rows (header row dropped) of every table with class ``kind``."""
        return [t["rows"][1:] for t in self.tables if kind in t["class"]]

    def count(self, kind: str) -> int:
        return sum(kind in i.get("class", "").split() for i in self.images)


def _glyph(label: int, g: torch.Generator) -> torch.Tensor:
    """An 8×8 image one can tell apart by eye: a horizontal bar, a vertical stick, or a cross."""
    img = torch.rand(8, 8, generator=g) * 0.25
    i = torch.arange(8)
    if label == 0:
        img[3:5, 1:7] = 1.0
    elif label == 1:
        img[1:7, 3:5] = 1.0
    else:
        img[i, i] = img[i, 7 - i] = 1.0
    return img


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Attribution]:
    g = torch.Generator().manual_seed(0)
    pre_labels, query_labels = torch.arange(N) % 3, torch.tensor([0, 1, 2, 1])
    scale = 10.0 ** torch.randint(-6, 2, (N, 1), generator=g)  # plain and scientific numbers
    att = Attribution(
        scores=torch.randn(N, K, generator=g, dtype=torch.float64) * scale, pretrain_labels=pre_labels,
        query_labels=query_labels, query_predictions=torch.tensor([0, 2, 2, 1]), pretrain_class_names=CLASSES,
        query_class_names=CLASSES,
        manifest={"mode": "updated", "alpha": 0.1, "damping": 1e-3, "solver": "cg",
                  "info": {"scoring": "stored_gradients", "seconds": {"pretrain": 0.25, "score_pass": 1.5},
                           "solves": {"pretrain": {"iterations": 12, "relative_residual": 3e-7, "converged": True}}}},
    )
    pretrain = [(_glyph(int(y), g), y) for y in pre_labels]
    queries = [(_glyph(int(y), g).flatten(), y) for y in query_labels]  # flat 64-vectors render as 8×8 too
    folder = tmp_path_factory.mktemp("report")
    path = write_html(folder / "report.html", att, ExampleViews(pretrain, queries), top_k=TOP_K,
                      title="Digits & friends", max_queries=MAX_QUERIES)
    return path, att


def _shown(text: str) -> float:
    """The number a cell shows, checked to have 3 significant digits."""
    number = text.split()[0]
    assert len(number.split("e")[0].lstrip("+-").replace(".", "").lstrip("0")) == 3, number
    return float(number)


def test_structure_is_self_contained_and_escaped(report: Tuple[Path, Attribution]) -> None:
    path = report[0]
    raw = path.read_text(encoding="utf-8")
    page = Page(raw)
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # the temp file was renamed away
    assert all("msif-table" in t["class"] for t in page.tables)
    assert [len(page.of(kind)) for kind in ("msif-summary", "msif-heat", "msif-topk", "msif-removal")] == \
        [3, 2, 2 * MAX_QUERIES, 1]
    thumbs = sum(len(rows) for rows in page.of("msif-topk") + page.of("msif-removal"))
    assert len(page.images) == page.count("msif-example") == page.count("query") + page.count("thumb")
    assert (page.count("query"), page.count("thumb")) == (MAX_QUERIES, thumbs)
    for img in page.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        size = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size
        side = PX["query"] if "query" in img["class"] else PX["thumb"]
        assert size == (side, side)
    text = " ".join("".join(page.text).split())
    assert SIGN_SENTENCE in text and "Digits & friends" in text
    assert f"Showing the first {MAX_QUERIES} of {K} queries; 1 more query is omitted" in text
    assert "<b>cross</b>" not in raw and "&lt;b&gt;cross&lt;/b&gt; &amp; co" in raw
    assert not re.search(r"""(src|href)="(?!data:|#)|<link|https?://""", raw)
    assert 'data-view="total" hidden' in raw and "image-rendering:pixelated" in raw


def test_numbers_match_the_scores(report: Tuple[Path, Attribution]) -> None:
    path, att = report
    page = Page(path.read_text(encoding="utf-8"))
    expected = [r for r in att.top_k(TOP_K) if r["query_index"] < MAX_QUERIES]
    shown = [row for rows in page.of("msif-topk") for row in rows]  # query 0 helpful, query 0 harmful, query 1 ...
    assert len(shown) == len(expected)
    for want, (rank, index, label, _, score, delta) in zip(expected, shown):
        assert (int(rank["text"]), int(index["text"]), label["text"]) == \
            (want["rank"], want["pretrain_index"], want["pretrain_label"])
        assert float(score["attrs"]["data-sort"]) == want["score"]
        assert _shown(score["text"]) == pytest.approx(want["score"], rel=5e-3)
        assert score["text"].split()[1] == ("harmful" if want["score"] > 0 else "helpful")
        assert _shown(delta["text"]) == pytest.approx(-want["score"] / N, rel=5e-3)

    classes = att.class_influence()
    for table, name in zip(page.of("msif-heat"), ("mean", "total")):
        values = [[_shown(c["text"]) for c in row[1:]] for row in table]
        assert np.allclose(values, classes[name].numpy(), rtol=5e-3, atol=0)

    removal = att.most_harmful(TOP_K)
    rows = page.of("msif-removal")[0]
    assert [(int(r[0]["text"]), int(r[3]["text"])) for r in rows] == \
        [(r["pretrain_index"], r["queries_harmed"]) for r in removal]

    hist = att.histogram()
    assert len(page.bars) == sum(c > 0 for c in hist["counts"])
    assert sum(int(t.split(": ")[1]) for t in page.text if re.fullmatch(r"\[.*\): \d+", t)) == N * K


def test_rejects_an_empty_top_k(tmp_path: Path, report: Tuple[Path, Attribution]) -> None:
    with pytest.raises(ValueError, match="top_k"):
        write_html(tmp_path / "r.html", report[1], ExampleViews(), top_k=0)


def _chromium(profile: Path, *args: str) -> str:
    out = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


_PROBE = """<script>
window.addEventListener("load", () => {
  const d = document.body.dataset, t = document.querySelector("table.msif-topk"), th = t.tHead.rows[0].cells[4];
  th.click(); th.click();  // ascending, then descending by score
  d.sortedDesc = [...t.tBodies[0].rows].map(r => r.cells[4].dataset.sort).join(",");
  document.querySelector('.msif-switch button[data-show="total"]').click();
  d.totalShown = String(!document.querySelector('[data-view="total"]').hidden);
  d.decoded = [...document.querySelectorAll("img.msif-example")].filter(i => i.naturalWidth > 0).length;
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: .ci/run installs Debian's chromium "
                    "(apt-get install -y --no-install-recommends chromium); install it to run this browser test")
def test_renders_in_a_headless_browser(tmp_path: Path, report: Tuple[Path, Attribution]) -> None:
    path, att = report
    expected = Page(path.read_text(encoding="utf-8"))
    probed = tmp_path / "probed.html"
    probed.write_text(path.read_text(encoding="utf-8").replace("</body>", _PROBE), encoding="utf-8")
    dom = Page(_chromium(tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()))
    assert dom.body.get("data-ready") == "1", "the page's script did not run to its end"
    assert len([t for t in dom.tables if "msif-table" in t["class"]]) == len(expected.tables)
    assert dom.count("msif-example") == int(dom.body["data-decoded"]) == len(expected.images)
    first = [float(v) for v in dom.body["data-sorted-desc"].split(",")]
    assert first == sorted(att.scores.scores[:, 0].tolist())[:TOP_K][::-1]
    assert dom.body["data-total-shown"] == "true"

    shot = tmp_path / "report.png"
    _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2000", path.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1400) and pixels.std() > 10  # not a blank page
    artifacts = Path(os.environ.get("MSIF_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    for f in (shot, path):
        if f.parent != artifacts:
            shutil.copy(f, artifacts / f.name)
    print(f"report screenshot: {artifacts / shot.name}")


def test_without_labels_with_text_examples(tmp_path: Path) -> None:
    att = Attribution(scores=torch.linspace(-1, 1, 12).reshape(6, 2))
    views = ExampleViews([f"sentence <{i}>" for i in range(6)], None)
    page = Page(write_html(tmp_path / "r.html", att, views, top_k=2).read_text(encoding="utf-8"))
    text = " ".join("".join(page.text).split())
    assert "Needs pretraining and query labels." in text and "sentence <5>" in text
    assert page.images == [] and len(page.of("msif-topk")) == 4 and page.body == {}


def test_units_palette_and_thumbnail_size(report: Tuple[Path, Attribution]) -> None:
    """Scores and loss changes say their unit; colours are the shared colour-blind-safe palette; an 8×8 example's
    thumbnail is large enough to read (at least 12 screen pixels per example pixel)."""
    from lightning_msif.reports.palette import SIDES, hex_of

    text = report[0].read_text(encoding="utf-8")
    page = Page(text)
    (head, *_), *_ = [t["rows"] for t in page.tables if "msif-topk" in t["class"]]
    assert [c["text"] for c in head][-2:] == ["Score S (nats)", "Δ loss if removed (nats)"]
    assert "score S (nats)" in page.text and "nats" in SIGN_SENTENCE
    assert f"--harm:{hex_of(SIDES['harmful'])}" in text and f"--help:{hex_of(SIDES['helpful'])}" in text
    assert not re.search(r"#c0392b|#1e8449|rgb\(192,\s*57,\s*43\)|rgb\(30,\s*132,\s*73\)", text)  # the old red/green
    thumbs = [i for i in page.images if "thumb" in i["class"].split()]
    png = base64.b64decode(thumbs[0]["src"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).height >= 8 * 12 and "--thumb-px:96px" in text


def test_histogram_bars_are_log_counts(tmp_path: Path) -> None:
    """One bin holding most scores must not flatten the others: heights follow log(1 + count)."""
    scores = torch.zeros(999, 1, dtype=torch.float64)
    scores[0, 0] = 1.0  # bins: 998 scores at 0, one at 1
    page = Page(write_html(tmp_path / "r.html", Attribution(scores), ExampleViews(), top_k=1).read_text("utf-8"))
    tall, short = sorted((float(b["height"]) for b in page.bars), reverse=True)
    assert short / tall == pytest.approx(math.log(2) / math.log(999), rel=1e-2)


def test_a_rendering_error_leaves_the_last_report_whole(tmp_path: Path) -> None:
    """The tables and the page are rendered before any file is written: a render hook that fails must not leave
    new tables beside the old page."""
    from lightning_msif.reports.publish import report_scores

    scores = torch.linspace(-1, 1, 12).reshape(6, 2)
    data = torch.utils.data.TensorDataset(torch.randn(6, 16), torch.arange(6) % 2)
    queries = torch.utils.data.TensorDataset(torch.randn(2, 16), torch.arange(2))
    report_scores(scores, {}, tmp_path, pretrain_data=data, query_data=queries, top_k=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(example: Any) -> Any:
        raise RuntimeError("cannot render this example")

    with pytest.raises(RuntimeError, match="cannot render"):
        report_scores(-scores, {}, tmp_path, pretrain_data=data, query_data=queries, top_k=2, render=broken)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
