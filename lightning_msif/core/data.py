"""Examples addressed by dataset index, whatever loader the user passed.

A ``DataLoader`` over a map-style dataset is re-read *in index order* with its own ``collate_fn``
and batch size, so row ``i`` of a score matrix is always dataset index ``i``; its sampler may shuffle
but must visit every example once (one that subsets or repeats examples is refused: the model did not
train on the dataset the rows would stand for). ``batch_size=None`` (items one at a time) is read like an
iterable, in index order. Any other iterable (a list, a generator) is read once and kept in
memory, its examples numbered in the order they came: an item whose tensors share a leading dimension is
a batch and is cut into examples; an item with a 0-d tensor or a Python number (a label), or tensors of
different lengths, is one example.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler, Subset, SubsetRandomSampler)
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


def is_batch(item: Any) -> bool:
    """Whether ``item`` is a batch: its tensors share a leading dimension, and no leaf is a 0-d tensor or a Python
    number (an example's label). Other leaves (strings) do not decide."""
    leaves = tree_flatten(item)[0]
    sizes = {t.shape[0] if t.dim() > 0 else None for t in leaves if isinstance(t, torch.Tensor)}
    numbers = any(isinstance(t, (int, float)) for t in leaves)
    return len(sizes) == 1 and None not in sizes and not numbers


class _ExampleList(Dataset):
    """Examples of an iterable of batches or of examples (see ``is_batch``), in the order they were yielded."""

    def __init__(self, items: Any):
        self.examples: List[Any] = []
        for item in items:
            if not is_batch(item):
                self.examples.append(item)
                continue
            for i in range(batch_size_of(item)):
                self.examples.append(tree_map(lambda t, i=i: t[i] if isinstance(t, torch.Tensor) else t, item))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Any:
        return self.examples[i]


def _sampler_of(loader: DataLoader) -> Any:
    """What picks a loader's examples: its batch sampler when it is a custom one, else its sampler."""
    custom = loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler
    return loader.batch_sampler if custom else loader.sampler


def _visited(sampler: Any, n: int) -> Optional[List[int]]:
    """The dataset indices ``sampler`` draws in one epoch, or None where it is a permutation of all ``n`` by
    construction. An unknown sampler is drawn once, with the global random state restored (no side effect)."""
    if isinstance(sampler, SequentialSampler) and len(sampler) == n:
        return None
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == n:
        return None
    if isinstance(sampler, DistributedSampler):  # each rank's share of a shuffled whole (Lightning's DDP loaders)
        inner = getattr(sampler.dataset, "_sampler", None)  # Lightning's wrapper around a user's sampler
        return _visited(inner, n) if inner is not None else (None if len(sampler.dataset) == n else [])
    if isinstance(sampler, SubsetRandomSampler):
        return [int(i) for i in sampler.indices]
    with torch.random.fork_rng(devices=[]):
        drawn = list(iter(sampler))
    return [int(i) for item in drawn for i in (item if isinstance(item, (list, tuple, torch.Tensor)) else [item])]


def check_sampler(loader: DataLoader, n: int, name: str) -> None:
    """Refuse a loader whose sampler does not visit each of the dataset's ``n`` examples exactly once: the model
    trained on what it drew, and the scores would stand for every dataset index."""
    sampler = _sampler_of(loader)
    drawn = _visited(sampler, n)
    if drawn is None or sorted(drawn) == list(range(n)):
        return
    distinct = len(set(drawn))
    repeats = f", {len(drawn) - distinct} of its draws repeat an example" if len(drawn) > distinct else ""
    raise MSIFError(
        f"{name} is a DataLoader whose {type(sampler).__name__} visits {distinct} of the {n} examples of its "
        f"dataset{repeats}, but influence is computed over the whole dataset, one row per dataset index. Pass the "
        "examples the model trained on as the dataset itself, e.g. DataLoader(Subset(dataset, indices), "
        "batch_size=...) (row i is then indices[i]), with a sequential or shuffled sampler."
    )


def _signature(example: Any) -> Tuple[Any, ...]:
    """Each leaf's shape (a tensor) or type (anything else): examples that can be stacked share it."""
    return tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in tree_flatten(example)[0])


class ExampleSource:
    """A dataset, a collate function and a batch size: batches of chosen indices, in order."""

    def __init__(self, data: Any, name: str, batch_size: Optional[int] = None):
        self.name = name
        collate: Callable = default_collate
        size = batch_size
        if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
            dataset = data.dataset
            check_sampler(data, len(dataset), name)
            if data.batch_sampler is not None:
                collate = data.collate_fn
                size = size or data.batch_size or (getattr(data.batch_sampler, "batch_size", None))
            else:  # batch_size=None: its items, examples or whole batches, in index order
                dataset = _ExampleList(data.collate_fn(dataset[i]) for i in range(len(dataset)))
        elif isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
            dataset = data
        elif hasattr(data, "__iter__"):
            dataset = _ExampleList(data)
        else:
            raise MSIFError(
                f"{name} must be a DataLoader, a map-style Dataset or an iterable of batches or examples, "
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
        size = batch_size or self.batch_size
        loader = DataLoader(Subset(self.dataset, indices), batch_size=size, shuffle=False, collate_fn=self.collate)
        idx = torch.as_tensor(indices)

        def gen() -> Iterator[Tuple[Any, torch.Tensor]]:
            start, batches = 0, iter(loader)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except MSIFError:
                    raise
                except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as err:
                    raise self.unreadable(indices[start : start + size], err) from err
                b = batch_size_of(batch)
                yield batch, idx[start : start + b]
                start += b

        return gen()

    def unreadable(self, indices: Sequence[int], err: BaseException) -> MSIFError:
        """The error of a batch that could not be read or collated: the examples unlike the first, by index."""
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__
        shapes = {}
        for i in indices:
            try:
                shapes[i] = _signature(self.dataset[i])
            except Exception as inner:  # the dataset itself fails on this example
                return MSIFError(f"{self.name}: reading the example at dataset index {i} failed "
                                 f"({type(inner).__name__}: {inner}). Check that example and __getitem__.")
        first = indices[0]
        odd = [i for i in indices if shapes[i] != shapes[first]]
        if odd:
            return MSIFError(
                f"{self.name}: the example at dataset index {odd[0]} has shapes {list(shapes[odd[0]])} but the one at "
                f"index {first} {list(shapes[first])}, so they cannot form one batch ({reason}); other such indices: "
                f"{odd[1:6]}. Give every example one shape (pad or crop), or pass a DataLoader whose collate_fn pads."
            )
        return MSIFError(f"{self.name}: the batch of dataset indices {list(indices)[:8]} could not be collated "
                         f"({reason}). Check those examples and the DataLoader's collate_fn.")


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
