"""The one reporting entry of the callback and the CLI: scores plus whatever data is at hand, to every sink."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from ..atomic import PathLike
from ..core.data import dataset_of
from ..errors import MSIFError
from .attribution import Attribution
from .html import MAX_QUERIES, check_page_options
from .metadata import build_attribution
from .render import ExampleViews, Renderer
from .sinks import publish


def check_report_inputs(scores: torch.Tensor, pretrain_data: Any, query_data: Any) -> None:
    """The score matrix is ``[n_pretrain, n_query]`` of finite values, and the data (when given) has those sizes."""
    if scores.dim() != 2 or 0 in scores.shape:
        raise MSIFError(f"The scores have shape {tuple(scores.shape)}; a report needs a [n_pretrain, n_query] "
                        "matrix with both sizes ≥ 1: score again (msif score) before reporting.")
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        raise MSIFError(f"The scores hold {len(bad)} non-finite values, the first at pretraining example {i}, query "
                        f"{j}: score again with more damping before reporting.")
    for what, data, n in (("pretraining", pretrain_data, scores.shape[0]), ("query", query_data, scores.shape[1])):
        size = len(dataset_of(data)) if data is not None and hasattr(dataset_of(data), "__len__") else n
        if size != n:
            raise MSIFError(f"The {what} data has {size} examples but the scores have {n} {what} rows/columns: "
                            "report with the data the scores were computed on.")


def report_scores(scores: torch.Tensor, manifest: Dict[str, Any], out_dir: PathLike, *, pretrain_data: Any = None,
                  query_data: Any = None, finetune_model: Optional[nn.Module] = None,
                  pretrain_class_names: Optional[Sequence[str]] = None,
                  query_class_names: Optional[Sequence[str]] = None, render: Optional[Renderer] = None,
                  top_k: int = 10, loggers: Iterable[Any] = (), artifact_files: Iterable[PathLike] = (),
                  step: int = 0, max_queries: Optional[int] = None) -> Dict[str, Any]:
    """Build the attribution and example views, write the local report to ``out_dir`` and log to ``loggers``.

    Without data (e.g. the snapshots' modules cannot be imported) the tables come from the scores alone:
    no labels, predictions or pictures. Returns ``publish``'s record of where things went. Every option and
    input is checked before anything is written, so a refused report leaves the previous one as it was.
    """
    check_page_options(top_k, MAX_QUERIES if max_queries is None else max_queries)
    check_report_inputs(scores, pretrain_data, query_data)
    if pretrain_data is None and query_data is None:
        attr = Attribution(scores.detach().cpu(), manifest=manifest)
    else:
        attr = build_attribution(scores, pretrain_data, query_data, finetune_model, manifest,
                                 pretrain_class_names, query_class_names)
    views = ExampleViews(pretrain_data, query_data, render)
    return publish(attr, views, out_dir, top_k, loggers, artifact_files, step, max_queries)
