"""The one reporting entry of the callback and the CLI: scores plus whatever data is at hand, to every sink."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from ..atomic import PathLike
from .attribution import Attribution
from .metadata import build_attribution
from .render import ExampleViews, Renderer
from .sinks import publish


def report_scores(scores: torch.Tensor, manifest: Dict[str, Any], out_dir: PathLike, *, pretrain_data: Any = None,
                  query_data: Any = None, finetune_model: Optional[nn.Module] = None,
                  pretrain_class_names: Optional[Sequence[str]] = None,
                  query_class_names: Optional[Sequence[str]] = None, render: Optional[Renderer] = None,
                  top_k: int = 10, loggers: Iterable[Any] = (), artifact_files: Iterable[PathLike] = (),
                  step: int = 0, max_queries: Optional[int] = None) -> Dict[str, Any]:
    """Build the attribution and example views, write the local report to ``out_dir`` and log to ``loggers``.

    Without data (e.g. the snapshots' modules cannot be imported) the tables come from the scores alone:
    no labels, predictions or pictures. Returns ``publish``'s record of where things went.
    """
    if pretrain_data is None and query_data is None:
        attr = Attribution(scores.detach().cpu(), manifest=manifest)
    else:
        attr = build_attribution(scores, pretrain_data, query_data, finetune_model, manifest,
                                 pretrain_class_names, query_class_names)
    views = ExampleViews(pretrain_data, query_data, render)
    return publish(attr, views, out_dir, top_k, loggers, artifact_files, step, max_queries)
