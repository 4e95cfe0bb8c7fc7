"""Data modules: batches are ``(images, labels)``; see `stacktrain.datamodules.base`."""

from .base import ImageDataModule, TensorImageDataset, image_transform
from .digits import DigitsDataModule, digits_splits
from .image_folder import ImageFolderDataModule
from .multiview import MultiViewDataModule
from .webdataset import WebDatasetDataModule, expand_shards

__all__ = [
    "ImageDataModule",
    "TensorImageDataset",
    "image_transform",
    "DigitsDataModule",
    "digits_splits",
    "ImageFolderDataModule",
    "MultiViewDataModule",
    "WebDatasetDataModule",
    "expand_shards",
]
from .shapes import SHAPES, ShapesDataModule, ShapesTextDataModule

__all__ += ["SHAPES", "ShapesDataModule", "ShapesTextDataModule"]
from .image_text import ImageTextWebDataModule

__all__ += ["ImageTextWebDataModule"]
from .cluttered import ClutteredDigitsDataModule

__all__ += ["ClutteredDigitsDataModule"]
