"""What a model predicts and how it is scored: the split curvatures other than the Hessian need.

The Hessian only needs a per-example loss. Gauss-Newton needs the model's outputs (logits) and the
loss as a function of them; the true Fisher needs labels sampled from the model's predictive
distribution. A ``Task`` gives all three; ``ClassificationTask`` (softmax cross-entropy) is the
default and reads ``(x, y, ...)`` batches and dict batches with ``labels`` (Hugging Face style, the
model output's ``.logits`` when it has one). Outputs may be ``[B, C]`` or per token ``[B, T, C]``
(labels ``[B, T]``, ``-100`` ignored, the example's loss summed over its tokens).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

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

    def sample_labels(self, outputs: torch.Tensor, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Labels drawn from the model's predictive distribution at ``outputs`` (no gradient)."""


class ClassificationTask:
    """Softmax cross-entropy on logits: ``model(x)`` for tuple batches, ``model(**inputs)`` for dict batches."""

    def labels_of(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[1]
        if isinstance(batch, dict) and "labels" in batch:
            return batch["labels"]
        raise MSIFError(
            f"The default task expects (x, y) batches or dict batches with 'labels'; this batch is a "
            f"{type(batch).__name__}. Pass task=<a lightning_msif Task> (outputs, output_loss, sample_labels) "
            "for another layout."
        )

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if isinstance(batch, (tuple, list)):
            out = model(batch[0])
        elif isinstance(batch, dict):
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
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

    def sample_labels(self, outputs: torch.Tensor, batch: Any, generator: torch.Generator) -> torch.Tensor:
        probs = torch.softmax(outputs.detach().double(), dim=-1)
        flat = probs.flatten(0, -2)
        draws = torch.multinomial(flat.cpu(), 1, generator=generator).view(probs.shape[:-1]).to(outputs.device)
        if outputs.dim() > 2:  # ignored positions stay ignored
            y = self.labels_of(batch)
            draws = torch.where(y == IGNORE_INDEX, y, draws)
        return draws

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The per-example loss ``(model, batch) → [B]`` (a ``LossFn``)."""
        return self.output_loss(self.outputs(model, batch), batch)
