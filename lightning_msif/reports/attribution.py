"""The views a person looks at, computed from a score matrix and the examples' metadata.

Signs follow docs/math.md: a positive score is *harmful* (upweighting the pretraining example raises
the query's loss), a negative one *helpful*; removing example ``i`` changes the query loss by about
``−S[i, j] / n``. Everything here is plain data (lists of dicts, tensors): the sinks render it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

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
class Attribution:
    """A score matrix ``[n_pretrain, n_query]`` with what is known about its rows and columns."""

    scores: torch.Tensor
    pretrain_labels: Optional[torch.Tensor] = None  # [n] class ids
    query_labels: Optional[torch.Tensor] = None  # [k] class ids
    query_predictions: Optional[torch.Tensor] = None  # [k] the finetuned model's predicted class
    pretrain_class_names: Optional[Sequence[str]] = None
    query_class_names: Optional[Sequence[str]] = None
    manifest: Dict[str, Any] = field(default_factory=dict)  # how the scores were computed

    @property
    def n(self) -> int:
        return self.scores.shape[0]

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def _name(self, labels: Optional[torch.Tensor], names: Optional[Sequence[str]], i: int) -> Any:
        if labels is None:
            return None
        c = int(labels[i])
        return names[c] if names is not None and 0 <= c < len(names) else c

    def top_k(self, k: int) -> List[Dict[str, Any]]:
        """One row per (query, side, rank): the ``k`` most helpful and ``k`` most harmful pretraining examples."""
        k = min(k, self.n)
        rows = []
        for j in range(self.k):
            col = self.scores[:, j]
            for side, order in (("helpful", torch.argsort(col)), ("harmful", torch.argsort(col, descending=True))):
                for rank, i in enumerate(order[:k].tolist(), start=1):
                    s = float(col[i])
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
        onehot_p = torch.nn.functional.one_hot(pl, cp).to(self.scores.dtype)  # [n, cp]
        onehot_q = torch.nn.functional.one_hot(ql, cq).to(self.scores.dtype)  # [k, cq]
        total = onehot_p.T @ self.scores @ onehot_q
        count = onehot_p.sum(0)[:, None] * onehot_q.sum(0)[None, :]
        mean = total / count.clamp_min(1)
        names = lambda n, c: [str(n[i]) if n is not None and i < len(n) else str(i) for i in range(c)]
        return {"mean": mean, "total": total, "pretrain_classes": names(self.pretrain_class_names, cp),
                "query_classes": names(self.query_class_names, cq)}

    def most_harmful(self, k: int, limit: int = 50) -> List[Dict[str, Any]]:
        """Pretraining examples in the most queries' top-``k`` harmful lists (removal candidates)."""
        k = min(k, self.n)
        top = torch.topk(self.scores, k, dim=0).indices  # [k, n_query]
        harmful = torch.gather(self.scores, 0, top) > 0
        counts = torch.bincount(top[harmful].flatten(), minlength=self.n)
        total = self.scores.clamp_min(0).sum(1)
        order = sorted(range(self.n), key=lambda i: (-int(counts[i]), -float(total[i])))
        return [{"pretrain_index": i, "pretrain_label": self._name(self.pretrain_labels, self.pretrain_class_names, i),
                 "queries_harmed": int(counts[i]), "total_harmful_score": float(total[i]),
                 "mean_score": float(self.scores[i].mean())}
                for i in order[:limit] if counts[i] > 0]

    def histogram(self, bins: int = 50) -> Dict[str, List[float]]:
        """Counts of all scores in ``bins`` equal bins (edges has ``bins + 1`` entries)."""
        s = self.scores.double().flatten()
        lo, hi = float(s.min()), float(s.max())
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.histc(s, bins=bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        return {"counts": counts.tolist(), "edges": edges.tolist()}

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
