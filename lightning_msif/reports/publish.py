"""The one reporting entry of the callback and the CLI: scores plus whatever data is at hand, to every sink."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..atomic import PathLike
from ..core.data import dataset_of
from ..core.scoring import ScoreMatrix
from ..errors import MSIFError
from .attribution import Attribution
from .html import MAX_QUERIES, check_page_options
from .metadata import build_attribution
from .render import ExampleViews, Renderer
from .sinks import publish


def check_report_inputs(scores: Union[torch.Tensor, ScoreMatrix], pretrain_data: Any, query_data: Any) -> None:
    """The score matrix is ``[n_pretrain, n_query]`` with both sizes ≥ 1, and the data (when given) has those
    sizes (finite values are checked by the attribution's pass over the scores)."""
    shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else (scores.n, scores.k)
    if len(shape) != 2 or 0 in shape:
        raise MSIFError(f"The scores have shape {shape}; a report needs a [n_pretrain, n_query] "
                        "matrix with both sizes ≥ 1: score again (msif score) before reporting.")
    for what, data, n in (("pretraining", pretrain_data, shape[0]), ("query", query_data, shape[1])):
        size = len(dataset_of(data)) if data is not None and hasattr(dataset_of(data), "__len__") else n
        if size != n:
            raise MSIFError(f"The {what} data has {size} examples but the scores have {n} {what} rows/columns: "
                            "report with the data the scores were computed on.")


def report_scores(scores: Union[torch.Tensor, ScoreMatrix], manifest: Dict[str, Any], out_dir: PathLike, *,
                  pretrain_data: Any = None,
                  query_data: Any = None, finetune_model: Optional[nn.Module] = None,
                  pretrain_class_names: Optional[Sequence[str]] = None,
                  query_class_names: Optional[Sequence[str]] = None, render: Optional[Renderer] = None,
                  top_k: int = 10, loggers: Iterable[Any] = (), artifact_files: Iterable[PathLike] = (),
                  step: int = 0, max_queries: Optional[int] = None, progress: bool = False) -> Dict[str, Any]:
    """Build the attribution and example views, write the local report to ``out_dir`` and log to ``loggers``.

    ``scores``: the matrix, or a ``ScoreMatrix`` read block by block (a streamed one is never held whole);
    ``progress``: a bar over the rows of each pass over it.
    Without data (e.g. the snapshots' modules cannot be imported) the tables come from the scores alone:
    no labels, predictions or pictures. Returns ``publish``'s record of where things went. Every option and
    input is checked before anything is written, so a refused report leaves the previous one as it was.
    """
    check_page_options(top_k, MAX_QUERIES if max_queries is None else max_queries)
    check_report_inputs(scores, pretrain_data, query_data)
    if pretrain_data is None and query_data is None:
        attr = Attribution(scores, manifest=manifest, progress=progress)
    else:
        attr = build_attribution(scores, pretrain_data, query_data, finetune_model, manifest,
                                 pretrain_class_names, query_class_names, progress)
    attr.digest(top_k)  # the pass over the scores, which refuses non-finite ones, before anything is written
    views = ExampleViews(pretrain_data, query_data, render)
    return publish(attr, views, out_dir, top_k, loggers, artifact_files, step, max_queries)
