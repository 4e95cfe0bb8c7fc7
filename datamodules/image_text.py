"""Image-caption pairs from WebDataset shards (image + ``txt`` per sample), for CLIP pretraining.

Shards of any image-text data in the LAION layout work (``<key>.jpg`` + ``<key>.txt``);
``python -m stacktrain.datamodules.make_image_text_shards`` writes the embedded procedural shapes
that way. Splitting over ranks and workers, resumable epochs and skipping of corrupt shards are those
of `WebDatasetDataModule`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .shapes import CLIP_MEAN, CLIP_STD
from .webdataset import ShardStream, WebDatasetDataModule

__all__ = ["ImageTextWebDataModule", "CaptionShardStream"]


class CaptionShardStream(ShardStream):
    """A `ShardStream` whose samples are ``(image_tensor, caption)``."""

    def _samples(self, shards: Sequence[str], rng: Any) -> Iterator[tuple[torch.Tensor, str]]:
        import webdataset as wds

        stream: Any = wds.tarfile_to_samples(handler=self._skip)(iter([{"url": u} for u in shards]))
        if rng is not None and self.shuffle_buffer > 1:
            stream = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(stream)
        stream = wds.decode("pil", handler=self._skip)(stream)
        stream = wds.to_tuple(self.image_key, self.label_key, handler=self._skip)(stream)
        for image, text in stream:
            yield self.transform(image), text.decode("utf-8") if isinstance(text, bytes) else str(text)


class ImageTextWebDataModule(WebDatasetDataModule):
    """Image-caption pairs from WebDataset shards: batches ``(images, captions)``, ``images`` float32
    ``[B, 3, S, S]`` normalized (CLIP's statistics unless ``dataset.json`` or the config says
    otherwise), ``captions`` a list of strings.

    Args:
        train_shards: shard pattern of the training split (brace notation, globs, URLs).
        val_shards: pattern of the validation split (None: no validation).
        test_shards: pattern of the test split (None: the validation shards).
        image_key: sample keys holding the image, ``;``-separated alternatives.
        text_key: sample key holding the caption.
        image_size: images are resized and center-cropped to this side (default: dataset.json).
        batch_size: samples per batch and per process.
        num_workers: data-loader worker processes.
        epoch_length: training samples per epoch over all ranks (default: all training samples).
        shuffle_buffer: samples in the shuffle buffer of each worker.
        seed: seed of the shard order (combined with the epoch).
        augment: random crop and flip of training images (flips make "left"/"right" captions wrong).
        mean, std: normalization (default: dataset.json, else CLIP's).
    """

    stream_class = CaptionShardStream

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        test_shards: str | None = None,
        image_key: str = "png;jpg;jpeg;webp",
        text_key: str = "txt",
        image_size: int | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        epoch_length: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        augment: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        # num_classes=0: captions, not classes (the parent requires a class count).
        super().__init__(
            train_shards, val_shards, test_shards, image_key=image_key, label_key=text_key, num_classes=0,
            image_size=image_size, channels=3, batch_size=batch_size, num_workers=num_workers,
            epoch_length=epoch_length, shuffle_buffer=shuffle_buffer, seed=seed, augment=augment, mean=mean, std=std,
        )
        self.num_classes = None
        self.class_names = []
        if mean is None and "mean" not in self.metadata:
            self.mean = CLIP_MEAN
        if std is None and "std" not in self.metadata:
            self.std = CLIP_STD
