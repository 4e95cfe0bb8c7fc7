"""Technique callbacks and the `EfficiencyReport` they report to."""

from .efficiency import EfficiencyReport
from .resume import ExactResume
from .prune_regrow import PruneRegrow

__all__ = ["EfficiencyReport", "ExactResume"]
__all__ += ["PruneRegrow"]
