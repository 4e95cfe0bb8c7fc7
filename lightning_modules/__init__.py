"""LightningModules: models that work with or without any technique attached."""

from .classifier import ImageClassifier

__all__ = ["ImageClassifier"]
