"""`MultiViewDataModule`: several augmented views of each training image, for self-supervised learning.

It wraps any stacktrain image data module (``base``) and changes only the *training* batches: they
become ``(views, labels)`` with ``views`` a list of ``[B, C, H, W]`` tensors (global views first, then
smaller local crops). Validation and test keep the ``(images, labels)`` contract and come as two
loaders: the training images without augmentation first (the feature bank of a k-NN evaluation), then
the validation (test) images. The views of a sample are drawn from a generator seeded by (seed, epoch,
sample), like every stacktrain augmentation, so runs resume exactly and DDP ranks agree on nothing
they should not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import v2

from stacktrain.errors import StackError, require_number

from .base import ImageDataModule, SeededSamples, stateful_train_loader

__all__ = ["MultiViewDataModule", "MultiViewDataset", "RandomIntensity", "RandomRotateShear", "ssl_view_transform"]


class RandomIntensity(torch.nn.Module):
    """Random contrast and brightness on a *normalized* tensor image: ``x * a + b`` with
    ``a ~ U(1 - strength, 1 + strength)`` and ``b ~ U(-strength, strength)`` (torchvision's ColorJitter
    clamps to [0, 1], which would destroy normalized images)."""

    def __init__(self, strength: float = 0.4) -> None:
        super().__init__()
        self.strength = strength

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.strength <= 0:
            return image
        contrast, brightness = (torch.rand(2) * 2 - 1) * self.strength
        return image * (1 + contrast) + brightness


class RandomRotateShear(torch.nn.Module):
    """A random rotation in ``[-degrees, degrees]`` and shear in ``[-shear, shear]`` of a *normalized*
    tensor image, filling the uncovered corners with the image's own minimum (its background): torchvision's
    ``RandomAffine`` fills with a constant, which on a normalized image is a grey frame around the
    digit that the network would learn to match across views."""

    def __init__(self, degrees: float = 0.0, shear: float = 0.0) -> None:
        super().__init__()
        self.degrees, self.shear = float(degrees), float(shear)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.degrees <= 0 and self.shear <= 0:
            return image
        angle, shear = ((torch.rand(2) * 2 - 1) * torch.tensor([self.degrees, self.shear])).tolist()
        # shifted so the background is 0: the zero padding of the bilinear resampling is then the
        # background too (a fill value alone leaves a grey rim where it blends with the padding)
        background = image.amin(dim=(-2, -1), keepdim=True)
        turned = v2.functional.affine(image - background, angle=angle, translate=[0, 0], scale=1.0,
                                      shear=[shear, 0.0], interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)
        return turned + background


def ssl_view_transform(
    size: int, *, crop_scale: Sequence[float] = (0.4, 1.0), intensity: float = 0.4, blur: float = 0.5,
    erase: float = 0.0, degrees: float = 0.0, shear: float = 0.0,
) -> v2.Compose:
    """One random view of a normalized tensor image, suited to small images: a random rotation by up to
    ``degrees`` and shear by up to ``shear`` (handwriting varies that way; off by default), a random
    resized crop to ``size`` (aspect 3/4..4/3), contrast/brightness jitter, a 3x3 Gaussian blur with
    probability ``blur``, and random erasing with probability ``erase``. No flips (they change digits)."""
    steps: list[Any] = [RandomRotateShear(degrees, shear)] if degrees > 0 or shear > 0 else []
    steps += [
        v2.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=(3 / 4, 4 / 3), antialias=True),
        RandomIntensity(intensity),
    ]
    if blur > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=blur))
    if erase > 0:
        steps.append(v2.RandomErasing(p=erase, scale=(0.02, 0.15), value=0.0))
    return v2.Compose(steps)


class MultiViewDataset(Dataset):
    """``dataset[i] = (image, label)`` -> ``([view_1, ..., view_n], label)``, one transform per view."""

    def __init__(self, dataset: Dataset, transforms: Sequence[Any]) -> None:
        self.dataset = dataset
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], Any]:
        image, label = self.dataset[index]
        return [transform(image) for transform in self.transforms], label


class MultiViewDataModule(LightningDataModule):
    """Training batches ``(views, labels)`` of ``global_views`` views at the image size and ``local_views``
    smaller crops (DINO's multi-crop) of every image of ``base``; see the module docstring.

    Args:
        base: the image data module to wrap (its own augmentation is best left off).
        global_views: views at full size (2 for SimCLR, MoCo v3, DINO).
        local_views: extra small crops (DINO multi-crop); 0 for none.
        local_size: side of the local crops (default: half the image size).
        crop_scale: area range of the global random resized crops.
        local_crop_scale: area range of the local crops.
        intensity: contrast/brightness jitter strength (normalized units).
        blur: probability of a 3x3 Gaussian blur.
        erase: probability of random erasing.
        degrees: largest random rotation of every view, in degrees (0: none).
        shear: largest random shear of every view, in degrees (0: none).
    """

    def __init__(
        self,
        base: ImageDataModule,
        global_views: int = 2,
        local_views: int = 0,
        local_size: int | None = None,
        crop_scale: tuple[float, float] = (0.4, 1.0),
        local_crop_scale: tuple[float, float] = (0.1, 0.4),
        intensity: float = 0.4,
        blur: float = 0.5,
        erase: float = 0.0,
        degrees: float = 0.0,
        shear: float = 0.0,
    ) -> None:
        super().__init__()
        source = type(self).__name__
        if not isinstance(base, ImageDataModule):
            raise StackError("must be a stacktrain image data module", source=source, key="data.init_args.base",
                             value=type(base).__name__, fix="wrap e.g. stacktrain.datamodules.DigitsDataModule")
        require_number(global_views, "data.init_args.global_views", source=source, low=1, integer=True)
        require_number(local_views, "data.init_args.local_views", source=source, low=0, integer=True)
        for key, pair in (("crop_scale", crop_scale), ("local_crop_scale", local_crop_scale)):
            if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= 1:
                raise StackError("must be (low, high) with 0 < low <= high <= 1", source=source,
                                 key=f"data.init_args.{key}", value=pair, fix="use e.g. [0.4, 1.0]")
        self.base = base
        self.global_views = int(global_views)
        self.local_views = int(local_views)
        self.crop_scale = tuple(crop_scale)
        self.local_crop_scale = tuple(local_crop_scale)
        for key, value in (("degrees", degrees), ("shear", shear)):
            require_number(value, f"data.init_args.{key}", source=source, low=0.0, high=90.0)
        self.intensity, self.blur, self.erase = float(intensity), float(blur), float(erase)
        self.degrees, self.shear = float(degrees), float(shear)
        self.num_classes = base.num_classes
        self.class_names = base.class_names
        self.image_shape = base.image_shape
        if local_size is not None:
            require_number(local_size, "data.init_args.local_size", source=source, low=1, integer=True)
        self._local_size = local_size
        self.batch_size = base.batch_size

    @property
    def local_size(self) -> int:
        """Side of the local crops: as given, else half the image size."""
        if self._local_size is not None:
            return int(self._local_size)
        if self.image_shape is None:
            raise StackError("is needed: the base data module does not say its image size",
                             source=type(self).__name__, key="data.init_args.local_size", value=None,
                             fix="set local_size, e.g. 8")
        return int(self.image_shape[-1]) // 2

    @property
    def num_views(self) -> int:
        return self.global_views + self.local_views

    @property
    def view_sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every training view, global views first."""
        if self.image_shape is None:
            return []
        height, width = self.image_shape[-2:]
        local = [(self.local_size, self.local_size)] * self.local_views
        return [(int(height), int(width))] * self.global_views + local

    def view_transforms(self) -> list[v2.Compose]:
        height = self.image_shape[-1] if self.image_shape is not None else None
        if height is None:
            raise StackError("does not know its image size", source=type(self).__name__, key="base.image_shape",
                             value=None, fix="use a base data module with image_size set")
        common = dict(intensity=self.intensity, blur=self.blur, erase=self.erase, degrees=self.degrees,
                      shear=self.shear)
        views = [ssl_view_transform(height, crop_scale=self.crop_scale, **common) for _ in range(self.global_views)]
        views += [ssl_view_transform(self.local_size, crop_scale=self.local_crop_scale, **common)
                  for _ in range(self.local_views)]
        return views

    # ------------------------------------------------------------------------------------ stages
    def prepare_data(self) -> None:
        self.base.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.base.trainer = self.trainer
        self.base.setup(stage)
        self.num_classes = self.base.num_classes
        self.class_names = self.base.class_names
        self.image_shape = self.base.image_shape

    def train_dataloader(self) -> StatefulDataLoader:
        base = self.base
        dataset = MultiViewDataset(base.train_set, self.view_transforms())  # type: ignore[arg-type]
        return stateful_train_loader(
            SeededSamples(dataset, base.seed, random=True), trainer=self.trainer, batch_size=base.batch_size,
            num_workers=base.num_workers, seed=base.seed, pin_memory=base.pin_memory,
        )

    def bank_dataloader(self) -> StatefulDataLoader:
        """The training images without views, in order: the k-NN feature bank."""
        return self.base._loader(self.base.train_set, train=False)

    def val_dataloader(self) -> list[StatefulDataLoader]:
        return [self.bank_dataloader(), self.base.val_dataloader()]

    def test_dataloader(self) -> list[StatefulDataLoader]:
        return [self.bank_dataloader(), self.base.test_dataloader()]

    def predict_dataloader(self) -> StatefulDataLoader:
        return self.base.predict_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
