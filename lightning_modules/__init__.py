"""LightningModules: models that work with or without any technique attached."""

from .classifier import ImageClassifier

__all__ = ["ImageClassifier"]
from .clip_pretrain import CLIPPretraining, pretrain_clip

__all__ += ["CLIPPretraining", "pretrain_clip"]
from .prompt_tuning import PromptTunedCLIP

__all__ += ["PromptTunedCLIP"]
