"""LightningModules: models that work with or without any technique attached."""

from .classifier import ImageClassifier
from .clip_pretrain import CLIPPretraining, pretrain_clip
from .contrastive import DINO, ContrastiveLearner, MoCoV3, SimCLR
from .early_exit import BoostedEarlyExit
from .prompt_tuning import PromptTunedCLIP

__all__ = [
    "ImageClassifier", "BoostedEarlyExit", "ContrastiveLearner", "SimCLR", "MoCoV3", "DINO",
    "CLIPPretraining", "pretrain_clip", "PromptTunedCLIP",
]
