"""Where an evaluation goes: CSV, a scatter PNG, one self-contained HTML page, raw tensors, and W&B.

    <out_dir>/evaluation.csv            the table (``COLUMNS``), one row per method
    <out_dir>/lds_per_seed.csv          method, seed, lds
    <out_dir>/loo_scatter.png           predicted (−S/n) against measured loss change, one panel per method
    <out_dir>/evaluation.html           all of the above in one file that opens offline
    <out_dir>/evaluation.safetensors    scores, removed indices, measured changes, subsets, losses; settings (metadata)
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from matplotlib.figure import Figure

from ..reports import figures
from ..reports.sinks import csv_text
from ..reports.palette import SIDES, hex_of
from ..atomic import save_bytes, save_tensors, save_text
from .result import COLUMNS, EvaluationResult

HOW_TO_READ = ("Leave-one-out: each point is one (removed pretraining example, query) pair; x is the loss change the "
               "scores predict, −S/n, y the change measured by retraining both stages without the example. LDS: for "
               "each retraining seed, the mean over queries of the Spearman correlation across random subsets between "
               "the subset's summed scores and the query loss after training on it. 1 is perfect, 0 is chance.")


def _seed_rows(result: EvaluationResult) -> List[Dict[str, Any]]:
    seeds = result.settings["lds_seeds"]
    return [{"method": m, "seed": s, "lds": v} for m, vals in result.lds_per_seed.items() for s, v in zip(seeds, vals)]


def scatter(result: EvaluationResult) -> Optional[Figure]:
    """One panel per method: predicted against measured leave-one-out loss changes (None without LOO)."""
    if not len(result.loo_indices):
        return None
    import matplotlib.pyplot as plt

    names = list(result.scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), dpi=100, squeeze=False)
    actual = result.loo_actual.reshape(-1).numpy()
    for ax, row, name in zip(axes[0], result.rows, names):
        predicted = result.predicted(name).reshape(-1).numpy()
        ax.scatter(predicted, actual, s=6, alpha=0.5, color=hex_of(SIDES["helpful"]), linewidths=0)  # the reports' blue
        low, high = min(predicted.min(), actual.min()), max(predicted.max(), actual.max())
        # y = x: the scale the scores claim
        ax.plot([low, high], [low, high], color=hex_of(SIDES["neutral"]), linewidth=0.8)
        ax.set_title(f"{name}: r = {row['loo_pearson']:.3f}", fontsize=9)
        ax.set_xlabel("predicted −S/n", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("measured loss change", fontsize=8)
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f'<td class="num">{"—" if math.isnan(v) else f"{v:+.4f}"}</td>'
    return f'<td>{"—" if v is None else html.escape(str(v))}</td>'


def _html_table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(result: EvaluationResult, png: Optional[bytes]) -> str:
    """The self-contained HTML page (inline PNG, no scripts, no network)."""
    s = result.settings
    facts = {"recipe": s["recipe"], "pretraining examples (n)": s["n_pretrain"], "queries": s["n_query"],
             "mode": s["mode"], "damping λ": s["damping"], "solver": s["solver"], "warm start": s["warm_start"],
             "leave-one-out removals": len(result.loo_indices), "LDS subsets": len(result.lds_masks),
             "retraining runs (trained now / from the cache)": f"{result.retrained} / {result.reused}"}
    img = f'<img alt="LOO scatter" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>msif evaluation</title><style>
body{{font:14px/1.45 system-ui,sans-serif;color:#1f2933;max-width:1100px;margin:24px auto;padding:0 20px}}
table{{border-collapse:collapse;margin:8px 0 18px}}
th,td{{padding:4px 10px;border-bottom:1px solid #e4e7eb;text-align:left}}th{{background:#eef0f3}}
td.num{{text-align:right;font-variant-numeric:tabular-nums}}img{{max-width:100%}}
.note{{color:#6b7280}}</style></head><body>
<h1>Do the scores predict retraining?</h1><p class="note">{html.escape(HOW_TO_READ)}</p>
<h2>Methods</h2>{_html_table(result.rows, list(COLUMNS))}
<h2>Leave-one-out</h2>{img or '<p class="note">not run</p>'}
<h2>LDS per seed</h2>{_html_table(_seed_rows(result), ["method", "seed", "lds"])}
<h2>Settings</h2>{_html_table([{"setting": k, "value": v} for k, v in facts.items()], ["setting", "value"])}
</body></html>
"""


def write_outputs(result: EvaluationResult, folder: Path) -> Dict[str, Path]:
    """Every local file (atomic writes); returns their paths by kind."""
    out = {"csv": folder / "evaluation.csv", "lds_csv": folder / "lds_per_seed.csv", "html": folder / "evaluation.html",
           "tensors": folder / "evaluation.safetensors"}
    save_text(out["csv"], csv_text(result.rows, COLUMNS))
    save_text(out["lds_csv"], csv_text(_seed_rows(result), ("method", "seed", "lds")))
    fig = scatter(result)
    png = None
    if fig is not None:
        png = _png(fig)
        figures.close(fig)
        out["png"] = folder / "loo_scatter.png"
        save_bytes(out["png"], png)
    save_text(out["html"], page(result, png))
    tensors = {"loo_indices": result.loo_indices, "loo_actual": result.loo_actual, "lds_masks": result.lds_masks,
               "lds_losses": result.lds_losses, **{f"scores.{m}": s for m, s in result.scores.items()}}
    save_tensors(out["tensors"], tensors, metadata={"settings": json.dumps(result.settings, default=str),
                                                    "rows": json.dumps(result.rows)})
    return out


def log_wandb(target: Any, result: EvaluationResult, prefix: str = "msif") -> None:
    """The table, the per-seed LDS, the scatter and the HTML page (from the files written) to a W&B run, or a
    ``WandbLogger``'s; the table's numbers also to the run summary, as ``<prefix>/eval/<method>/<column>``."""
    import wandb

    run = target.experiment if hasattr(target, "experiment") else target
    payload: Dict[str, Any] = {
        f"{prefix}/evaluation": wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in result.rows]),
        f"{prefix}/lds_per_seed": wandb.Table(columns=["method", "seed", "lds"],
                                              data=[[r["method"], r["seed"], r["lds"]] for r in _seed_rows(result)]),
        f"{prefix}/evaluation_html": wandb.Html(Path(result.files["html"]).read_text(encoding="utf-8")),
    }
    if "png" in result.files:
        payload[f"{prefix}/loo_scatter"] = wandb.Image(str(result.files["png"]))
    run.log(payload)
    # not under <prefix>/evaluation: W&B would nest these keys inside the logged table's summary entry
    run.summary.update({f"{prefix}/eval/{r['method']}/{c}": r[c] for r in result.rows for c in COLUMNS[1:]
                        if r[c] is not None})
