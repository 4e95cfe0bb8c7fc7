"""Embedded procedural shapes: coloured shapes on a noisy dark background, with captions.

The offline stand-in for web image-text data, so that a tiny CLIP can be pretrained and prompt-tuned
with no download. Every sample is a function of ``(seed, split, epoch, index)`` only: the same call
gives the same image and caption on any machine, rank or worker.

* `ShapesTextDataModule`: image-caption pairs for CLIP pretraining; batches ``(images, captions)``.
  Training images are fresh every epoch (an endless stream of new samples, still deterministic).
* `ShapesDataModule`: the labelled classification view (label = shape) for prompt tuning; batches
  ``(images, labels)`` with ``class_names``. Its images are slightly blurred by default: a mild
  domain shift from the sharp pretraining images, so that zero-shot CLIP leaves something for
  prompt tuning to learn (see papers.md, section 5).

Ten shapes x eight colours, random size, position and small rotation, warped from supersampled
shape templates, so edges are smooth at any ``image_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import v2

from stacktrain.errors import StackError, require_number

from .base import ImageDataModule, TensorImageDataset, stateful_train_loader

__all__ = [
    "SHAPES",
    "COLOURS",
    "CLIP_MEAN",
    "CLIP_STD",
    "ShapeSamples",
    "ShapesTextDataModule",
    "ShapesDataModule",
    "sample_shapes",
    "render_shapes",
]

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring", "star", "crescent", "heart", "arrow"]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.20, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
    "cyan": (0.10, 0.85, 0.90),
}
#: open_clip's (OpenAI's) normalization, so the same data fits released CLIP weights too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_TEMPLATES = [
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape} on the {position}",
    "{colour} {shape}",
    "a picture of a {size} {shape} in {colour}",
    "there is a {colour} {shape} at the {position}",
    "a {shape}, {colour}, {size}",
    "a {size} {colour} {shape} on a dark background",
]
#: Bump when the rendering or the captions change: cached pretrained models are keyed by it.
DATA_VERSION = 1
#: Seed streams: pretraining and the classification view never share an image.
SPLIT_IDS = {"pretrain_train": 0, "pretrain_val": 1, "train": 10, "val": 11, "test": 12}


def _sample_rng(seed: int, split: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(split), int(epoch), int(index)])


def sample_shapes(
    seed: int, split: int, epoch: int, indices: Sequence[int], *, shapes: Sequence[int] | None = None,
    word_drop: float = 0.1,
) -> dict[str, Any]:
    """The random parameters and captions of samples ``indices``, each drawn from its own generator
    seeded by ``(seed, split, epoch, index)``. ``shapes`` restricts the shape classes (indices into
    `SHAPES`); the returned ``label`` is the position in that list."""
    allowed = list(range(len(SHAPES))) if shapes is None else list(shapes)
    colour_names = list(COLOURS)
    rows: dict[str, list[Any]] = {k: [] for k in ("label", "shape", "colour", "scale", "center", "angle",
                                                   "tint", "background", "noise_seed", "caption")}
    for index in indices:
        rng = _sample_rng(seed, split, epoch, index)
        label = int(rng.integers(len(allowed)))
        shape = allowed[label]
        colour = int(rng.integers(len(colour_names)))
        scale = float(rng.uniform(0.35, 0.75))
        reach = (1.0 - scale) * 0.9
        center = rng.uniform(-reach, reach, size=2)
        angle = float(rng.uniform(-20.0, 20.0)) * math.pi / 180.0
        tint = rng.uniform(-0.08, 0.08, size=3)
        background = rng.uniform(0.0, 0.2, size=3)
        noise_seed = int(rng.integers(2**31 - 1))
        rows["label"].append(label)
        rows["shape"].append(shape)
        rows["colour"].append(colour)
        rows["scale"].append(scale)
        rows["center"].append(center)
        rows["angle"].append(angle)
        rows["tint"].append(tint)
        rows["background"].append(background)
        rows["noise_seed"].append(noise_seed)
        rows["caption"].append(_caption(rng, SHAPES[shape], colour_names[colour], scale, center, word_drop))
    return {
        "label": torch.tensor(rows["label"], dtype=torch.int64),
        "shape": torch.tensor(rows["shape"], dtype=torch.int64),
        "colour": torch.tensor(rows["colour"], dtype=torch.int64),
        "scale": torch.tensor(rows["scale"], dtype=torch.float32),
        "center": torch.tensor(np.array(rows["center"]).reshape(-1, 2), dtype=torch.float32),
        "angle": torch.tensor(rows["angle"], dtype=torch.float32),
        "tint": torch.tensor(np.array(rows["tint"]).reshape(-1, 3), dtype=torch.float32),
        "background": torch.tensor(np.array(rows["background"]).reshape(-1, 3), dtype=torch.float32),
        "noise_seed": rows["noise_seed"],
        "caption": rows["caption"],
    }


def _caption(rng: np.random.Generator, shape: str, colour: str, scale: float, center: np.ndarray,
             word_drop: float) -> str:
    size = "small" if scale < 0.48 else "large" if scale > 0.62 else "medium"
    dx, dy = float(center[0]), float(center[1])  # y grows downwards in the image
    if max(abs(dx), abs(dy)) < 0.12:
        position = "center"
    elif abs(dx) >= abs(dy):
        position = "right" if dx > 0 else "left"
    else:
        position = "bottom" if dy > 0 else "top"
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    words = template.format(size=size, colour=colour, shape=shape, position=position).split()
    keep = rng.random(len(words)) >= word_drop
    if keep.any():
        words = [w for w, k in zip(words, keep) if k]
    text = " ".join(words).strip(",")
    return text + "." if rng.random() < 0.5 else text


def _inside(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Whether unit-frame points (x right, y up; the shape fits the unit disc) lie inside ``shape``."""
    r2 = x * x + y * y
    if shape == "circle":
        return r2 <= 0.8**2
    if shape == "square":
        return torch.maximum(x.abs(), y.abs()) <= 0.7
    if shape == "triangle":
        return (y >= -0.45) & (y <= 0.9 - 1.732 * x.abs())
    if shape == "diamond":
        return x.abs() / 0.6 + y.abs() / 0.95 <= 1.0
    if shape == "cross":
        return ((x.abs() <= 0.25) & (y.abs() <= 0.85)) | ((y.abs() <= 0.25) & (x.abs() <= 0.85))
    if shape == "ring":
        return (r2 >= 0.5**2) & (r2 <= 0.85**2)
    if shape == "star":
        turn = (torch.atan2(y, x) * (5.0 / (2.0 * math.pi)) - 1.25) % 1.0
        radius = 0.38 + (0.95 - 0.38) * (2.0 * turn - 1.0).abs()
        return r2 <= radius * radius
    if shape == "crescent":
        return (r2 <= 0.85**2) & ((x - 0.35) ** 2 + (y - 0.1) ** 2 >= 0.68**2)
    if shape == "heart":
        hx, hy = x / 0.72, y / 0.72 + 0.12
        return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy**3 <= 0.0
    if shape == "arrow":
        shaft = (y.abs() <= 0.2) & (x >= -0.85) & (x <= 0.2)
        head = (x >= 0.2) & (x <= 0.9) & (y.abs() <= 0.6 * (0.9 - x) / 0.7)
        return shaft | head
    raise ValueError(shape)


_TEMPLATE_SIDE = 128
_TEMPLATES_CACHE: list[torch.Tensor] = []


def shape_templates() -> torch.Tensor:
    """The ten shapes as soft masks ``[10, 1, 128, 128]`` over the unit square (rows top to bottom),
    rendered once with 2x2 supersampling; images are warped from them."""
    if not _TEMPLATES_CACHE:
        side = _TEMPLATE_SIDE * 2
        coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2.0 - 1.0
        gy, gx = torch.meshgrid(coords, coords, indexing="ij")
        masks = [_inside(name, gx, -gy).float() for name in SHAPES]
        _TEMPLATES_CACHE.append(F.avg_pool2d(torch.stack(masks).unsqueeze(1), 2))
    return _TEMPLATES_CACHE[0]


def render_shapes(params: dict[str, Any], image_size: int, *, noise: float = 0.06, blur: float = 0.0) -> torch.Tensor:
    """Images ``[N, 3, image_size, image_size]`` in [0, 1] for the parameters of `sample_shapes`.

    Each shape's mask is its template rotated, scaled and moved (one ``grid_sample`` per shape,
    at twice the resolution, then averaged down). ``blur`` is the standard deviation (in pixels
    of a 32-pixel image, scaled with ``image_size``) of a Gaussian blur applied last."""
    n = len(params["shape"])
    cos, sin = params["angle"].cos(), params["angle"].sin()
    scale, cx, cy = params["scale"], params["center"][:, 0], params["center"][:, 1]
    # output (x, y down) in [-1, 1] -> template coordinates: rotate by -angle about the centre, unscale
    theta = torch.stack([
        torch.stack([cos / scale, sin / scale, -(cos * cx + sin * cy) / scale], 1),
        torch.stack([-sin / scale, cos / scale, -(-sin * cx + cos * cy) / scale], 1),
    ], 1)
    side = 2 * image_size
    coverage = torch.zeros(n, 1, side, side)
    templates = shape_templates()
    for shape_index in params["shape"].unique().tolist():
        rows = (params["shape"] == shape_index).nonzero().squeeze(1)
        grid = F.affine_grid(theta[rows], [len(rows), 1, side, side], align_corners=False)
        source = templates[shape_index : shape_index + 1].expand(len(rows), -1, -1, -1)
        coverage[rows] = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    coverage = F.avg_pool2d(coverage, 2)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    colour = (palette[params["colour"]] + params["tint"]).clamp(0.0, 1.0)[:, :, None, None]
    background = params["background"][:, :, None, None]
    images = background * (1.0 - coverage) + colour * coverage
    if noise > 0 and n:
        grain = torch.stack([
            torch.from_numpy(np.random.default_rng(s).standard_normal((3, image_size, image_size), dtype=np.float32))
            for s in params["noise_seed"]
        ])
        images = images + noise * grain
    images = images.clamp(0.0, 1.0)
    if blur > 0:
        sigma = blur * image_size / 32.0
        kernel = 2 * math.ceil(2.5 * sigma) + 1
        images = v2.functional.gaussian_blur(images, [kernel, kernel], [sigma, sigma])
    return images


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (images - mean) / std


class ShapeSamples(Dataset):
    """``length`` image-caption samples of one split. Items are indices or ``(epoch, index)`` pairs
    (from `EpochSampler`); with ``fresh_each_epoch`` the epoch selects new images. Batched fetching
    (``__getitems__``) renders a whole batch at once."""

    def __init__(self, length: int, *, seed: int, split: int, image_size: int, fresh_each_epoch: bool = False,
                 blur: float = 0.0, word_drop: float = 0.1, shapes: Sequence[int] | None = None) -> None:
        self.length = length
        self.seed = seed
        self.split = split
        self.image_size = image_size
        self.fresh_each_epoch = fresh_each_epoch
        self.blur = blur
        self.word_drop = word_drop
        self.shapes = shapes

    def __len__(self) -> int:
        return self.length

    def _key(self, item: Any) -> tuple[int, int]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        return (int(epoch) if self.fresh_each_epoch else 0), int(index)

    def render(self, items: Sequence[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Normalized images and the parameters (captions, labels) of ``items``."""
        keys = [self._key(item) for item in items]
        images, params = [], None
        for epoch in sorted({e for e, _ in keys}):
            indices = [i for e, i in keys if e == epoch]
            part = sample_shapes(self.seed, self.split, epoch, indices, shapes=self.shapes, word_drop=self.word_drop)
            images.append(render_shapes(part, self.image_size, blur=self.blur))
            params = part if params is None else {k: (params[k] + part[k]) if isinstance(part[k], list)
                                                  else torch.cat([params[k], part[k]]) for k in part}
        if len({e for e, _ in keys}) > 1:  # put the samples back in the requested order
            order = sorted(range(len(keys)), key=lambda j: (keys[j][0], j))
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            merged = torch.cat(images)[inverse]
            params = {k: [v[j] for j in inverse.tolist()] if isinstance(v, list) else v[inverse] for k, v in params.items()}
            return _normalize(merged), params
        return _normalize(images[0]), params

    def __getitems__(self, items: Sequence[Any]) -> list[tuple[torch.Tensor, str]]:
        images, params = self.render(items)
        return list(zip(images, params["caption"]))

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, str]:
        return self.__getitems__([item])[0]


def _collate_captions(samples: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


class ShapesTextDataModule(LightningDataModule):
    """Procedural image-caption pairs for CLIP pretraining, no download: batches ``(images,
    captions)`` with ``images`` float32 ``[B, 3, S, S]`` (CLIP normalization) and ``captions`` a
    list of strings such as ``"a small red star on the left"`` (words dropped at random).

    Deterministic per (seed, epoch, sample) and resumable: the training order comes from
    `EpochSampler` (split over DDP ranks) and the loaders are ``StatefulDataLoader``s.

    Args:
        image_size: side of the square images.
        train_size: training samples per epoch.
        val_size: validation samples (a fixed set).
        batch_size: samples per batch and per process.
        num_workers: data-loader worker processes.
        seed: seed of the images, captions and order.
        fresh_each_epoch: new training images every epoch (else the same ``train_size`` images).
        word_drop: probability of dropping each caption word.
        blur: Gaussian blur of every image (pixels at 32 px), 0 for sharp images.
    """

    def __init__(self, image_size: int = 32, train_size: int = 25600, val_size: int = 1024, batch_size: int = 256,
                 num_workers: int = 0, seed: int = 0, fresh_each_epoch: bool = True, word_drop: float = 0.1,
                 blur: float = 0.0) -> None:
        super().__init__()
        source = type(self).__name__
        require_number(image_size, "data.init_args.image_size", source=source, low=8, high=512, integer=True)
        require_number(train_size, "data.init_args.train_size", source=source, low=1, integer=True)
        require_number(val_size, "data.init_args.val_size", source=source, low=0, integer=True)
        require_number(batch_size, "data.init_args.batch_size", source=source, low=1, integer=True,
                       fix="use a positive batch size such as 256")
        require_number(num_workers, "data.init_args.num_workers", source=source, low=0, integer=True)
        require_number(word_drop, "data.init_args.word_drop", source=source, low=0.0, high=1.0, high_inclusive=False)
        require_number(blur, "data.init_args.blur", source=source, low=0.0, high=8.0)
        self.image_size = image_size
        self.train_size = train_size
        self.val_size = val_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.fresh_each_epoch = fresh_each_epoch
        self.word_drop = word_drop
        self.blur = blur
        self.image_shape = (3, image_size, image_size)
        self.train_set: ShapeSamples | None = None
        self.val_set: ShapeSamples | None = None

    def setup(self, stage: str | None = None) -> None:
        common = dict(seed=self.seed, image_size=self.image_size, blur=self.blur, word_drop=self.word_drop)
        self.train_set = ShapeSamples(self.train_size, split=SPLIT_IDS["pretrain_train"],
                                      fresh_each_epoch=self.fresh_each_epoch, **common)
        self.val_set = ShapeSamples(self.val_size, split=SPLIT_IDS["pretrain_val"], **common)

    def train_dataloader(self) -> StatefulDataLoader:
        loader = stateful_train_loader(
            self.train_set, trainer=self.trainer, batch_size=self.batch_size, num_workers=self.num_workers,
            seed=self.seed, collate_fn=_collate_captions, drop_incomplete_batch=True,
        )
        if len(loader.sampler) < self.batch_size:
            raise StackError(
                f"gives each process {len(loader.sampler)} samples per epoch, less than one batch of {self.batch_size}",
                source=type(self).__name__, key="data.init_args.train_size", value=self.train_size,
                fix="raise train_size or lower batch_size",
            )
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_size:
            return []
        # a plain loader: every validation starts from the first batch, also after a resume
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, collate_fn=_collate_captions,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class ShapesDataModule(ImageDataModule):
    """The procedural shapes as a labelled classification set (label = shape; the colour, size and
    position vary), for prompt tuning and zero-shot evaluation: batches ``(images, labels)``,
    ``class_names`` the shape names. Rendered once in ``setup``.

    Images are blurred (``blur`` pixels at 32 px) by default: a mild shift from the sharp
    pretraining images of `ShapesTextDataModule`, whose seed streams it never shares.

    Args:
        image_size: side of the square images.
        train_size: images in the training pool (prompt tuning samples its k shots from it).
        val_size: validation images.
        test_size: test images.
        classes: shape names to use, in this order (default all ten of `SHAPES`).
        blur: Gaussian blur of every image (the shift); 0 for sharp images.
        batch_size: samples per batch and per process.
        num_workers: data-loader worker processes.
        seed: seed of the images and of the training order.
        augment: random crop (1/8 padding) and horizontal flip of training images.
    """

    def __init__(self, image_size: int = 32, train_size: int = 2000, val_size: int = 1000, test_size: int = 1000,
                 classes: list[str] | None = None, blur: float = 1.0, batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0, augment: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, channels=3, seed=seed)
        source = type(self).__name__
        require_number(image_size, "data.init_args.image_size", source=source, low=8, high=512, integer=True)
        for key, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            require_number(value, f"data.init_args.{key}", source=source, low=1, integer=True)
        require_number(blur, "data.init_args.blur", source=source, low=0.0, high=8.0)
        names = list(SHAPES) if classes is None else list(classes)
        unknown = [name for name in names if name not in SHAPES]
        if unknown or len(set(names)) != len(names) or len(names) < 2:
            raise StackError(
                "must name at least two different shapes" + (f"; unknown: {unknown}" if unknown else ""),
                source=source, key="data.init_args.classes", value=classes, fix=f"choose from {SHAPES}",
            )
        self.image_size = image_size
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.blur = blur
        self.augment = augment
        self.random_transforms = augment
        self.class_names = names
        self.num_classes = len(names)
        self.image_shape = (3, image_size, image_size)
        self._shape_ids = [SHAPES.index(name) for name in names]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        augment = None
        if self.augment:
            augment = v2.Compose([
                v2.RandomCrop(self.image_size, padding=max(1, self.image_size // 8), padding_mode="reflect"),
                v2.RandomHorizontalFlip(),
            ])
        sets = {}
        for split, size in self.sizes.items():
            samples = ShapeSamples(size, seed=self.seed, split=SPLIT_IDS[split], image_size=self.image_size,
                                   blur=self.blur, shapes=self._shape_ids)
            images, labels = [], []
            for start in range(0, size, 1000):
                chunk, params = samples.render(range(start, min(size, start + 1000)))
                images.append(chunk)
                labels.append(params["label"])
            sets[split] = TensorImageDataset(torch.cat(images), torch.cat(labels), augment if split == "train" else None)
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
