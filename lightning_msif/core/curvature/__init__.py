"""Curvature plug-ins: the base class and registry, and the built-in curvatures (registered on import)."""
from . import hessian  # noqa: F401, I001  (registers "hessian")
from . import kfac  # noqa: F401  (registers "ekfac", "kfac")
from . import ggn  # noqa: F401  (registers "ggn")
from .base import CURVATURES, Curvature, register_curvature
from .ggn import GaussNewtonCurvature
from .hessian import HessianCurvature
from .kfac import EKFACCurvature, KFACCurvature

__all__ = ["CURVATURES", "Curvature", "EKFACCurvature", "GaussNewtonCurvature", "HessianCurvature", "KFACCurvature",
           "register_curvature"]
