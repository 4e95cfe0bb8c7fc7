"""LightningModules: models that work with or without any technique attached."""

from .classifier import ImageClassifier
from .early_exit import BoostedEarlyExit

__all__ = ["ImageClassifier", "BoostedEarlyExit"]
