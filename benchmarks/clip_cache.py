"""A pretrained tiny CLIP on the embedded shapes, cached on disk keyed by its pretraining config and
seed, so benchmarks pretrain it once (about 17 minutes on one CPU thread) and reuse it afterwards.

    python benchmarks/clip_cache.py [--steps 1500] [--seed 0]     # pretrain now if not cached

The same cache serves ``pretrained: stacktrain-tiny-clip`` in every config
(`stacktrain.lightning_modules.clip_pretrain.resolve_pretrained`). The cache folder is
``$STACKTRAIN_CACHE`` (default ``~/.cache/stacktrain``). A cached file is never overwritten: the key
changes whenever the config, the model architecture or the data version changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stacktrain.lightning_modules.clip_pretrain import (  # noqa: E402
    STACKTRAIN_PRETRAINED,
    cache_dir,
    cache_key,
)
from stacktrain.lightning_modules.clip_pretrain import cached_clip as _cached_clip  # noqa: E402

__all__ = ["TINY_PRETRAINING", "cache_dir", "cache_key", "cached_clip", "main"]

#: The recipe behind ``pretrained: stacktrain-tiny-clip``.
TINY_PRETRAINING: dict[str, Any] = dict(STACKTRAIN_PRETRAINED["stacktrain-tiny-clip"])


def cached_clip(config: dict[str, Any] | None = None, *, directory: Path | None = None, log_every: int = 50) -> Path:
    """The weights file of ``config`` (default `TINY_PRETRAINING`), pretrained now if not cached."""
    return _cached_clip(TINY_PRETRAINING if config is None else config, directory=directory, log_every=log_every)


def main(argv: list[str] | None = None) -> Path:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--steps", type=int, default=TINY_PRETRAINING["steps"])
    arguments.add_argument("--seed", type=int, default=TINY_PRETRAINING["seed"])
    args = arguments.parse_args(argv)
    path = cached_clip(dict(TINY_PRETRAINING, steps=args.steps, seed=args.seed))
    print(path)
    return path


if __name__ == "__main__":
    main()
