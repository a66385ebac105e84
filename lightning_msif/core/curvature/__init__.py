"""Curvature plug-ins: the base class and registry, and the built-in curvatures (registered on import)."""
from . import hessian  # noqa: F401  (registers "hessian")
from .base import CURVATURES, Curvature, register_curvature
from .hessian import HessianCurvature

__all__ = ["CURVATURES", "Curvature", "HessianCurvature", "register_curvature"]
