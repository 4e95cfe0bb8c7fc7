"""Write WebDataset shards from the embedded digits or an image folder.

    python -m stacktrain.datamodules.make_shards digits data/digits-shards
    python -m stacktrain.datamodules.make_shards path/to/imagefolder data/my-shards --maxcount 1000

Each split becomes ``OUT/<split>-000000.tar, ...`` with samples ``{__key__, <ext>: image bytes,
cls: class index}``, and ``OUT/dataset.json`` records the classes, image size, normalization and
the samples in every shard, which `WebDatasetDataModule` reads. An image folder with ``train/``,
``val/``, ``test/`` sub-folders gives those splits; a folder of class folders gives ``train`` only.
An output folder that already holds shards is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from collections.abc import Iterator

from stacktrain.errors import StackError

from .webdataset import METADATA_FILE

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _digits_samples(seed: int) -> tuple[dict[str, Iterator[tuple[bytes, str, int]]], dict]:
    from PIL import Image

    from .digits import DIGIT_NAMES, digits_splits

    splits = digits_splits(seed=seed)
    train_images = splits["train"][0].astype("float64") / 255.0

    def encode(images, labels):
        for image, label in zip(images, labels):
            buffer = io.BytesIO()
            Image.fromarray(image, mode="L").save(buffer, format="PNG")
            yield buffer.getvalue(), "png", int(label)

    meta = {
        "num_classes": 10, "class_names": DIGIT_NAMES, "image_size": 8, "channels": 1,
        "mean": [float(train_images.mean())], "std": [float(train_images.std())], "source": "sklearn digits",
    }
    return {name: encode(*arrays) for name, arrays in splits.items()}, meta


def _folder_samples(root: str) -> tuple[dict[str, Iterator[tuple[bytes, str, int]]], dict]:
    from PIL import Image

    split_roots = {s: os.path.join(root, s) for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))}
    if not split_roots:
        split_roots = {"train": root}
    classes = sorted(e.name for e in os.scandir(split_roots["train"]) if e.is_dir())
    if len(classes) < 2:
        raise StackError("holds fewer than two class folders", source="make_shards", key="SRC", value=root,
                         fix="give a folder with one sub-folder per class (or train/<class>/...)")
    first_size = None
    files: dict[str, list[tuple[str, int]]] = {}
    for split, split_root in split_roots.items():
        files[split] = []
        for index, name in enumerate(classes):
            for path in sorted(glob.glob(os.path.join(split_root, name, "*"))):
                if path.lower().endswith(_IMAGE_EXTENSIONS):
                    files[split].append((path, index))
        if not files[split]:
            raise StackError("holds no images", source="make_shards", key="SRC", value=split_root,
                             fix=f"add images with one of the extensions {_IMAGE_EXTENSIONS}")
    with Image.open(files["train"][0][0]) as image:
        first_size = min(image.size)

    def read(items):
        for path, label in items:
            with open(path, "rb") as handle:
                yield handle.read(), os.path.splitext(path)[1].lower().lstrip(".").replace("jpeg", "jpg"), label

    meta = {"num_classes": len(classes), "class_names": classes, "image_size": first_size, "channels": 3,
            "source": os.path.abspath(root)}
    return {split: read(items) for split, items in files.items()}, meta


def make_shards(src: str, out: str, *, maxcount: int = 256, seed: int = 0, overwrite: bool = False) -> dict:
    """Write the shards of ``src`` ("digits" or an image folder) into ``out``; returns the metadata."""
    import webdataset as wds

    if maxcount < 1:
        raise StackError("must be at least 1", source="make_shards", key="--maxcount", value=maxcount,
                         fix="use a positive number of samples per shard, e.g. 256")
    existing = glob.glob(os.path.join(out, "*.tar")) + glob.glob(os.path.join(out, METADATA_FILE))
    if existing and not overwrite:
        raise StackError(
            f"already holds {len(existing)} shard/metadata files", source="make_shards", key="OUT", value=out,
            fix="choose an empty folder or pass --overwrite to replace them",
        )
    for path in existing:
        os.remove(path)
    if src == "digits":
        splits, meta = _digits_samples(seed)
    elif os.path.isdir(src):
        splits, meta = _folder_samples(src)
    else:
        raise StackError("is neither 'digits' nor an existing folder", source="make_shards", key="SRC", value=src,
                         fix="pass 'digits' or the path of an image folder")
    os.makedirs(out, exist_ok=True)
    meta["splits"] = {}
    for split, samples in splits.items():
        counts: dict[str, int] = {}
        pattern = os.path.join(out, f"{split}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as writer:
            for index, (data, ext, label) in enumerate(samples):
                writer.write({"__key__": f"{split}{index:08d}", ext: data, "cls": label})
                shard = os.path.basename(writer.fname)
                counts[shard] = counts.get(shard, 0) + 1
        if not counts:
            continue
        last = len(counts) - 1
        meta["splits"][split] = {
            "pattern": f"{split}-{{000000..{last:06d}}}.tar",
            "samples": sum(counts.values()),
            "shards": counts,
        }
    with open(os.path.join(out, METADATA_FILE), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stacktrain.datamodules.make_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC", help="'digits' or an image folder")
    parser.add_argument("out", metavar="OUT", help="output folder for the shards")
    parser.add_argument("--maxcount", type=int, default=256, help="samples per shard (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the digits split")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    args = parser.parse_args(argv)
    try:
        meta = make_shards(args.src, args.out, maxcount=args.maxcount, seed=args.seed, overwrite=args.overwrite)
    except StackError as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 2
    for split, info in meta["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards: {os.path.join(args.out, info['pattern'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
