"""Progress of the long phases, shown by tqdm on rank 0 (on a terminal only), with a remaining-time estimate that
follows the work actually left.

- An iterative solve stops when its relative residual reaches ``tol``, long before its ``max_iter`` cap as a rule:
  ``ResidualProgress`` counts digits of residual gained, ``log10(1 / residual)`` out of ``log10(1 / tol)`` (it starts
  at 1: x = 0), so the estimate follows how fast the residual falls.
- A phase made of passes over the data (fitting a curvature, building an exact solve's dense matrix) shows
  ``PassProgress``: the examples of the current pass, numbered.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from tqdm.auto import tqdm


def new_bar(total: Optional[float], desc: str, unit: str) -> tqdm:
    """A bar that vanishes when done and stays silent off a terminal (``disable=None``)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)


class ResidualProgress:
    """An iterative solve's progress in digits of relative residual gained, out of the ``log10(1 / tol)`` needed."""

    def __init__(self, desc: str, tol: float):
        self.digits = max(-math.log10(tol), 1e-3)
        self.bar = new_bar(round(self.digits, 2), desc, "digit")

    def gained(self, residual: float) -> float:
        """Digits gained at ``residual`` (0 at 1 or above, all of them at ``tol`` or below)."""
        return min(self.digits, max(0.0, -math.log10(max(residual, 1e-300))))

    def residual(self, value: float, iterations: int) -> None:
        """Record the largest relative residual after ``iterations`` iterations (the bar never moves back)."""
        self.bar.n = round(max(self.bar.n, self.gained(value)), 2)
        self.bar.set_postfix(it=iterations, residual=f"{value:.2e}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class PassProgress:
    """Examples of each pass over the data of a phase whose number of passes is not known beforehand (none: no
    bar at all, e.g. a curvature that fits nothing)."""

    def __init__(self, desc: str):
        self.desc, self.passes = desc, 0
        self.bar: Optional[tqdm] = None

    def start_pass(self, examples: int) -> None:
        self.passes += 1
        desc = f"{self.desc}, pass {self.passes}"
        if self.bar is None:
            self.bar = new_bar(examples, desc, "ex")
        else:
            self.bar.reset(total=examples)
            self.bar.set_description(desc)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        closing(self.bar)


def closing(progress: Optional[Any]) -> None:
    """Close a bar if there is one."""
    if progress is not None:
        progress.close()
