"""A 2-D convolution's Kronecker statistics from its input as it is, without unfolding it into patches.

K-FAC's input factor of a convolution is the second moment of its input patches ``ã`` (``C·kh·kw`` numbers per
output position, a 1 appended with a bias), and EK-FAC rotates every patch into the factor's eigenbasis.
``F.unfold`` would copy the input ``kh·kw`` times and the product over the unfolded patches costs ``(C·kh·kw)²``
per position. Here, with a vertical stride of 1:

- ``patch_moment``: the input is unfolded along the width only (``kw`` copies), and patch rows ``i`` and
  ``i + m`` share all their products but a few edge rows, so one product per row lag ``m`` serves all ``kh - m``
  pairs of kernel rows at that lag; the edge rows a pair's window does not cover are subtracted (or, where
  they are the larger part, the window is summed directly). About ``kh``× fewer multiplications, exact.
- ``rotated_patches``: ``Q_Aᵀ ã`` at every position is the convolution of the input with ``Q_A``'s columns as
  filters (its last row as their bias), one convolution instead of unfold and product.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import kernel_rows, width_view


def bordered(moment: torch.Tensor, total: torch.Tensor, count: float) -> torch.Tensor:
    """``[[Σ a aᵀ, Σ a], [Σ aᵀ, count]]``: the second moment of ``a`` with a 1 appended, from its parts."""
    top = torch.cat([moment, total[:, None]], 1)
    return torch.cat([top, torch.cat([total, total.new_tensor([count])])[None]], 0)


def patch_moment(conv: nn.Conv2d, x: torch.Tensor, bias: bool, dtype: torch.dtype,
                 out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``Σ ã ãᵀ`` over every example and output position, ``[in', in']`` in ``dtype`` (products in ``x``'s
    precision), added into ``out`` when given (a running sum: each block of kernel-row pairs goes straight to its
    place, so the square is never assembled, permuted or copied); None where the vertical stride is not 1 (the
    caller unfolds)."""
    if conv.stride[0] != 1:
        return None
    b, c, h, w = x.shape
    (kh, kw), dh = conv.kernel_size, conv.dilation[0]
    h_out = h + 2 * conv.padding[0] - dh * (kh - 1)
    w_out = (w + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    y = width_view(conv, x, w_out).reshape(c * kw, h, b * w_out)
    windows = [(r, r + end - first) for first, end, r in kernel_rows(conv, h, h_out)]
    n = c * kh * kw
    size = n + int(bias)
    acc = torch.zeros(size, size, dtype=dtype, device=x.device) if out is None else out
    places = acc[:n, :n].view(c, kh, kw, c, kh, kw)  # [channel, kernel row, kernel column] on both sides

    def product(lo: int, hi: int, lag: int) -> torch.Tensor:
        rows = y[:, lo:hi].reshape(y.shape[0], -1)
        return (rows @ y[:, lo + lag:hi + lag].reshape(y.shape[0], -1).T).to(dtype)

    for m in range(kh):
        lag, end = m * dh, h - m * dh  # rows r whose partner r + lag exists
        full = None
        for i in range(kh - m):
            lo, hi = windows[i][0], min(windows[i][1], end)
            if hi <= lo:
                continue
            if lo + (end - hi) > hi - lo:  # the edge rows outnumber the window: sum it directly
                block = product(lo, hi, lag)
            else:
                full = product(0, end, lag) if full is None else full
                block = full - product(0, lo, lag) if lo else full
                block = block - product(hi, end, lag) if hi < end else block
            block = block.view(c, kw, c, kw)
            places[:, i, :, :, i + m, :] += block
            if m:
                places[:, i + m, :, :, i, :] += block.permute(2, 3, 0, 1)
    if bias:
        sums = y.sum(2, dtype=dtype)  # [C·kw, H]
        total = torch.stack([sums[:, lo:hi].sum(1) for lo, hi in windows]).view(kh, c, kw).transpose(0, 1).reshape(-1)
        acc[:n, n] += total
        acc[n, :n] += total
        acc[n, n] += float(b * h_out * w_out)
    return acc


def rotated_patches(conv: nn.Conv2d, x: torch.Tensor, q_a: torch.Tensor, bias: bool) -> torch.Tensor:
    """``[B, in', L]``: ``Q_Aᵀ ã`` at each of the ``L`` output positions, as one convolution of ``x``."""
    c, (kh, kw) = x.shape[1], conv.kernel_size
    q = q_a.to(x.dtype)
    weight = q[:c * kh * kw].T.reshape(-1, c, kh, kw)
    return F.conv2d(x, weight, q[-1] if bias else None, conv.stride, conv.padding, conv.dilation).flatten(2)
