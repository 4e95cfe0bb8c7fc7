"""Technique callbacks and the `EfficiencyReport` they report to."""

from .efficiency import EfficiencyReport
from .resume import ExactResume
from .grad_quant import GradientQuantization

__all__ = ["EfficiencyReport", "ExactResume"]
__all__ += ["GradientQuantization"]
