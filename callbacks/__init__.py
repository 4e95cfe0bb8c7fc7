"""Technique callbacks and the `EfficiencyReport` they report to."""

from .efficiency import EfficiencyReport
from .resume import ExactResume
from .token_dropout import TokenDropout

__all__ = ["EfficiencyReport", "ExactResume", "TokenDropout"]
