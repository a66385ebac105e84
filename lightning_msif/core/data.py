"""Examples addressed by dataset index, whatever loader the user passed.

A ``DataLoader`` over a map-style dataset is re-read *in index order* with its own ``collate_fn``
and batch size: its sampler (random or not) is not trusted, so row ``i`` of a score matrix is
always dataset index ``i``. Any other iterable of batches is read once and kept in memory, its
examples numbered in the order they came.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torch.utils.data._utils.collate import default_collate
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import MSIFError

DEFAULT_BATCH_SIZE = 64


def batch_size_of(batch: Any) -> int:
    """Leading dimension shared by the tensors of a batch."""
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not leaves:
        raise MSIFError(
            "A batch holds no tensor with a batch dimension. Batches must be tensors, or tuples/dicts "
            "of tensors whose first dimension indexes the examples."
        )
    return leaves[0].shape[0]


class _ExampleList(Dataset):
    """Examples cut out of materialised batches, in the order they were yielded."""

    def __init__(self, batches: Any):
        self.examples: List[Any] = []
        for batch in batches:
            for i in range(batch_size_of(batch)):
                self.examples.append(tree_map(lambda t, i=i: t[i] if isinstance(t, torch.Tensor) else t, batch))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Any:
        return self.examples[i]


class ExampleSource:
    """A dataset, a collate function and a batch size: batches of chosen indices, in order."""

    def __init__(self, data: Any, name: str, batch_size: Optional[int] = None):
        self.name = name
        collate: Callable = default_collate
        size = batch_size
        if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) and data.batch_sampler is not None:
            dataset, collate = data.dataset, data.collate_fn
            size = size or data.batch_size or (getattr(data.batch_sampler, "batch_size", None))
        elif isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
            dataset = data
        elif hasattr(data, "__iter__"):
            dataset = _ExampleList(data)
        else:
            raise MSIFError(
                f"{name} must be a DataLoader, a map-style Dataset or an iterable of batches, "
                f"got {type(data).__name__}."
            )
        self.dataset: Dataset = dataset
        self.collate = collate
        self.batch_size = int(size or DEFAULT_BATCH_SIZE)
        self.n = len(dataset)  # type: ignore[arg-type]
        if self.n == 0:
            raise MSIFError(f"{name} is empty (0 examples): pass data with at least one example.")

    def __len__(self) -> int:
        return self.n

    def batches(self, indices: Sequence[int], batch_size: Optional[int] = None) -> Iterator[Tuple[Any, torch.Tensor]]:
        """(batch, its dataset indices) over ``indices`` in the given order (default: the data's batch size)."""
        indices = list(indices)
        if not indices:
            return iter(())
        loader = DataLoader(
            Subset(self.dataset, indices), batch_size=batch_size or self.batch_size, shuffle=False, collate_fn=self.collate
        )
        idx = torch.as_tensor(indices)

        def gen() -> Iterator[Tuple[Any, torch.Tensor]]:
            start = 0
            for batch in loader:
                b = batch_size_of(batch)
                yield batch, idx[start : start + b]
                start += b

        return gen()


def dataset_of(data: Any) -> Any:
    """The dataset behind a DataLoader; anything else as it is (a ``Subset``'s ``.dataset`` is its parent)."""
    return data.dataset if isinstance(data, DataLoader) else data


def to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors to ``device``; floating tensors also take the model's floating dtype."""

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return tree_map(move, batch)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (tensors with a batch dimension are sliced)."""
    return tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)


def class_names_of(holder: Any) -> Optional[List[str]]:
    """``class_names`` of a datamodule, loader or dataset, if it has them (for the reports)."""
    for obj in (holder, dataset_of(holder)):
        names = getattr(obj, "class_names", None)
        if names is not None:
            return [str(n) for n in names]
    return None
