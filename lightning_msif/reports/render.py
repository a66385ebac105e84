"""Examples as something to look at: images (PNG, upscaled so 8×8 digits are recognisable) or text."""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

from ..core.data import dataset_of

Rendered = Union[np.ndarray, str, None]
Renderer = Callable[[Any], Rendered]
"""``example -> image array ([H, W] or [H, W, 3]) | text | None``; the default handles common cases."""


def _input_of(example: Any) -> Any:
    if isinstance(example, (tuple, list)) and example:
        return example[0]
    if isinstance(example, dict):
        for key in ("image", "img", "pixel_values", "x", "input", "text"):
            if key in example:
                return example[key]
    return example


def default_render(example: Any) -> Rendered:
    """Images from image-shaped tensors (``[H, W]``, ``[C, H, W]``, or flat with a square length), text from strings."""
    x = _input_of(example)
    if isinstance(x, str):
        return x
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() and x.dtype != torch.uint8:
        return None
    x = x.detach().cpu().float()
    if x.dim() == 1:
        side = math.isqrt(x.numel())
        if side < 4 or side * side != x.numel():
            return None
        x = x.reshape(side, side)
    elif x.dim() == 3 and x.shape[0] in (1, 3):
        x = x.permute(1, 2, 0).squeeze(-1)
    elif x.dim() != 2:
        return None
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo if hi > lo else 1.0)).numpy()


def to_image(array: np.ndarray, size: int = 112) -> Image.Image:
    """A PIL image of ``array`` (floats in [0, 1] or uint8), its longer side scaled to ``size`` with sharp pixels."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
    img = Image.fromarray(a)
    scale = max(1, size // max(img.size))
    return img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)


def png_bytes(array: np.ndarray, size: int = 112) -> bytes:
    buf = io.BytesIO()
    to_image(array, size).save(buf, format="PNG")
    return buf.getvalue()


class ExampleViews:
    """Rendered pretraining and query examples, by dataset index (cached: tables repeat examples)."""

    def __init__(self, pretrain_data: Any = None, query_data: Any = None, render: Optional[Renderer] = None):
        self.datasets = {"pretrain": dataset_of(pretrain_data), "query": dataset_of(query_data)}
        self.render = render or default_render
        self._cache: dict = {}

    def get(self, which: str, index: int) -> Rendered:
        key = (which, index)
        if key not in self._cache:
            data = self.datasets[which]
            self._cache[key] = self.render(data[index]) if data is not None else None
        return self._cache[key]
