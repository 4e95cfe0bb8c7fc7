"""The interface every stacktrain image data module keeps, and the transforms they share.

Batches are ``(images, labels)``: ``images`` a float32 tensor ``[B, C, H, W]``, normalized;
``labels`` an int64 tensor ``[B]``. Every data module exposes ``num_classes``, ``class_names`` and
``image_shape`` (C, H, W after transforms), which models use to check themselves before training.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import v2

from stacktrain.errors import StackError, require_number
from stacktrain.functional.seeding import mix_seed

__all__ = ["ImageDataModule", "TensorImageDataset", "EpochSampler", "SeededSamples", "image_transform",
           "stateful_train_loader"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(
    *,
    train: bool,
    image_size: int | None,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    flip: bool = True,
) -> v2.Compose:
    """PIL image or uint8 tensor -> normalized float tensor of ``channels`` x ``image_size``².

    Training augmentation (when ``augment``): random crop with 1/8 padding and, if ``flip``, a
    horizontal flip. Evaluation: resize only.
    """
    steps: list[Any] = [v2.ToImage()]
    steps.append(v2.Grayscale(num_output_channels=1) if channels == 1 else v2.RGB())
    if image_size is not None:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    if train and augment:
        if image_size is not None:
            steps.append(v2.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(_per_channel(mean, channels), _per_channel(std, channels))]
    return v2.Compose(steps)


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    values = list(values)
    if len(values) == channels:
        return values
    if channels == 1:
        return [sum(values) / len(values)]
    if len(values) == 1:
        return values * channels
    raise StackError(
        f"has {len(values)} values but the images have {channels} channels",
        source="data", key="mean/std", value=values, fix=f"give 1 or {channels} values",
    )


class TensorImageDataset(Dataset):
    """Images already in memory as a float tensor ``[N, C, H, W]``, with an optional per-sample
    tensor transform (augmentation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any = None) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class EpochSampler(DistributedSampler):
    """The training order as a function of (seed, epoch) only, split over DDP ranks (one rank when
    not distributed). It yields ``(epoch, index)`` so that `SeededSamples` can seed each sample's
    random augmentation. Being a ``DistributedSampler``, Lightning keeps it under DDP and calls its
    ``set_epoch``.

    Its state (the epoch and how far it got) travels with the ``StatefulDataLoader``'s: on resume
    Lightning rebuilds the loader's iterator *before* calling ``set_epoch``, so a sampler that did
    not carry its epoch would replay epoch 0's order in a later epoch. A run stopped on an epoch's
    last batch resumes with the next epoch from its start: the epoch is read when the first sample
    is drawn (after ``set_epoch`` when the loader has no workers), and a saved position that leaves
    no batch (``batch_size``, ``drop_incomplete_batch``, set by the loader's builder) means the
    epoch was over.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.yielded = 0
        self.batch_size = 1
        self.drop_incomplete_batch = False
        self._resume: tuple[int, int] | None = None

    def __iter__(self):
        resume, self._resume = self._resume, None
        return self._indices(resume)

    def _indices(self, resume: tuple[int, int] | None):
        epoch = self.epoch  # a generator: this runs when the first sample is drawn
        start = resume[1] if resume is not None and resume[0] == epoch else 0
        self.yielded = start
        for index in itertools.islice(super().__iter__(), start, None):
            self.yielded += 1
            yield (epoch, index)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "yielded": int(self.yielded)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, yielded = int(state_dict["epoch"]), int(state_dict["yielded"])
        remaining = self.num_samples - yielded
        if remaining <= 0 or (self.drop_incomplete_batch and remaining < self.batch_size):
            epoch, yielded = epoch + 1, 0
        self.epoch = epoch
        self._resume = (epoch, yielded)


class SeededSamples(Dataset):
    """Wraps a map-style dataset so that the random transforms of sample ``index`` in ``epoch`` draw
    from a generator seeded by (seed, epoch, index), not from the global one: augmentation is then
    the same whatever the number of workers, ranks or prefetched batches, and a resumed run sees
    exactly the samples the uninterrupted run saw."""

    def __init__(self, dataset: Dataset, seed: int, random: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.random = random

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        if not self.random:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]


def stateful_train_loader(
    dataset: Dataset, *, trainer: Any, batch_size: int, num_workers: int, seed: int, pin_memory: bool = False,
    collate_fn: Any = None, drop_incomplete_batch: bool | None = None,
) -> StatefulDataLoader:
    """The training loader of every stacktrain data module (one builder, so none of them forgets a part
    that exact resume needs): an `EpochSampler` split over the trainer's ranks that knows the batch
    size and whether an incomplete last batch is dropped (how it tells, on resume, that a saved
    position was an epoch's end), a ``StatefulDataLoader`` whose position Lightning checkpoints, and
    worker seeds from ``seed`` rather than from the global generator (see `ExactResume`).

    ``drop_incomplete_batch`` defaults to dropping it whenever each rank gets at least one full batch."""
    distributed = trainer is not None and trainer.world_size > 1
    sampler = EpochSampler(
        dataset, num_replicas=trainer.world_size if distributed else 1,
        rank=trainer.global_rank if distributed else 0, shuffle=True, seed=seed,
    )
    drop = len(sampler) >= batch_size if drop_incomplete_batch is None else bool(drop_incomplete_batch)
    sampler.batch_size, sampler.drop_incomplete_batch = batch_size, drop
    extra = {"collate_fn": collate_fn} if collate_fn is not None else {}
    return StatefulDataLoader(
        dataset, sampler=sampler, batch_size=batch_size, drop_last=drop, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed), **extra,
    )


class ImageDataModule(LightningDataModule):
    """Base of the image-classification data modules: argument checks and data loaders.

    Subclasses fill ``self.train_set``, ``self.val_set``, ``self.test_set`` in ``setup`` and set
    ``num_classes``, ``class_names`` and ``image_shape``.

    Training data is deterministic: its order depends on ``seed`` and the epoch only (`EpochSampler`,
    split over DDP ranks), random augmentation on (seed, epoch, sample) only (`SeededSamples`), and
    the training loader is a torchdata ``StatefulDataLoader`` whose position Lightning saves in checkpoints,
    so a run resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.
    Subclasses set ``random_transforms`` when their training transform is random.
    """

    random_transforms: bool = False

    def __init__(
        self, batch_size: int = 64, num_workers: int = 0, channels: int = 3, seed: int = 0, pin_memory: bool = False
    ) -> None:
        super().__init__()
        source = type(self).__name__
        if channels not in (1, 3):
            raise StackError("must be 1 or 3", source=source, key="data.init_args.channels", value=channels,
                             fix="use channels: 3 (RGB) or 1 (grayscale)")
        require_number(batch_size, "data.init_args.batch_size", source=source, low=1, integer=True,
                       fix="use a positive batch size such as 64")
        require_number(num_workers, "data.init_args.num_workers", source=source, low=0, integer=True,
                       fix="use 0 (load in the main process) or a positive number of workers")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.channels = channels
        self.seed = seed
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.num_classes: int | None = None
        self.class_names: list[str] = []
        self.image_shape: tuple[int, int, int] | None = None

    def _loader(self, dataset: Dataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise StackError(
                "has no data for this stage", source=type(self).__name__, fix="call setup() first or check the split"
            )
        common = dict(
            batch_size=self.batch_size, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )
        if not train:
            # A plain loader: every evaluation starts from the first batch. A stateful one would let
            # Lightning resume an evaluation cut short by limit_val_batches where it stopped.
            return DataLoader(dataset, shuffle=False, **common)
        return stateful_train_loader(
            SeededSamples(dataset, self.seed, self.random_transforms), trainer=self.trainer,
            batch_size=self.batch_size, num_workers=self.num_workers, seed=self.seed, pin_memory=self.pin_memory,
        )

    def use_training_samples(self, dataset: Dataset) -> None:
        """Train on ``dataset``, a view of the training split chosen by the model (e.g. few-shot
        samples), instead of the whole split; ``setup`` keeps it (stacktrain.stack.TrainingSamples)."""
        self.train_set = dataset

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
