"""Write image-text WebDataset shards of the embedded procedural shapes.

    python -m stacktrain.datamodules.make_image_text_shards shapes data/shapes-text --train 8192 --val 512

Each split becomes ``OUT/<split>-000000.tar, ...`` with samples ``{__key__, png: image, txt:
caption}`` (the LAION layout), and ``OUT/dataset.json`` records the image size, normalization and
the samples in every shard, which `ImageTextWebDataModule` reads. The images are the sharp
pretraining images of `ShapesTextDataModule` (its first epoch). An output folder that already holds
shards is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from stacktrain.errors import StackError, require_number

from .shapes import CLIP_MEAN, CLIP_STD, DATA_VERSION, SPLIT_IDS, render_shapes, sample_shapes
from .webdataset import METADATA_FILE

__all__ = ["write_image_text_shards", "shapes_image_text", "main"]


def write_image_text_shards(
    splits: dict[str, Iterable[tuple[bytes, str, str]]], out: str, *, meta: dict[str, Any], maxcount: int = 1024,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``{split: [(image bytes, extension, caption), ...]}`` as ``OUT/<split>-%06d.tar`` shards
    and ``OUT/dataset.json`` (``meta`` plus the samples of every shard). Returns the metadata."""
    import webdataset as wds

    require_number(maxcount, "--maxcount", source="make_image_text_shards", low=1, integer=True)
    existing = glob.glob(os.path.join(out, "*.tar")) + glob.glob(os.path.join(out, METADATA_FILE))
    if existing and not overwrite:
        raise StackError(f"already holds {len(existing)} shard/metadata files", source="make_image_text_shards", key="OUT",
                         value=out, fix="choose an empty folder or pass --overwrite to replace them")
    for path in existing:
        os.remove(path)
    os.makedirs(out, exist_ok=True)
    meta = dict(meta, splits={})
    for split, samples in splits.items():
        counts: dict[str, int] = {}
        with wds.ShardWriter(os.path.join(out, f"{split}-%06d.tar"), maxcount=maxcount, verbose=0) as writer:
            for index, (data, ext, caption) in enumerate(samples):
                writer.write({"__key__": f"{split}{index:08d}", ext: data, "txt": caption})
                shard = os.path.basename(writer.fname)
                counts[shard] = counts.get(shard, 0) + 1
        if counts:
            meta["splits"][split] = {"pattern": f"{split}-{{000000..{len(counts) - 1:06d}}}.tar",
                                     "samples": sum(counts.values()), "shards": counts}
    with open(os.path.join(out, METADATA_FILE), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return meta


def shapes_image_text(sizes: dict[str, int], *, image_size: int = 32, seed: int = 0,
                      chunk: int = 512) -> dict[str, Iterator[tuple[bytes, str, str]]]:
    """The procedural shapes (sharp, as pretraining sees them) as PNG bytes and captions per split."""
    from PIL import Image

    split_ids = {"train": SPLIT_IDS["pretrain_train"], "val": SPLIT_IDS["pretrain_val"]}

    def encode(split: str, size: int) -> Iterator[tuple[bytes, str, str]]:
        for start in range(0, size, chunk):
            params = sample_shapes(seed, split_ids[split], 0, range(start, min(size, start + chunk)))
            pixels = (render_shapes(params, image_size) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for image, caption in zip(pixels, params["caption"]):
                buffer = io.BytesIO()
                Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
                yield buffer.getvalue(), "png", caption

    return {split: encode(split, size) for split, size in sizes.items() if size > 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stacktrain.datamodules.make_image_text_shards",
                                     description="Write image-text WebDataset shards of the embedded shapes.")
    parser.add_argument("src", choices=["shapes"], help="what to write (the embedded procedural shapes)")
    parser.add_argument("out", metavar="OUT", help="output folder for the shards")
    parser.add_argument("--train", type=int, default=8192, help="training samples (default 8192)")
    parser.add_argument("--val", type=int, default=512, help="validation samples (default 512)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--maxcount", type=int, default=1024, help="samples per shard (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and captions")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    args = parser.parse_args(argv)
    meta = {"image_size": args.image_size, "channels": 3, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "source": f"stacktrain procedural shapes v{DATA_VERSION}, seed {args.seed}"}
    try:
        meta = write_image_text_shards(
            shapes_image_text({"train": args.train, "val": args.val}, image_size=args.image_size, seed=args.seed),
            args.out, meta=meta, maxcount=args.maxcount, overwrite=args.overwrite,
        )
    except StackError as error:
        print(f"make_image_text_shards: error: {error}", file=sys.stderr)
        return 2
    for split, info in meta["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards: "
              f"{os.path.join(args.out, info['pattern'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
