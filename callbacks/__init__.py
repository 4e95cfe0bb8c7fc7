"""Technique callbacks and the `EfficiencyReport` they report to."""

from .efficiency import EfficiencyReport
from .resume import ExactResume

__all__ = ["EfficiencyReport", "ExactResume"]
