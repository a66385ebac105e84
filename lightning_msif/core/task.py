"""What a model predicts and how it is scored: the split curvatures other than the Hessian need.

The Hessian only needs a per-example loss. Gauss-Newton needs the model's outputs (logits) and the
loss as a function of them; the true Fisher needs labels sampled from the model's predictive
distribution. A ``Task`` gives all three; ``ClassificationTask`` (softmax cross-entropy) is the
default and reads ``(x, y, ...)`` batches and dict batches with ``labels`` (Hugging Face style, the
model output's ``.logits`` when it has one). Outputs may be ``[B, C]`` or per token ``[B, T, C]``
(labels ``[B, T]``, ``-100`` ignored, the example's loss summed over its tokens).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MSIFError

IGNORE_INDEX = -100


class Task(Protocol):
    """A model's outputs on a batch, the per-example loss of outputs, and labels drawn from the model."""

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Model outputs ``[B, ...]`` (logits), differentiable in the model's parameters."""

    def output_loss(self, outputs: torch.Tensor, batch: Any, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-example losses ``[B]`` of ``outputs`` against the batch's labels (or ``labels``, e.g. sampled)."""

    def sample_labels(self, outputs: torch.Tensor, batch: Any, uniforms: torch.Tensor) -> torch.Tensor:
        """Labels drawn from the model's predictive distribution at ``outputs`` (no gradient), by inverse CDF of
        ``uniforms`` (one per label, in [0, 1): the caller derives them from dataset indices, so a draw does not
        depend on batching or the number of processes)."""

    def with_labels(self, batch: Any, labels: torch.Tensor) -> Any:
        """``batch`` with its labels replaced by ``labels``."""


def _check_keywords(model: nn.Module, inputs: Dict[str, Any]) -> None:
    """A dict batch's inputs are passed as keywords: refuse a ``forward`` that does not take them, naming the fix."""
    try:
        inspect.signature(model.forward).bind(**inputs)
    except TypeError as err:
        raise MSIFError(
            f"The default loss calls {type(model).__name__}(**batch without 'labels') for dict batches, but its "
            f"forward{inspect.signature(model.forward)} does not take {sorted(inputs)} ({err}). Accept them as "
            "keywords (def forward(self, input_ids, attention_mask=None) or def forward(self, **inputs)), or give "
            "the module a per_example_loss(batch) -> Tensor[B]."
        ) from None


class ClassificationTask:
    """Softmax cross-entropy on logits: ``model(x)`` for tuple batches, ``model(**inputs)`` for dict batches."""

    def labels_of(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[1]
        if isinstance(batch, dict) and "labels" in batch:
            return batch["labels"]
        raise MSIFError(
            f"The default loss expects (x, y) batches or dict batches with 'labels'; this batch is a "
            f"{type(batch).__name__}. Pass loss_fn=lambda model, batch: <per-example losses, shape [B]> (and, for "
            "a Fisher or Gauss-Newton curvature, task=<a lightning_msif Task>)."
        )

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if isinstance(batch, (tuple, list)):
            out = model(batch[0])
        elif isinstance(batch, dict):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            _check_keywords(model, inputs)
            out = model(**inputs)
        else:
            self.labels_of(batch)  # raises with the layouts it reads
        logits = getattr(out, "logits", out)
        if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
            raise MSIFError(
                f"The model's output ({type(out).__name__}) holds no logits [B, C] or [B, T, C]: return them, "
                "or pass task=<a lightning_msif Task> that extracts them."
            )
        return logits

    def output_loss(self, outputs: torch.Tensor, batch: Any, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.labels_of(batch) if labels is None else labels
        if outputs.dim() == 2:
            return F.cross_entropy(outputs, y, reduction="none")
        flat = F.cross_entropy(outputs.flatten(0, -2), y.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        return flat.view(y.shape).flatten(1).sum(1)

    def sample_labels(self, outputs: torch.Tensor, batch: Any, uniforms: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(outputs.detach().double(), dim=-1).cumsum(-1)
        u = uniforms.to(cdf.device, cdf.dtype).reshape(cdf.shape[:-1]).unsqueeze(-1)
        draws = (cdf <= u).sum(-1).clamp_max(cdf.shape[-1] - 1)
        if outputs.dim() > 2:  # ignored positions stay ignored
            y = self.labels_of(batch)
            draws = torch.where(y == IGNORE_INDEX, y, draws)
        return draws.to(self.labels_of(batch).dtype)

    def with_labels(self, batch: Any, labels: torch.Tensor) -> Any:
        if isinstance(batch, (tuple, list)):
            return type(batch)([batch[0], labels, *batch[2:]]) if isinstance(batch, list) else (batch[0], labels, *batch[2:])
        return {**batch, "labels": labels}

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The per-example loss ``(model, batch) → [B]`` (a ``LossFn``)."""
        return self.output_loss(self.outputs(model, batch), batch)
