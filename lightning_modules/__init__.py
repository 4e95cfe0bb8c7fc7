"""LightningModules: models that work with or without any technique attached."""

from .classifier import ImageClassifier
from .contrastive import DINO, ContrastiveLearner, MoCoV3, SimCLR
from .early_exit import BoostedEarlyExit

__all__ = ["ImageClassifier", "BoostedEarlyExit", "ContrastiveLearner", "SimCLR", "MoCoV3", "DINO"]
