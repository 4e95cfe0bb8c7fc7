"""`DigitsDataModule`: scikit-learn's bundled 8x8 digits (1,797 real images), no download needed."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from stacktrain.errors import StackError, require_number

from .base import ImageDataModule, TensorImageDataset

__all__ = ["DigitsDataModule", "digits_splits", "DIGIT_NAMES"]

DIGIT_NAMES = [str(i) for i in range(10)]


def digits_splits(
    val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits split into train/val/test, stratified by class and fixed by ``seed``.

    Returns ``{split: (images, labels)}`` with ``images`` uint8 ``[N, 8, 8]`` in 0..255.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    held_out = val_fraction + test_fraction
    train_idx, rest_idx = train_test_split(index, test_size=held_out, stratify=labels, random_state=seed)
    if test_fraction > 0 and val_fraction > 0:
        val_idx, test_idx = train_test_split(
            rest_idx, test_size=test_fraction / held_out, stratify=labels[rest_idx], random_state=seed
        )
    elif val_fraction > 0:
        val_idx, test_idx = rest_idx, rest_idx[:0]
    else:
        val_idx, test_idx = rest_idx[:0], rest_idx
    return {
        "train": (images[np.sort(train_idx)], labels[np.sort(train_idx)]),
        "val": (images[np.sort(val_idx)], labels[np.sort(val_idx)]),
        "test": (images[np.sort(test_idx)], labels[np.sort(test_idx)]),
    }


class DigitsDataModule(ImageDataModule):
    """The scikit-learn digits, resized to ``image_size`` with 1 or 3 channels; the embedded default
    data set of stacktrain, so every command runs with no download.

    The split is stratified and fixed by ``seed`` (default 1,257 / 270 / 270 images). Images are
    scaled to [0, 1], resized (bilinear) and normalized with the training split's mean and std.

    Args:
        image_size: side of the square images (8 is the original resolution).
        channels: 1 (grayscale) or 3 (the gray value repeated).
        batch_size: samples per batch and per process.
        num_workers: data-loader worker processes.
        val_fraction: fraction of the 1,797 images held out for validation.
        test_fraction: fraction held out for testing.
        seed: seed of the split and of the training order.
        augment: random affine jitter (rotation, shift, scale) of training images.
    """

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, channels=channels, seed=seed)
        source = type(self).__name__
        require_number(image_size, "data.init_args.image_size", source=source, low=4, high=512, integer=True)
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            require_number(value, f"data.init_args.{key}", source=source, low=0.0, high=0.5)
        if val_fraction + test_fraction <= 0:
            raise StackError("leave no validation or test images", source=source,
                             key="data.init_args.val_fraction+test_fraction", value=val_fraction + test_fraction,
                             fix="hold out some images, e.g. val_fraction: 0.15")
        self.image_size = image_size
        self.random_transforms = augment
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.augment = augment
        self.num_classes = 10
        self.class_names = list(DIGIT_NAMES)
        self.image_shape = (channels, image_size, image_size)
        self.mean: float | None = None
        self.std: float | None = None

    def _to_tensor(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
        if self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = digits_splits(self.val_fraction, self.test_fraction, self.seed)
        tensors = {name: (self._to_tensor(images), torch.from_numpy(labels)) for name, (images, labels) in splits.items()}
        train_images = tensors["train"][0]
        self.mean = float(train_images.mean())
        self.std = float(train_images.std())
        augment = None
        if self.augment:
            # fill with the normalized background value (0 before normalization)
            augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=-self.mean / self.std)
        datasets = {}
        for name, (images, labels) in tensors.items():
            images = ((images - self.mean) / self.std).expand(-1, self.channels, -1, -1).contiguous()
            datasets[name] = TensorImageDataset(images, labels, augment if name == "train" else None)
        self.train_set, self.val_set, self.test_set = datasets["train"], datasets["val"], datasets["test"]
        if len(self.test_set) == 0:
            self.test_set = self.val_set
        if len(self.val_set) == 0:
            self.val_set = self.test_set
