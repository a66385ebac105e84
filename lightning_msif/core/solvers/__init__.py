"""Solver plug-ins: the base class and registry, and the built-in solvers (registered on import, in this order)."""
from . import exact  # noqa: F401, I001
from . import cg  # noqa: F401
from . import lissa  # noqa: F401
from . import direct  # noqa: F401
from . import block_cg  # noqa: F401
from .base import SOLVERS, Solver, register_solver, solve

__all__ = ["SOLVERS", "Solver", "register_solver", "solve"]
