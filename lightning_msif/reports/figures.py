"""Matplotlib figures of the class-to-class matrix and the score histogram (for W&B and TensorBoard).

Colours come from ``palette`` (the same as report.html); scores and losses are in nats.
"""
from __future__ import annotations

from typing import Any, Dict

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .palette import SIDES, diverging, hex_of  # noqa: E402


def heatmap(classes: Dict[str, Any], key: str = "mean") -> Figure:
    """Diverging heatmap: rows = pretraining classes, columns = query classes; vermillion harmful, blue helpful."""
    m = classes[key].double().numpy()
    limit = float(abs(m).max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * m.shape[1], 1.0 + 0.5 * m.shape[0]), dpi=100)
    im = ax.imshow(m, cmap=diverging(), vmin=-limit, vmax=limit)
    ax.set_xticks(range(m.shape[1]), classes["query_classes"])
    ax.set_yticks(range(m.shape[0]), classes["pretrain_classes"])
    ax.set_xlabel("query class")
    ax.set_ylabel("pretraining class")
    ax.set_title(f"{key} score S, nats (vermillion: harmful, blue: helpful)", fontsize=9)
    for (r, c), v in np.ndenumerate(m):
        ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label="S (nats)")
    fig.tight_layout()
    return fig


def histogram(hist: Dict[str, Any]) -> Figure:
    """Bar chart of the score histogram, counts on a log scale (most scores sit in the bins next to zero, the
    tails hold the influential pairs); the zero line separates helpful from harmful."""
    edges, counts = hist["edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    colors = [hex_of(SIDES["harmful" if (a + b) / 2 > 0 else "helpful"]) for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=colors)
    ax.set_yscale("log")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("score S, nats (left: helpful, right: harmful)")
    ax.set_ylabel("(pretraining, query) pairs, log scale")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
