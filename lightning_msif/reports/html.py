"""A self-contained HTML report of an :class:`Attribution`: one file that opens offline (no network, no W&B).

Images are inline base64 PNGs, the histogram inline SVG, and a few lines of inline JS sort the tables and
switch the class matrix between mean and total. Every table has class ``msif-table`` and every rendered
example is an ``<img class="msif-example">``.
"""
from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..atomic import PathLike, save_text
from ..errors import MSIFError
from .attribution import SIGN_SENTENCE, Attribution
from .palette import SIDES, hex_of, tint
from .render import ExampleViews, png_bytes

PX = {"query": 160, "thumb": 96}  # displayed image heights: an 8×8 digit's pixel becomes 20 / 12 screen pixels
_LABELS = {"n_pretrain": "n (pretraining examples)", "n_query": "queries", "alpha": "α (proximal strength)",
           "damping": "damping λ", "hessian_samples": "Hessian samples", "world_size": "processes"}

_CSS = """
:root{--ink:#1f2933;--muted:#6b7280;--line:#e4e7eb;--bg:#f5f6f8}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 color:var(--ink);background:var(--bg)}
main{max-width:1240px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:24px;margin:0 0 2px}h2{font-size:18px;margin:0 0 10px}h3{font-size:16px;margin:0}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:8px 24px}
nav a{margin-right:18px;color:var(--ink);text-decoration:none;font-weight:600}nav a:hover{text-decoration:underline}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin:16px 0;scroll-margin-top:48px}
.muted{color:var(--muted)}.note{color:var(--muted);font-size:13px;margin:6px 0 10px}
.sign{border-left:5px solid var(--neutral);background:#fff;padding:10px 16px;margin:14px 0;border-radius:4px}
.summary{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
table.msif-table{border-collapse:collapse;font-variant-numeric:tabular-nums;background:#fff}
.msif-table th,.msif-table td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:middle}
.msif-table thead th{background:#eef0f3;font-weight:600;white-space:nowrap;cursor:pointer;user-select:none}
.msif-table thead th:hover{background:#e1e5ea}
.msif-table th[data-dir=asc]::after{content:" ▲"}.msif-table th[data-dir=desc]::after{content:" ▼"}
.msif-table td.num{text-align:right;white-space:nowrap}
.msif-table tbody th{font-weight:600;white-space:nowrap;background:#f8f9fa}
.harmful{color:var(--harm)}.helpful{color:var(--help)}
td.harmful{background:var(--harm-bg)}td.helpful{background:var(--help-bg)}
.word{display:inline-block;width:54px;text-align:left;font-size:11px;margin-left:4px;text-transform:uppercase;
 letter-spacing:.04em}
.ok{color:var(--help);font-weight:600}.bad{color:var(--harm);font-weight:600}
img.msif-example{display:block;background:#000;border-radius:2px}
img.query{height:var(--query-px)}img.thumb{height:var(--thumb-px)}img.pixel{image-rendering:pixelated}
.msif-text{max-width:320px;font-size:12px;white-space:pre-wrap}
.pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr));gap:24px;margin-top:12px}
.pair>div{overflow-x:auto}.pair table{width:100%}
.pair h4{margin:0 0 6px;font-size:15px}
.qhead{display:flex;gap:20px;align-items:center}
.qmeta{font-size:15px}.qmeta b{display:inline-block;min-width:92px;color:var(--muted);font-weight:500}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;margin-top:6px}
.badge.ok{background:var(--help-bg)}.badge.bad{background:var(--harm-bg)}
.qnav a{display:inline-block;margin:2px 4px 2px 0;padding:1px 7px;border:1px solid var(--line);border-radius:6px;
 text-decoration:none;color:var(--ink);font-size:12px}.qnav a.bad{border-color:var(--harm);color:var(--harm)}
.heat td{text-align:center;min-width:72px}.scroll{overflow-x:auto}
.msif-toggle{margin:0 0 10px}.msif-toggle button{font:inherit;padding:4px 12px;border:1px solid #c4cad1;
 background:#fff;cursor:pointer}.msif-toggle button:first-child{border-radius:6px 0 0 6px}
.msif-toggle button:last-child{border-radius:0 6px 6px 0;border-left:0}.msif-toggle button.on{background:#1f2933;color:#fff}
.legend span{display:inline-block;width:14px;height:14px;vertical-align:-2px;margin:0 4px 0 12px;border-radius:2px}
svg .bar.harmful{fill:var(--harm)}svg .bar.helpful{fill:var(--help)}svg .bar.neutral{fill:var(--neutral)}
svg .axis{stroke:#9aa5b1}svg .zero{stroke:#1f2933;stroke-dasharray:4 3}svg text{font-size:11px;fill:#52606d}
"""


def _root() -> str:
    """The CSS variables taken from the palette and the image sizes (the rest of the CSS refers to them)."""
    values = {"--harm": hex_of(SIDES["harmful"]), "--help": hex_of(SIDES["helpful"]),
              "--neutral": hex_of(SIDES["neutral"]), "--harm-bg": hex_of(tint(SIDES["harmful"], 0.1)),
              "--help-bg": hex_of(tint(SIDES["helpful"], 0.1)), "--query-px": f"{PX['query']}px",
              "--thumb-px": f"{PX['thumb']}px"}
    return ":root{" + ";".join(f"{k}:{v}" for k, v in values.items()) + "}"

_JS = """
(() => {
  const key = (row, i) => { const c = row.cells[i]; return c ? (c.dataset.sort ?? c.textContent.trim()) : ""; };
  const cmp = (x, y) => {
    if (x === "" || y === "") return (x === "") - (y === "");
    const a = parseFloat(x), b = parseFloat(y);
    return isNaN(a) || isNaN(b) ? x.localeCompare(y, undefined, {numeric: true}) : a - b;
  };
  document.querySelectorAll("table.msif-table thead th").forEach(th => th.addEventListener("click", () => {
    const table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
    const dir = th.dataset.dir === "asc" ? "desc" : "asc", s = dir === "asc" ? 1 : -1;
    table.querySelectorAll("thead th").forEach(h => delete h.dataset.dir);
    th.dataset.dir = dir;
    body.append(...[...body.rows].sort((a, b) => s * cmp(key(a, i), key(b, i))));
  }));
  document.querySelectorAll(".msif-switch").forEach(box => box.querySelectorAll("button").forEach(b =>
    b.addEventListener("click", () => {
      box.querySelectorAll("[data-view]").forEach(v => { v.hidden = v.dataset.view !== b.dataset.show; });
      box.querySelectorAll("button").forEach(o => o.classList.toggle("on", o === b));
    })));
  document.body.dataset.ready = "1";
})();
"""


def _esc(x: Any) -> str:
    return "—" if x is None else html.escape(str(x))


def _num(x: Optional[float], signed: bool = False) -> str:
    """3 significant digits: plain for magnitudes in [0.001, 1000), else scientific (``1.23e-05``)."""
    if x is None:
        return "—"
    x, sign = float(x), "+" if signed else ""
    if x == 0 or not math.isfinite(x):
        return format(x, sign + "g")
    if 1e-3 <= abs(x) < 1e3:
        return format(x, f"{sign}.{max(0, 2 - math.floor(math.log10(abs(x))))}f")
    return format(x, sign + ".2e")


def _side(score: float) -> str:
    return "harmful" if score > 0 else "helpful" if score < 0 else "neutral"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return '<span class="ok">yes</span>' if v else '<span class="bad">no</span>'
    if isinstance(v, float):
        return format(v, ".3g")
    return _esc(v)


def _signed_td(value: float, side: str, word: bool = False) -> str:
    """A number coloured by the side of its example, with the word ``helpful``/``harmful`` beside it if asked."""
    extra = f' <span class="word">{side}</span>' if word else ""
    return f'<td class="num {side}" data-sort="{value!r}">{_num(value, signed=True)}{extra}</td>'


def _table(head: Sequence[str], rows: Iterable[str], kind: str) -> str:
    """A sortable table; ``head`` and ``rows`` are HTML (escaped by the caller)."""
    ths = "".join(f'<th title="Click to sort">{h}</th>' for h in head)
    return f'<table class="msif-table {kind}"><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


class _Images:
    """``<img class="msif-example">`` tags of rendered examples (text examples as text), each PNG encoded once."""

    def __init__(self, views: ExampleViews):
        self.views = views
        self._uris: Dict[Tuple[str, int, str], str] = {}

    def tag(self, which: str, index: int, kind: str) -> str:
        rendered = self.views.get(which, index)
        if rendered is None:
            return '<span class="muted">—</span>'
        if isinstance(rendered, str):
            short = rendered if len(rendered) <= 160 else rendered[:159] + "…"
            return f'<div class="msif-text" title="{_esc(rendered)}">{_esc(short)}</div>'
        key = (which, index, kind)
        if key not in self._uris:
            self._uris[key] = base64.b64encode(png_bytes(rendered, PX[kind])).decode("ascii")
        pixel = " pixel" if max(np.asarray(rendered).shape[:2]) < PX[kind] else ""
        return (f'<img class="msif-example {kind}{pixel}" alt="{which} example {index}" '
                f'src="data:image/png;base64,{self._uris[key]}">')


def _summary(att: Attribution) -> str:
    groups: Dict[str, List[str]] = {"Run": [], "Convergence": [], "Timings (s)": []}
    for key, value in att.summary().items():
        if key.startswith("seconds/"):
            group, label = "Timings (s)", key.split("/", 1)[1].replace("_", " ")
        elif "_solve/" in key:
            stage, item = key.split("_solve/", 1)
            group, label = "Convergence", f"{stage} solve: {item.replace('_', ' ')}"
        else:
            group, label = "Run", _LABELS.get(key, key.replace("_", " "))
        groups[group].append(f"<tr><th>{_esc(label)}</th><td>{_value(value)}</td></tr>")
    tables = (_table((_esc(name), ""), rows, "msif-summary") for name, rows in groups.items() if rows)
    return f'<div class="summary">{"".join(tables)}</div>'


def _heat_td(value: float, scale: float, title: str) -> str:
    side = _side(value)
    t = min(1.0, abs(value) / scale) if side != "neutral" else 0.0
    r, g, b = tint(SIDES[side], t)
    ink = "#fff" if t > 0.55 else "#1f2933"
    return (f'<td class="num" data-sort="{value!r}" style="background:rgb({r},{g},{b});color:{ink}" '
            f'title="{_esc(title)}: {_num(value)} ({side})">{_num(value)}</td>')


def _class_matrix(att: Attribution) -> str:
    ci = att.class_influence()
    if ci is None:
        return '<p class="muted">Needs pretraining and query labels.</p>'
    pcls, qcls = ci["pretrain_classes"], ci["query_classes"]
    pcount = torch.bincount(att.pretrain_labels.long(), minlength=len(pcls)).tolist()
    qcount = torch.bincount(att.query_labels.long(), minlength=len(qcls)).tolist()
    head = ["pretraining ↓ / query →"] + [f"{_esc(q)} <small class=muted>({c})</small>" for q, c in zip(qcls, qcount)]
    views = []
    for name, what in (("mean", "mean score"), ("total", "total score")):
        m = ci[name]
        scale = float(m.abs().max()) or 1.0
        rows = []
        for r, (p, pc) in enumerate(zip(pcls, pcount)):
            cells = "".join(
                _heat_td(float(m[r, c]), scale, f"{what}, pretraining {p} → query {q}") if pc and qc
                else '<td class="muted" data-sort="">—</td>' for c, (q, qc) in enumerate(zip(qcls, qcount)))
            rows.append(f"<tr><th>{_esc(p)} <small class=muted>({pc})</small></th>{cells}</tr>")
        hidden = "" if name == "mean" else " hidden"
        views.append(f'<div class="scroll" data-view="{name}"{hidden}>{_table(head, rows, "msif-heat heat")}</div>')
    legend = ('<span style="background:var(--harm)"></span>harmful (S &gt; 0)'
              '<span style="background:var(--help)"></span>helpful (S &lt; 0)'
              '<span style="background:#fff;border:1px solid #ccc"></span>0')
    return (f'<p class="note">Rows: pretraining classes; columns: query classes (number of examples in brackets). '
            f'Mean: the average score (nats) over all (pretraining, query) pairs of the two classes; total: their sum. '
            f'Colours scale to the largest magnitude in the table. <span class="legend">{legend}</span></p>'
            f'<div class="msif-switch"><div class="msif-toggle"><button type="button" data-show="mean" class="on">'
            f'Mean</button><button type="button" data-show="total">Total</button></div>{"".join(views)}</div>')


def bar_height(count: float, tallest: float, plot_height: float) -> float:
    """A bar's height on a log scale of ``1 + count``: one bin may hold most scores, and a bin of a single
    (pretraining, query) pair in the tails must still show (at least 2 px)."""
    return max(math.log1p(count) / math.log1p(max(tallest, 1.0)) * plot_height, 2.0)


def _histogram(att: Attribution, bins: int = 50) -> str:
    h = att.histogram(bins)
    counts, edges = h["counts"], h["edges"]
    width, height, left, right, top, bottom = 820, 230, 56, 16, 10, 34
    pw, ph, tallest = width - left - right, height - top - bottom, max(counts) or 1.0
    x = lambda v: left + (v - edges[0]) / (edges[-1] - edges[0]) * pw
    parts = []
    for c, a, b in zip(counts, edges, edges[1:]):
        if c > 0:
            side = "harmful" if a >= 0 else "helpful" if b <= 0 else "neutral"
            bh = bar_height(c, tallest, ph)
            parts.append(f'<rect class="bar {side}" x="{x(a):.1f}" y="{top + ph - bh:.1f}" '
                         f'width="{max(x(b) - x(a) - 1, 1):.1f}" height="{bh:.1f}">'
                         f'<title>[{_num(a)}, {_num(b)}): {int(c)}</title></rect>')
    base = top + ph
    ticks = [(edges[0], "start"), (edges[-1], "end")]
    if edges[0] < 0 < edges[-1]:
        parts.append(f'<line class="zero" x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{top}" y2="{base}"/>')
        if min(x(0) - left, left + pw - x(0)) > 40:
            ticks.append((0.0, "middle"))
    parts += [f'<text x="{x(v):.1f}" y="{base + 16}" text-anchor="{anchor}">{_num(v)}</text>' for v, anchor in ticks]
    parts += [f'<line class="axis" x1="{left}" x2="{left + pw}" y1="{base}" y2="{base}"/>',
              f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{base}"/>',
              f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{int(tallest)}</text>',
              f'<text x="{left - 6}" y="{base}" text-anchor="end">0</text>',
              f'<text x="{left + pw / 2}" y="{height - 2}" text-anchor="middle">score S (nats)</text>']
    share = lambda count: f"{100 * count / h['total']:.1f}%"
    return (f'<p class="note">All {h["total"]} scores ({att.n} pretraining × {att.k} queries), {bins} bins: '
            f'<span class="harmful">{share(h["positive"])} harmful</span>, <span class="helpful">'
            f'{share(h["negative"])} helpful'
            f'</span>. Bar heights: counts on a log scale (log(1 + count)). Hover a bar for its range and count.</p>'
            f'<svg class="msif-histogram" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="Histogram of all scores">{"".join(parts)}</svg>')


def _removal(att: Attribution, images: _Images, top_k: int) -> str:
    rows = att.most_harmful(top_k)
    if not rows:
        return f'<p class="muted">No pretraining example is harmful (S &gt; 0) in any query\'s top {top_k}.</p>'
    head = ("Pretraining index", "Label", "Image", f"Queries harmed (in top {top_k})", "Total harmful score (nats)",
            "Mean score (nats)", "Mean Δ query loss if removed (nats)")
    body = []
    for r in rows:
        mean = r["mean_score"]
        body.append(f'<tr><td class="num">{r["pretrain_index"]}</td><td>{_esc(r["pretrain_label"])}</td>'
                    f'<td>{images.tag("pretrain", r["pretrain_index"], "thumb")}</td>'
                    f'<td class="num">{r["queries_harmed"]}</td>{_signed_td(r["total_harmful_score"], "harmful")}'
                    f'{_signed_td(mean, _side(mean), word=True)}{_signed_td(-mean / att.n, _side(mean))}</tr>')
    return (f'<p class="note">Pretraining examples that appear in the most queries\' top-{top_k} harmful lists '
            f'(ties broken by the sum of their positive scores): candidates to inspect or remove.</p>'
            f'<div class="scroll">{_table(head, body, "msif-removal")}</div>')


def _queries(att: Attribution, images: _Images, top_k: int, max_queries: int) -> str:
    shown = min(att.k, max_queries)
    groups: Dict[Tuple[int, str], List[Dict[str, Any]]] = defaultdict(list)
    for row in att.top_k(top_k, queries=shown):
        groups[row["query_index"], row["side"]].append(row)
    head = ("Rank", "Index", "Label", "Image", "Score S (nats)", "Δ loss if removed (nats)")
    links, sections = [], []
    for j in range(shown):
        first = groups[j, "helpful"][0]
        label, pred = first["query_label"], first["query_prediction"]
        known = label is not None and pred is not None
        verdict = "" if not known else "ok" if label == pred else "bad"
        badge = {"": "", "ok": '<span class="badge ok">correct</span>',
                 "bad": '<span class="badge bad">misclassified</span>'}[verdict]
        links.append(f'<a href="#q{j}" class="{verdict}">{j}: {_esc(label)}'
                     f'{" → " + _esc(pred) if known and verdict == "bad" else ""}</a>')
        pair = []
        for side, title, order in (("helpful", "Most helpful", "lowest"), ("harmful", "Most harmful", "highest")):
            rows = [f'<tr><td class="num">{r["rank"]}</td><td class="num">{r["pretrain_index"]}</td>'
                    f'<td>{_esc(r["pretrain_label"])}</td><td>{images.tag("pretrain", r["pretrain_index"], "thumb")}'
                    f'</td>{_signed_td(r["score"], _side(r["score"]), word=True)}'
                    f'{_signed_td(r["delta_loss_if_removed"], _side(r["score"]))}</tr>' for r in groups[j, side]]
            pair.append(f'<div><h4 class="{side}">{title} <small class="muted">({order} S)</small></h4>'
                        f'{_table(head, rows, "msif-topk msif-" + side)}</div>')
        sections.append(
            f'<section class="card query-section" id="q{j}"><div class="qhead">'
            f'{images.tag("query", j, "query")}<div class="qmeta"><h3>Query {j}</h3>'
            f'<div><b>label</b>{_esc(label)}</div><div><b>prediction</b>{_esc(pred)}</div>{badge}</div></div>'
            f'<div class="pair">{"".join(pair)}</div></section>')
    omitted = att.k - shown
    more = (f'<p class="note">Showing the first {shown} of {att.k} queries; {omitted} more '
            f'{"query is" if omitted == 1 else "queries are"} omitted (raise max_queries to see them).</p>'
            if omitted else "")
    return (f'<section class="card" id="queries"><h2>Queries</h2><p class="note">For each query, the {top_k} '
            f'pretraining examples with the lowest and highest scores. Δ query loss if removed = −S/n '
            f'(n = {att.n}).</p>{more}<div class="qnav">{"".join(links)}</div></section>{"".join(sections)}')


def _page(att: Attribution, views: ExampleViews, top_k: int, title: str, max_queries: int) -> str:
    images = _Images(views)
    created = att.manifest.get("created") if att.manifest else None
    subtitle = f"{att.n} pretraining examples × {att.k} queries" + (f" · computed {_esc(created)}" if created else "")
    card = lambda ident, heading, body: f'<section class="card" id="{ident}"><h2>{heading}</h2>{body}</section>'
    return "".join([
        (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
         f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_esc(title)}</title>'
         f"<style>{_root()}{_CSS}</style></head><body>"),
        ('<nav><a href="#summary">Summary</a><a href="#classes">Class influence</a><a href="#histogram">Histogram</a>'
         '<a href="#removal">Removal candidates</a><a href="#queries">Queries</a></nav><main>'),
        (f'<header id="summary"><h1>{_esc(title)}</h1><div class="muted">{subtitle}</div>'
         f'<p class="sign msif-sign">{_esc(SIGN_SENTENCE)}</p>{_summary(att)}</header>'),
        card("classes", "Class-to-class influence", _class_matrix(att)),
        card("histogram", "Distribution of all scores", _histogram(att)),
        card("removal", "Harmful for the most queries", _removal(att, images, top_k)),
        _queries(att, images, top_k, max_queries),
        f"</main><script>{_JS}</script></body></html>\n",
    ])


MAX_QUERIES = 50  # query sections in report.html by default: each holds 2·top_k pictures


def check_page_options(top_k: Any, max_queries: Any) -> None:
    """Refuse a ``top_k`` below 1 or a ``max_queries`` below 0 (or either not an integer), saying which and why."""
    for name, value, least, what in (("top_k", top_k, 1, "pretraining examples per query and side"),
                                     ("max_queries", max_queries, 0, "queries shown in report.html")):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise MSIFError(f"{name}={value!r}: must be an integer ≥ {least} ({what}).")


def html_page(attribution: Attribution, views: ExampleViews, top_k: int,
              title: str = "Multi-stage influence report", max_queries: int = MAX_QUERIES) -> str:
    """The report of ``attribution`` as one self-contained HTML page."""
    check_page_options(top_k, max_queries)
    return _page(attribution, views, top_k, title, max_queries)


def write_html(path: PathLike, attribution: Attribution, views: ExampleViews, top_k: int,
               title: str = "Multi-stage influence report", max_queries: int = MAX_QUERIES) -> Path:
    """Write the report of ``attribution`` to ``path`` atomically (temp file, fsync, rename) and return the path."""
    return save_text(path, html_page(attribution, views, top_k, title, max_queries))
