"""LightningModules: models that work with or without any technique attached."""

from .classifier import ImageClassifier
from .contrastive import DINO, ContrastiveLearner, MoCoV3, SimCLR

__all__ = ["ImageClassifier", "ContrastiveLearner", "SimCLR", "MoCoV3", "DINO"]
