"""What the reports say about examples: labels, the finetuned model's predictions, class names."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..core.data import ExampleSource, class_names_of, dataset_of, to_device  # class_names_of: re-exported
from ..core.objective import evaluation
from ..core.scoring import ScoreMatrix
from .attribution import Attribution


def labels_of(data: Any) -> Optional[torch.Tensor]:
    """Integer labels of ``(x, y, ...)`` examples in dataset order, or None when examples carry none."""
    dataset = dataset_of(data)
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) > 1 and not tensors[1].is_floating_point() and tensors[1].dim() == 1:
        return tensors[1].long()
    try:
        labels = []
        for i in range(len(dataset)):
            example = dataset[i]
            y = example[1] if isinstance(example, (tuple, list)) and len(example) > 1 else None
            y = int(y) if isinstance(y, int) or (isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point()) else None
            if y is None:
                return None
            labels.append(y)
        return torch.tensor(labels)
    except (TypeError, IndexError, KeyError):
        return None


@torch.no_grad()
def predictions_of(model: nn.Module, data: Any) -> Optional[torch.Tensor]:
    """``argmax model(x)`` for ``(x, y)`` examples in dataset order, or None when that does not apply."""
    source = ExampleSource(data, "query_data")
    p = next(model.parameters())
    out = []
    with evaluation(model):
        for batch, _ in source.batches(range(len(source))):
            if not isinstance(batch, (tuple, list)):
                return None
            logits = model(to_device(batch, p.device, p.dtype)[0])
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                return None
            out.append(logits.argmax(-1).cpu())
    return torch.cat(out)


def build_attribution(scores: Union[torch.Tensor, ScoreMatrix], pretrain_data: Any, query_data: Any,
                      finetune_model: Optional[nn.Module] = None,
                      manifest: Optional[dict] = None, pretrain_class_names: Optional[Sequence[str]] = None,
                      query_class_names: Optional[Sequence[str]] = None, progress: bool = False) -> Attribution:
    """An ``Attribution`` with whatever labels, predictions and names the data and model give."""
    return Attribution(
        scores=scores,
        pretrain_labels=labels_of(pretrain_data),
        query_labels=labels_of(query_data),
        query_predictions=predictions_of(finetune_model, query_data) if finetune_model is not None else None,
        pretrain_class_names=pretrain_class_names or class_names_of(pretrain_data),
        query_class_names=query_class_names or class_names_of(query_data),
        manifest=manifest or {},
        progress=progress,
    )
