"""`ImageFolderDataModule`: an ImageFolder tree, or CIFAR-10/100 from a local path (torchvision)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch.utils.data import Dataset, Subset

from stacktrain.errors import StackError, require_existing_path, require_number

from .base import IMAGENET_MEAN, IMAGENET_STD, ImageDataModule, image_transform

__all__ = ["ImageFolderDataModule", "CIFAR_STATS"]

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def _is_image(filename: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return filename.lower().endswith(IMG_EXTENSIONS)


def _split_dir(root: str, split: str) -> str | None:
    for name in _SPLIT_DIRS[split]:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def _seeded_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


class ImageFolderDataModule(ImageDataModule):
    """Images from a local folder, or CIFAR-10/100 through torchvision.

    ``dataset="imagefolder"``: ``root`` holds one folder per class, or ``train/``, ``val/`` (and
    optionally ``test/``) folders that each hold one folder per class. Without ``val/``, a seeded
    ``val_fraction`` of the training images is held out.

    ``dataset="cifar10"`` / ``"cifar100"``: ``root`` is the folder that contains (or will contain,
    with ``download=True``) torchvision's ``cifar-10-batches-py`` / ``cifar-100-python``. Validation
    is a seeded ``val_fraction`` of the training set (the official test set when 0); test is the
    official test set.

    Args:
        root: data folder.
        dataset: "imagefolder", "cifar10" or "cifar100".
        download: let torchvision download CIFAR into ``root`` (off by default: nothing is fetched
            unless asked).
        image_size: resize (shorter side) and center-crop to this size; None keeps the size.
        channels: 3 (RGB) or 1 (grayscale).
        mean, std: normalization; defaults: CIFAR statistics or ImageNet's.
        augment: random crop with padding and horizontal flip for training images.
    """

    def __init__(
        self,
        root: str,
        dataset: Literal["imagefolder", "cifar10", "cifar100"] = "imagefolder",
        download: bool = False,
        image_size: int | None = None,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, channels=channels, seed=seed)
        source = type(self).__name__
        if dataset not in ("imagefolder", "cifar10", "cifar100"):
            raise StackError("is not a known dataset", source=source, key="data.init_args.dataset", value=dataset,
                             fix="use 'imagefolder', 'cifar10' or 'cifar100'")
        if image_size is not None:
            require_number(image_size, "data.init_args.image_size", source=source, low=4, high=4096, integer=True)
        require_number(val_fraction, "data.init_args.val_fraction", source=source, low=0.0, high=0.9)
        self.root = os.fspath(root)
        self.dataset = dataset
        self.download = download
        self.image_size = image_size
        self.random_transforms = augment
        self.val_fraction = val_fraction
        self.augment = augment
        default_mean, default_std = CIFAR_STATS.get(dataset, (IMAGENET_MEAN, IMAGENET_STD))
        self.mean = tuple(mean) if mean is not None else default_mean
        self.std = tuple(std) if std is not None else default_std
        self._check_files()
        if dataset == "imagefolder":
            train_dir = _split_dir(self.root, "train") or self.root
            self.class_names = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
            if len(self.class_names) < 2:
                raise StackError(
                    "holds fewer than two class folders", source=source, key="data.init_args.root", value=train_dir,
                    fix="use one sub-folder per class (root/<class>/<image>), or root/train/<class>/<image>",
                )
        else:
            self.class_names = [str(i) for i in range(10 if dataset == "cifar10" else 100)]
        self.num_classes = len(self.class_names)
        side = image_size or (32 if dataset != "imagefolder" else None)
        self.image_shape = (channels, side, side) if side else None

    def _check_files(self) -> None:
        source = type(self).__name__
        if self.dataset == "imagefolder" or not self.download:
            require_existing_path(self.root, "data.init_args.root", source=source)
            if not os.path.isdir(self.root):
                raise StackError("is a file, not a folder", source=source, key="data.init_args.root", value=self.root,
                                 fix="point root at the folder of class sub-folders (root/<class>/<image>)")
        if self.dataset != "imagefolder" and not self.download:
            folder = os.path.join(self.root, _CIFAR_FOLDERS[self.dataset])
            if not os.path.isdir(folder):
                raise StackError(
                    f"has no {_CIFAR_FOLDERS[self.dataset]}/ folder", source=source, key="data.init_args.root",
                    value=self.root, fix="point root at the folder that contains it, or set data.init_args.download: true",
                )

    def _transform(self, train: bool):
        return image_transform(
            train=train, image_size=self.image_size, channels=self.channels, mean=self.mean, std=self.std,
            augment=self.augment,
        )

    def prepare_data(self) -> None:
        if self.dataset != "imagefolder" and self.download:
            self._cifar(train=True, transform=None, download=True)
            self._cifar(train=False, transform=None, download=True)

    def _cifar(self, *, train: bool, transform, download: bool = False) -> Dataset:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.dataset == "cifar10" else datasets.CIFAR100
        try:
            return cls(self.root, train=train, transform=transform, download=download)
        except RuntimeError as error:
            raise StackError(
                f"cannot be read: {error}", source=type(self).__name__, key="data.init_args.root", value=self.root,
                fix="re-download with data.init_args.download: true, or fix the files",
            ) from error

    def _folder(self, path: str, transform) -> Dataset:
        from torchvision.datasets import ImageFolder

        try:
            dataset = ImageFolder(path, transform=transform)
        except FileNotFoundError as error:  # torchvision: "Found no valid file for the classes ..."
            empty = [name for name in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, name))
                     and not any(_is_image(f) for _, _, files in os.walk(os.path.join(path, name)) for f in files)]
            raise StackError(
                f"has class folders without a single image: {', '.join(empty[:5]) or error}"
                f"{f' (+{len(empty) - 5} more)' if len(empty) > 5 else ''}",
                source=type(self).__name__, key="data.init_args.root", value=path,
                fix="put images (.jpg, .jpeg, .png, .bmp, .tif, .webp ...) in every class folder, or remove the empty ones",
            ) from None
        if dataset.classes != self.class_names:
            raise StackError(
                f"has classes {dataset.classes[:5]}... but the training folder has {self.class_names[:5]}...",
                source=type(self).__name__, key="data.init_args.root", value=path,
                fix="give every split the same class folders",
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_tf, eval_tf = self._transform(True), self._transform(False)
        if self.dataset == "imagefolder":
            train_dir = _split_dir(self.root, "train") or self.root
            val_dir, test_dir = _split_dir(self.root, "val"), _split_dir(self.root, "test")
            train_full, eval_full = self._folder(train_dir, train_tf), self._folder(train_dir, eval_tf)
            official_test = self._folder(test_dir, eval_tf) if test_dir else None
            official_val = self._folder(val_dir, eval_tf) if val_dir else None
        else:
            train_full, eval_full = self._cifar(train=True, transform=train_tf), self._cifar(train=True, transform=eval_tf)
            official_test, official_val = self._cifar(train=False, transform=eval_tf), None
        if official_val is None and self.val_fraction > 0:
            train_idx, val_idx = _seeded_split(len(train_full), self.val_fraction, self.seed)
            self.train_set, self.val_set = Subset(train_full, train_idx), Subset(eval_full, val_idx)
        else:
            self.train_set = train_full
            self.val_set = official_val if official_val is not None else official_test
        self.test_set = official_test if official_test is not None else self.val_set
        if self.val_set is None:
            raise StackError(
                "leaves no validation images", source=type(self).__name__, key="data.init_args.val_fraction",
                value=self.val_fraction, fix="add a val/ folder or set val_fraction above 0",
            )
