"""`ClutteredDigitsDataModule`: real handwritten digits on a cluttered, noisy canvas.

The benchmark task of stacktrain. scikit-learn's 8x8 digits alone saturate every method near 0.98
(one test image is worth a verdict there); here the same real digits are drawn at a random size and
position on a larger canvas, among fragments of other digits and under Gaussian noise, so that
capacity, precision and training length show in the accuracy (see BENCHMARKS.md, section 2, and the
calibration table in benchmarks/RESULTS.md).

* Train, validation and test images are drawn from **disjoint source digits** (a stratified split of
  the 1,797 scikit-learn images, fixed by ``data_seed``): the model is tested on handwriting it never
  saw, not on new placements of digits it trained on.
* Every sample is a function of ``(data_seed, split, epoch, index)`` only (numpy generator seeded by
  that tuple): the same on every machine, rank and worker. Without ``augment`` every epoch sees the
  same training images (epoch 0's); with ``augment`` a training sample is re-rendered each epoch
  (new size, position, clutter and noise of the same source digit), seeded by ``(seed, epoch,
  index)`` like every stacktrain augmentation.

The knobs that set the difficulty (defaults in brackets, measured in the calibration table):
``digit_size`` [(14, 21)] pixels of the digit's side, ``clutter`` [8] fragments of other digits,
``fragment_size`` [6] their side in pixels, ``noise`` [0.25] standard deviation of the Gaussian noise
on a [0, 1] canvas, ``image_size`` [32] the canvas side. Smaller digits, more and larger fragments
and more noise make it harder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from stacktrain.errors import StackError, require_number

from .base import ImageDataModule, TensorImageDataset
from .digits import DIGIT_NAMES, digits_splits

__all__ = ["ClutteredDigitsDataModule", "ClutteredDigits", "render_cluttered"]

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _resized_digits(images: np.ndarray, sizes: range) -> dict[int, np.ndarray]:
    """Every source digit at every size: ``{size: float32 [N, size, size]}`` in [0, 1]."""
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    return {size: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True).squeeze(1).clamp_(0, 1).numpy() for size in sizes}


def render_cluttered(
    rng: np.random.Generator,
    source: int,
    resized: dict[int, np.ndarray],
    *,
    image_size: int,
    clutter: int,
    fragment_size: int,
    noise: float,
) -> np.ndarray:
    """One canvas ``[image_size, image_size]`` (float32): source digit ``source`` at a random size
    and position, ``clutter`` random crops of other digits of the same pool, then Gaussian noise.
    Everything random comes from ``rng``, so the sample is a function of its seed."""
    sizes = list(resized)
    pool = len(resized[sizes[0]])
    canvas = np.zeros((image_size, image_size), dtype=np.float32)
    for _ in range(clutter):
        other = int(rng.integers(pool - 1))
        other += other >= source  # any digit of the pool but the source itself
        glyph = resized[sizes[int(rng.integers(len(sizes)))]][other]
        side = min(fragment_size, glyph.shape[0])
        gy, gx = rng.integers(glyph.shape[0] - side + 1, size=2)
        y, x = rng.integers(image_size - side + 1, size=2)
        patch = glyph[gy:gy + side, gx:gx + side] * np.float32(rng.uniform(0.6, 1.0))
        np.maximum(canvas[y:y + side, x:x + side], patch, out=canvas[y:y + side, x:x + side])
    digit = resized[sizes[int(rng.integers(len(sizes)))]][source]
    side = digit.shape[0]
    y, x = rng.integers(image_size - side + 1, size=2)
    np.maximum(canvas[y:y + side, x:x + side], digit, out=canvas[y:y + side, x:x + side])
    if noise > 0:
        canvas += rng.normal(0.0, noise, size=canvas.shape).astype(np.float32)
    return canvas


class ClutteredDigits(Dataset):
    """The training split rendered on the fly: sample ``index`` is re-rendered from a seed drawn
    from torch's generator, which `SeededSamples` seeds by (seed, epoch, index)."""

    def __init__(self, sources: np.ndarray, labels: torch.Tensor, resized: dict[int, np.ndarray],
                 normalize: tuple[float, float], channels: int, render: dict[str, Any]) -> None:
        self.sources, self.labels, self.resized = sources, labels, resized
        self.mean, self.std = normalize
        self.channels, self.render = channels, render

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(int(torch.randint(2**62, (1,)).item()))
        canvas = render_cluttered(rng, int(self.sources[index]), self.resized, **self.render)
        image = (torch.from_numpy(canvas) - self.mean) / self.std
        return image.unsqueeze(0).expand(self.channels, -1, -1).contiguous(), self.labels[index]


class ClutteredDigitsDataModule(ImageDataModule):
    """Real handwritten digits at random size and position on a cluttered, noisy canvas (module
    docstring: the task, its determinism and its difficulty knobs).

    Args:
        image_size: side of the square canvas.
        channels: 1 (grayscale) or 3 (the gray value repeated).
        batch_size: samples per batch and per process.
        num_workers: data-loader worker processes.
        train_size, val_size, test_size: rendered samples per split.
        val_fraction, test_fraction: fractions of the 1,797 source digits reserved for the
            validation and test renderings (disjoint from the training sources).
        digit_size: (smallest, largest) side of the digit in pixels.
        clutter: fragments of other digits per image.
        fragment_size: side of each fragment in pixels.
        noise: standard deviation of the Gaussian noise (canvas in [0, 1]).
        data_seed: seed of the source split and of the renderings: keep it fixed to compare runs.
        seed: seed of the training order (and of the re-renderings with ``augment``).
        augment: re-render every training sample each epoch instead of reusing epoch 0's images.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        train_size: int = 6000,
        val_size: int = 1000,
        test_size: int = 2000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.25,
        digit_size: tuple[int, int] = (14, 21),
        clutter: int = 8,
        fragment_size: int = 6,
        noise: float = 0.25,
        data_seed: int = 0,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, channels=channels, seed=seed)
        source = type(self).__name__
        require_number(image_size, "data.init_args.image_size", source=source, low=8, high=512, integer=True)
        for key, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            require_number(value, f"data.init_args.{key}", source=source, low=1, integer=True)
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            require_number(value, f"data.init_args.{key}", source=source, low=0.01, high=0.5)
        require_number(clutter, "data.init_args.clutter", source=source, low=0, integer=True)
        require_number(fragment_size, "data.init_args.fragment_size", source=source, low=1, integer=True)
        require_number(noise, "data.init_args.noise", source=source, low=0.0, high=2.0)
        smallest, largest = (int(v) for v in digit_size)
        if not 4 <= smallest <= largest <= image_size:
            raise StackError(f"must satisfy 4 <= smallest <= largest <= image_size ({image_size})", source=source,
                             key="data.init_args.digit_size", value=tuple(digit_size),
                             fix="use e.g. digit_size: [14, 21] on a 32-pixel canvas")
        self.image_size = image_size
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.digit_size = (smallest, largest)
        self.render = dict(image_size=image_size, clutter=clutter, fragment_size=fragment_size, noise=noise)
        self.data_seed = data_seed
        self.augment = augment
        self.random_transforms = augment
        self.num_classes = 10
        self.class_names = list(DIGIT_NAMES)
        self.image_shape = (channels, image_size, image_size)
        self.mean: float | None = None
        self.std: float | None = None

    def render_split(self, split: str, epoch: int = 0) -> tuple[np.ndarray, torch.Tensor]:
        """The ``split``'s canvases ``[N, H, W]`` (float32, before normalization) and labels, each
        sample seeded by (data_seed, split, epoch, index)."""
        pool_images, pool_labels = self._pools[split]
        resized = self._resized[split]
        count = self.sizes[split]
        # sample i shows source digit i mod pool (every source used as evenly as possible)
        sources = np.arange(count) % len(pool_labels)
        canvases = np.stack([
            render_cluttered(np.random.default_rng([self.data_seed, _SPLIT_IDS[split], epoch, index]),
                             int(sources[index]), resized, **self.render)
            for index in range(count)
        ])
        return canvases, torch.from_numpy(pool_labels[sources])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = digits_splits(self.val_fraction, self.test_fraction, self.data_seed)
        sizes = range(self.digit_size[0], self.digit_size[1] + 1)
        self._pools = splits
        self._resized = {name: _resized_digits(images, sizes) for name, (images, _) in splits.items()}
        rendered = {name: self.render_split(name) for name in splits}
        train_canvases = rendered["train"][0]
        self.mean, self.std = float(train_canvases.mean()), float(train_canvases.std())
        datasets = {}
        for name, (canvases, labels) in rendered.items():
            images = (torch.from_numpy(canvases).unsqueeze(1) - self.mean) / self.std
            datasets[name] = TensorImageDataset(images.expand(-1, self.channels, -1, -1).contiguous(), labels)
        if self.augment:
            count = self.sizes["train"]
            datasets["train"] = ClutteredDigits(
                np.arange(count) % len(splits["train"][1]), datasets["train"].labels, self._resized["train"],
                (self.mean, self.std), self.channels, self.render)
        self.train_set, self.val_set, self.test_set = datasets["train"], datasets["val"], datasets["test"]
