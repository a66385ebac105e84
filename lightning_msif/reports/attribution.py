"""The views a person looks at, computed from a score matrix and the examples' metadata.

Signs follow docs/math.md: a positive score is *harmful* (upweighting the pretraining example raises
the query's loss), a negative one *helpful*; removing example ``i`` changes the query loss by about
``−S[i, j] / n``. Everything here is plain data (lists of dicts, tensors): the sinks render it.

Every view is computed from the matrix's row blocks (``ScoreMatrix``), so a streamed matrix that does not fit
in memory is reported as readily as one that does: one pass gathers each query's top lists, the per-example
sums, the class totals and the range; one more pass counts the histogram.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..core.progress import closing, new_bar
from ..core.scoring import DenseScores, ScoreMatrix
from ..errors import MSIFError

SIGN_SENTENCE = (
    "Score S = d(query loss)/d(weight of the pretraining example). Harmful (S > 0): upweighting the "
    "pretraining example raises the query's loss; helpful (S < 0): it lowers it. Removing the example "
    "changes the query loss by about −S/n. Scores and loss changes are in the loss's unit: nats for "
    "cross-entropy (natural logarithm)."
)

TOPK_COLUMNS = ("query_index", "query_label", "query_prediction", "side", "rank", "pretrain_index",
                "pretrain_label", "score", "delta_loss_if_removed")
UNITS = {"score": "nats", "delta_loss_if_removed": "nats", "total_harmful_score": "nats", "mean_score": "nats"}
"""Scores and loss changes are losses (cross-entropy: nats); a score is d(loss)/d(weight), the weight unitless.
A loss of another unit (a custom ``loss_fn``) keeps these names: they describe the default cross-entropy."""


def header(column: str) -> str:
    """A column's name where people read it (CSV files, logged tables), with its unit: ``score`` → ``score_nats``."""
    unit = UNITS.get(column)
    return f"{column}_{unit}" if unit else column


@dataclass
class Digest:
    """What one pass over a score matrix gathers: each query's ``top`` lowest and highest scores (ties: the lower
    pretraining index first), per-example sums, per-class totals and the range of all scores."""

    helpful: Tuple[torch.Tensor, torch.Tensor]  # (scores, pretraining indices), each [top, k], ascending
    harmful: Tuple[torch.Tensor, torch.Tensor]  # descending
    positive_total: torch.Tensor  # [n] sum over queries of max(S, 0)
    row_sum: torch.Tensor  # [n] sum over queries of S
    class_rows: Optional[torch.Tensor]  # [pretraining classes, k] sums of S, when the rows have labels
    low: float
    high: float


def _merge(best: Tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, start: int, top: int,
           descending: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` best of ``best`` and a new block of rows (at ``start``), per column. Among equal scores the
    lower index stays ahead, whatever the block size: the block's candidates (every score at least as good as
    its ``top``-th best, ties included) are taken in row order, and the merge is a stable sort."""
    b = len(rows)
    kth = torch.topk(rows, min(top, b), dim=0, largest=descending).values[-1]
    candidate = rows >= kth if descending else rows <= kth
    m = int(candidate.sum(0).max())
    first = torch.arange(b, 0, -1).unsqueeze(1) * candidate  # candidates in row order, then the rest
    at = torch.topk(first, m, dim=0).indices
    values = torch.where(candidate.gather(0, at), rows.gather(0, at),
                         torch.tensor(float("-inf") if descending else float("inf"), dtype=rows.dtype))
    values, indices = torch.cat([best[0], values]), torch.cat([best[1], at + start])
    order = torch.sort(values, dim=0, descending=descending, stable=True).indices[:top]
    return values.gather(0, order), indices.gather(0, order)


@dataclass
class Attribution:
    """A score matrix ``[n_pretrain, n_query]`` (in memory, or a ``ScoreMatrix`` read block by block) with what
    is known about its rows and columns."""

    scores: Union[torch.Tensor, ScoreMatrix]
    pretrain_labels: Optional[torch.Tensor] = None  # [n] class ids
    query_labels: Optional[torch.Tensor] = None  # [k] class ids
    query_predictions: Optional[torch.Tensor] = None  # [k] the finetuned model's predicted class
    pretrain_class_names: Optional[Sequence[str]] = None
    query_class_names: Optional[Sequence[str]] = None
    manifest: Dict[str, Any] = field(default_factory=dict)  # how the scores were computed
    progress: bool = False  # a bar over the rows of each pass (a streamed matrix takes a while to read)
    _digests: Dict[int, Digest] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.scores, torch.Tensor):
            self.scores = DenseScores(self.scores)

    @property
    def n(self) -> int:
        return self.scores.n

    @property
    def k(self) -> int:
        return self.scores.k

    def _name(self, labels: Optional[torch.Tensor], names: Optional[Sequence[str]], i: int) -> Any:
        if labels is None:
            return None
        c = int(labels[i])
        return names[c] if names is not None and 0 <= c < len(names) else c

    def _read(self, what: str) -> Iterator[Tuple[int, torch.Tensor]]:
        """The matrix's row blocks, with a bar over its rows when ``progress``."""
        bar = new_bar(self.n, f"report: {what}", "rows") if self.progress else None
        for start, rows in self.scores.blocks():
            yield start, rows
            if bar is not None:
                bar.update(len(rows))
        closing(bar)

    def digest(self, top: Optional[int] = None) -> Digest:
        """One pass over the matrix (kept per ``top``; None: any pass made so far, for what does not depend on
        ``top``); an error naming the first non-finite score."""
        if top is None and self._digests:
            return next(iter(self._digests.values()))
        top = max(1, min(top or 1, self.n))
        if top not in self._digests:
            self._digests[top] = self._scan(top)
        return self._digests[top]

    def _scan(self, top: int) -> Digest:
        empty = (torch.empty(0, self.k, dtype=torch.float64), torch.empty(0, self.k, dtype=torch.long))
        helpful, harmful = empty, empty
        positive, total = torch.zeros(self.n, dtype=torch.float64), torch.zeros(self.n, dtype=torch.float64)
        labels = self.pretrain_labels.long() if self.pretrain_labels is not None and self.query_labels is not None \
            else None
        class_rows = torch.zeros(int(labels.max()) + 1, self.k, dtype=torch.float64) if labels is not None else None
        low, high, bad, first = float("inf"), float("-inf"), 0, None
        for start, rows in self._read("top lists and sums"):
            rows = rows.double()
            finite = torch.isfinite(rows)
            if not bool(finite.all()):
                bad += int((~finite).sum())
                if first is None:
                    i, j = (~finite).nonzero()[0].tolist()
                    first = (start + i, j)
                continue
            stop = start + len(rows)
            helpful = _merge(helpful, rows, start, top, descending=False)
            harmful = _merge(harmful, rows, start, top, descending=True)
            positive[start:stop], total[start:stop] = rows.clamp_min(0).sum(1), rows.sum(1)
            if class_rows is not None:
                class_rows.index_add_(0, labels[start:stop], rows)
            low, high = min(low, float(rows.min())), max(high, float(rows.max()))
        if first is not None:
            raise MSIFError(f"The scores hold {bad} non-finite values, the first at pretraining example {first[0]}, "
                            f"query {first[1]}: score again with more damping before reporting.")
        return Digest(helpful, harmful, positive, total, class_rows, low, high)

    def top_k(self, k: int, queries: Optional[int] = None) -> List[Dict[str, Any]]:
        """One row per (query, side, rank): the ``k`` most helpful and ``k`` most harmful pretraining examples
        (of the first ``queries`` queries; None: all)."""
        d = self.digest(k)
        rows = []
        for j in range(self.k if queries is None else min(queries, self.k)):
            for side, (values, indices) in (("helpful", d.helpful), ("harmful", d.harmful)):
                for rank, (s, i) in enumerate(zip(values[:, j].tolist(), indices[:, j].tolist()), start=1):
                    rows.append({
                        "query_index": j,
                        "query_label": self._name(self.query_labels, self.query_class_names, j),
                        "query_prediction": self._name(self.query_predictions, self.query_class_names, j),
                        "side": side, "rank": rank, "pretrain_index": i,
                        "pretrain_label": self._name(self.pretrain_labels, self.pretrain_class_names, i),
                        "score": s, "delta_loss_if_removed": -s / self.n,
                    })
        return rows

    def class_influence(self) -> Optional[Dict[str, Any]]:
        """Mean and total score of each pretraining class on each query class (None without labels)."""
        if self.pretrain_labels is None or self.query_labels is None:
            return None
        pl, ql = self.pretrain_labels.long(), self.query_labels.long()
        cp, cq = int(pl.max()) + 1, int(ql.max()) + 1
        onehot_q = torch.nn.functional.one_hot(ql, cq).double()  # [k, cq]
        total = self.digest().class_rows @ onehot_q
        count = torch.bincount(pl, minlength=cp).double()[:, None] * onehot_q.sum(0)[None, :]
        mean = total / count.clamp_min(1)
        names = lambda n, c: [str(n[i]) if n is not None and i < len(n) else str(i) for i in range(c)]
        return {"mean": mean, "total": total, "pretrain_classes": names(self.pretrain_class_names, cp),
                "query_classes": names(self.query_class_names, cq)}

    def most_harmful(self, k: int, limit: int = 50) -> List[Dict[str, Any]]:
        """Pretraining examples in the most queries' top-``k`` harmful lists (removal candidates)."""
        d = self.digest(k)
        values, indices = d.harmful
        counts = torch.bincount(indices[values > 0], minlength=self.n)
        candidates = counts.nonzero().flatten().tolist()
        order = sorted(candidates, key=lambda i: (-int(counts[i]), -float(d.positive_total[i]), i))
        return [{"pretrain_index": i, "pretrain_label": self._name(self.pretrain_labels, self.pretrain_class_names, i),
                 "queries_harmed": int(counts[i]), "total_harmful_score": float(d.positive_total[i]),
                 "mean_score": float(d.row_sum[i]) / self.k}
                for i in order[:limit]]

    def histogram(self, bins: int = 50) -> Dict[str, Any]:
        """Counts of all scores in ``bins`` equal bins (edges has ``bins + 1`` entries), with the moments and
        signs of all scores (``total``, ``positive``, ``negative``, ``sum``, ``sum_squares``, ``min``, ``max``)."""
        d = self.digest()
        lo, hi = d.low, d.high
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.zeros(bins, dtype=torch.float64)
        moments = torch.zeros(4, dtype=torch.float64)  # positive, negative, sum, sum of squares
        for _, rows in self._read("histogram"):
            rows = rows.double()
            counts += torch.histc(rows, bins=bins, min=lo, max=hi)
            moments += torch.stack([(rows > 0).sum(), (rows < 0).sum(), rows.sum(), rows.square().sum()]).double()
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        return {"counts": counts.tolist(), "edges": edges.tolist(), "total": self.n * self.k,
                "positive": int(moments[0]), "negative": int(moments[1]), "sum": float(moments[2]),
                "sum_squares": float(moments[3]), "min": d.low, "max": d.high}

    def summary(self) -> Dict[str, Any]:
        """Settings, convergence, timings and sizes of the run, flat for a run summary."""
        m = self.manifest or {}
        info = m.get("info", {}) or {}
        out: Dict[str, Any] = {"n_pretrain": self.n, "n_query": self.k}
        for key in ("mode", "alpha", "damping", "curvature", "solver", "hessian_samples", "world_size"):
            if key in m:
                out[key] = m[key]
        out["scoring"] = info.get("scoring")
        for stage, chosen in (info.get("curvature") or {}).items():  # what "auto" chose, per stage
            out[f"{stage}_curvature"] = chosen.get("name")
        for phase, secs in (info.get("seconds") or {}).items():
            out[f"seconds/{phase}"] = secs
        for name, solve in (info.get("solves") or {}).items():
            for key in ("solver", "iterations", "relative_residual", "converged", "negative_eigenvalues", "positive_definite",
                        "scale"):
                if key in solve:
                    out[f"{name}_solve/{key}"] = solve[key]
        if "peak_memory_mb" in info:
            out["peak_memory_mb"] = info["peak_memory_mb"]
        return out
