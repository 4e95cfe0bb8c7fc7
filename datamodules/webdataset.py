"""`WebDatasetDataModule`: image + class samples from WebDataset ``.tar`` shards, local or remote.

Splitting under DDP (rank r of W, data-loader worker k of K):

* training: each epoch the shard list is shuffled with ``seed + epoch`` (the same order on every
  rank), rank r takes shards ``r::W`` and worker k takes ``k::K`` of those. Every worker then yields
  exactly ``epoch_length / W / K`` samples (rounded down to whole batches), cycling over its shards
  if it runs out, so every rank takes the same number of steps and DDP never waits on a rank that
  ran dry. Training therefore needs at least ``W * K`` shards.
* validation and test: workers split the shards, ranks split the samples (sample i goes to rank
  ``i % W``), so every rank gets data even from a single shard.

Unreadable samples and shards (a truncated or corrupt tar) are skipped with a warning and counted
in ``skipped`` instead of stopping the run.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stacktrain.errors import StackError, require_number

from .base import ImageDataModule, image_transform

__all__ = ["WebDatasetDataModule", "ShardStream", "assign_shards", "expand_shards", "METADATA_FILE"]

#: Written by ``make_shards`` next to the shards: classes, image size, statistics, sample counts.
METADATA_FILE = "dataset.json"
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _is_local(url: str) -> bool:
    return not _REMOTE.match(url) or url.startswith("file:")


def expand_shards(pattern: str, *, key: str, source: str = "WebDatasetDataModule") -> list[str]:
    """Expand a shard pattern (brace notation ``train-{000..009}.tar``, globs, several patterns
    joined by ``::``) into a list of URLs. Local files must exist; remote URLs are kept as given."""
    import webdataset as wds

    urls: list[str] = []
    for url in wds.shardlists.expand_urls(pattern):
        if _is_local(url):
            path = url[len("file:"):] if url.startswith("file:") else url
            matches = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.isfile(path) else [])
            urls.extend(matches)
        else:
            urls.append(url)
    if not urls:
        raise StackError(
            "matches no shard file", source=source, key=key, value=pattern,
            fix="check the directory and the brace range, e.g. 'data/train-{000000..000009}.tar'",
        )
    return urls


def _count_samples(path: str) -> int:
    """Number of samples (distinct keys) in a local tar shard, read from its headers only."""
    keys = set()
    with tarfile.open(path) as archive:
        for member in archive:
            if member.isfile():
                base = os.path.basename(member.name)
                keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
    return len(keys)


def assign_shards(
    urls: Sequence[str], *, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The training shards of one (rank, worker) in one epoch: the list shuffled with ``seed +
    epoch`` (identical on every rank), then ``[rank::world_size][worker::num_workers]``. Over all
    ranks and workers this is a partition of ``urls``."""
    order = list(urls)
    random.Random(seed + epoch).shuffle(order)
    return order[rank::world_size][worker::num_workers]


class ShardStream(IterableDataset):
    """One split's samples as ``(image_tensor, label)``, split over ranks and workers (module doc)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        transform: Any,
        image_key: str,
        label_key: str,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        batch_size: int = 1,
        samples_per_rank: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        base_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.image_key = image_key
        self.label_key = label_key
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.base_epoch = base_epoch
        self.skipped = 0
        self._passes = 0
        self.worker_quota = 0
        if train:
            per_worker = (samples_per_rank or 0) // self.num_workers
            self.worker_quota = (per_worker // batch_size) * batch_size

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("evaluation streams have no fixed length")
        return self.worker_quota * self.num_workers

    def _skip(self, error: Exception) -> bool:
        self.skipped += 1
        warnings.warn(f"WebDatasetDataModule: skipped unreadable data ({self.skipped} so far): {error!r}", stacklevel=2)
        return True

    def _samples(self, shards: Sequence[str], rng: random.Random | None) -> Iterator[tuple[torch.Tensor, int]]:
        import webdataset as wds

        stream: Any = wds.tarfile_to_samples(handler=self._skip)(iter([{"url": u} for u in shards]))
        if rng is not None and self.shuffle_buffer > 1:
            stream = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(stream)
        stream = wds.decode("pil", handler=self._skip)(stream)
        stream = wds.to_tuple(self.image_key, self.label_key, handler=self._skip)(stream)
        for image, label in stream:
            yield self.transform(image), int(label)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.base_epoch + self._passes
        self._passes += 1
        if not self.train:
            for index, sample in enumerate(self._samples(self.urls[worker::workers], None)):
                if index % self.world_size == self.rank:
                    yield sample
            return
        mine = assign_shards(self.urls, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                             worker=worker, num_workers=workers)
        produced, rounds = 0, 0
        while produced < self.worker_quota:
            rng = random.Random(hash((self.seed, epoch, rounds, self.rank, worker)))
            rng.shuffle(mine)
            got = 0
            for sample in self._samples(mine, rng):
                yield sample
                got += 1
                produced += 1
                if produced >= self.worker_quota:
                    return
            if got == 0:
                raise StackError(
                    "yielded no readable sample", source="WebDatasetDataModule", key="shards", value=mine,
                    fix="check that the shards are tar files holding the configured image and label keys",
                )
            rounds += 1


class WebDatasetDataModule(ImageDataModule):
    """Image classification from WebDataset shards (image + class per sample).

    Shards written by ``python -m stacktrain.datamodules.make_shards`` carry a ``dataset.json``
    beside them with the classes, image size, normalization and sample counts; for other shards
    give ``num_classes``, ``image_size`` and (for remote training shards) ``epoch_length``.

    Args:
        train_shards: shard pattern of the training split (brace notation, globs, URLs).
        val_shards: pattern of the validation split (None: no validation).
        test_shards: pattern of the test split (None: the validation shards).
        image_key: sample keys holding the image, ``;``-separated alternatives.
        label_key: sample key holding the integer class.
        num_classes: classes (default: from dataset.json).
        image_size: images are resized and center-cropped to this side (default: dataset.json).
        channels: 1 or 3.
        epoch_length: training samples per epoch over all ranks (default: the number of samples
            in the training shards).
        shuffle_buffer: samples in the shuffle buffer of each worker.
        seed: seed of the shard order (combined with the epoch).
        augment: random crop and flip for training images.
        mean, std: normalization (default: dataset.json, else 0.5 / 0.5).
    """

    #: The stream of one split; subclasses yield other sample types (e.g. captions instead of classes).
    stream_class: type[ShardStream] = ShardStream

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        test_shards: str | None = None,
        image_key: str = "png;jpg;jpeg;webp",
        label_key: str = "cls",
        num_classes: int | None = None,
        image_size: int | None = None,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 0,
        epoch_length: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        augment: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, channels=channels, seed=seed)
        source = type(self).__name__
        require_number(shuffle_buffer, "data.init_args.shuffle_buffer", source=source, low=0, integer=True)
        if epoch_length is not None:
            require_number(epoch_length, "data.init_args.epoch_length", source=source, low=1, integer=True)
        self.train_urls = expand_shards(train_shards, key="data.init_args.train_shards")
        self.val_urls = expand_shards(val_shards, key="data.init_args.val_shards") if val_shards else None
        self.test_urls = expand_shards(test_shards, key="data.init_args.test_shards") if test_shards else None
        self.image_key = image_key
        self.label_key = label_key
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment
        meta = self._metadata()
        self.metadata = meta
        self.num_classes = num_classes if num_classes is not None else meta.get("num_classes")
        if self.num_classes is None:
            raise StackError("is unknown (no dataset.json beside the shards)", source=source,
                             key="data.init_args.num_classes", value=None, fix="set data.init_args.num_classes")
        self.class_names = list(meta.get("class_names") or [str(i) for i in range(self.num_classes)])
        self.image_size = image_size if image_size is not None else meta.get("image_size")
        if self.image_size is None:
            raise StackError("is unknown (no dataset.json beside the shards)", source=source,
                             key="data.init_args.image_size", value=None,
                             fix="set data.init_args.image_size so that images can be batched")
        self.image_shape = (channels, int(self.image_size), int(self.image_size))
        self.mean = tuple(mean) if mean is not None else tuple(meta.get("mean", (0.5,)))
        self.std = tuple(std) if std is not None else tuple(meta.get("std", (0.5,)))
        self.epoch_length = epoch_length if epoch_length is not None else self._count_train_samples(meta)
        self.streams: dict[str, ShardStream] = {}

    def _metadata(self) -> dict[str, Any]:
        first = self.train_urls[0]
        if not _is_local(first):
            return {}
        path = os.path.join(os.path.dirname(first.removeprefix("file:")), METADATA_FILE)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    def _count_train_samples(self, meta: dict[str, Any]) -> int:
        known = {os.path.basename(s): n for split in meta.get("splits", {}).values() for s, n in split.get("shards", {}).items()}
        total = 0
        for url in self.train_urls:
            name = os.path.basename(url)
            if name in known:
                total += known[name]
            elif _is_local(url):
                total += _count_samples(url.removeprefix("file:"))
            else:
                raise StackError(
                    "is needed for remote training shards", source=type(self).__name__,
                    key="data.init_args.epoch_length", value=None,
                    fix="set data.init_args.epoch_length to the number of training samples per epoch",
                )
        return total

    def _rank_world(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        return trainer.global_rank, trainer.world_size, trainer.current_epoch

    def _stream(self, urls: list[str], *, train: bool) -> ShardStream:
        rank, world, epoch = self._rank_world()
        if train and len(urls) < world * max(1, self.num_workers):
            raise StackError(
                f"has {len(urls)} shards, fewer than ranks x workers = {world} x {max(1, self.num_workers)}",
                source=type(self).__name__, key="data.init_args.train_shards", value=len(urls),
                fix="write more, smaller shards (make_shards --maxcount) or use fewer data-loader workers",
            )
        transform = image_transform(
            train=train, image_size=int(self.image_size), channels=self.channels, mean=self.mean, std=self.std,
            augment=self.augment,
        )
        stream = self.stream_class(
            urls, transform=transform, image_key=self.image_key, label_key=self.label_key, train=train,
            rank=rank, world_size=world, num_workers=self.num_workers, batch_size=self.batch_size,
            samples_per_rank=self.epoch_length // world if train else None,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, base_epoch=epoch,
        )
        if train and len(stream) == 0:
            raise StackError(
                f"gives each of {world} ranks x {max(1, self.num_workers)} workers less than one batch of {self.batch_size}",
                source=type(self).__name__, key="data.init_args.epoch_length", value=self.epoch_length,
                fix="lower the batch size or the number of workers, or raise epoch_length",
            )
        return stream

    def _shard_loader(self, stream: ShardStream) -> DataLoader:
        return DataLoader(
            stream, batch_size=self.batch_size, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory,
        )

    @property
    def skipped(self) -> int:
        """Unreadable samples or shards skipped so far in this process (workers count their own)."""
        return sum(stream.skipped for stream in self.streams.values())

    def train_dataloader(self) -> DataLoader:
        self.streams["train"] = self._stream(self.train_urls, train=True)
        return self._shard_loader(self.streams["train"])

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []
        self.streams["val"] = self._stream(self.val_urls, train=False)
        return self._shard_loader(self.streams["val"])

    def test_dataloader(self) -> DataLoader:
        urls = self.test_urls or self.val_urls
        if urls is None:
            raise StackError("has no test or validation shards", source=type(self).__name__,
                             key="data.init_args.test_shards", value=None, fix="set data.init_args.test_shards")
        self.streams["test"] = self._stream(urls, train=False)
        return self._shard_loader(self.streams["test"])

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
