"""A pretrained tiny CLIP on the embedded shapes, cached on disk keyed by its pretraining config and
seed, so benchmarks pretrain it once (minutes on a CPU thread) and reuse it afterwards.

    python benchmarks/clip_cache.py [--steps 1500] [--seed 0]     # pretrain now if not cached

The cache folder is ``$STACKTRAIN_CACHE`` (default ``~/.cache/stacktrain``). A cached file is
never overwritten: the key changes whenever the config, the model architecture or the data
version changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stacktrain.datamodules.shapes import DATA_VERSION  # noqa: E402

#: The tiny CLIP of papers.md section 5, trained 2.5x longer than the borderline 600 steps.
TINY_PRETRAINING: dict[str, Any] = dict(
    model_name="stacktrain-tiny-clip", steps=1500, batch_size=256, lr=2e-3, weight_decay=0.1,
    warmup_fraction=0.1, seed=0,
)


def cache_dir() -> Path:
    return Path(os.environ.get("STACKTRAIN_CACHE", Path.home() / ".cache" / "stacktrain"))


def cache_key(config: dict[str, Any]) -> str:
    import open_clip

    from stacktrain.functional.clip import register_model_configs

    register_model_configs()
    payload = {"config": config, "model": open_clip.get_model_config(config["model_name"]), "data": DATA_VERSION}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cached_clip(config: dict[str, Any] | None = None, *, directory: Path | None = None, log_every: int = 50) -> Path:
    """The weights file of ``config`` (default `TINY_PRETRAINING`), pretrained now if not cached.
    A JSON beside it records the config and the pretraining time."""
    from stacktrain.lightning_modules.clip_pretrain import pretrain_clip

    config = dict(TINY_PRETRAINING if config is None else config)
    folder = directory or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{config['model_name']}-seed{config['seed']}-{cache_key(config)}"
    path = folder / f"{name}.pt"
    if path.exists():
        return path
    partial = folder / f"{name}.partial-{os.getpid()}.pt"
    print(f"clip_cache: pretraining {config} -> {path}", flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    pretrain_clip(str(partial), log_every=log_every, **config)
    info = {"config": config, "data_version": DATA_VERSION, "pretrain_wall_s": time.perf_counter() - wall,
            "pretrain_cpu_s": time.process_time() - cpu, "torch_threads": torch.get_num_threads()}
    os.replace(partial, path)
    (folder / f"{name}.json").write_text(json.dumps(info, indent=2))
    print(f"clip_cache: written {path} after {info['pretrain_wall_s']:.0f} s", flush=True)
    return path


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
