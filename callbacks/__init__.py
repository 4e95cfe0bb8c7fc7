"""Technique callbacks and the `EfficiencyReport` they report to."""

from .efficiency import EfficiencyReport
from .grad_quant import GradientQuantization
from .prune_regrow import PruneRegrow
from .resume import ExactResume
from .token_dropout import TokenDropout

__all__ = ["EfficiencyReport", "ExactResume", "GradientQuantization", "PruneRegrow", "TokenDropout"]

from .nonfinite_guard import NonFiniteGuard

__all__ += ["NonFiniteGuard"]

from .progress import ProgressLog
from .run_guard import RunGuard

__all__ += ["ProgressLog", "RunGuard"]
