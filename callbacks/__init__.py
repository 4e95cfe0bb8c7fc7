"""Technique callbacks and the `EfficiencyReport` they report to."""

from .efficiency import EfficiencyReport

__all__ = ["EfficiencyReport"]
