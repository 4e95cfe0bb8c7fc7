"""Shared test setup: W&B offline and quiet, small models, and cleanup of W&B runs."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]
# the benchmarks (a folder of scripts, not part of the installed package) import as `benchmarks`
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
CONFIGS = REPO / "configs"

#: A ViT small enough for unit tests on 16x16 grayscale digits (17 tokens, ~30k parameters).
TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.fixture
def tiny_vit_kwargs() -> dict:
    return dict(TINY_VIT)


@pytest.fixture(autouse=True)
def _finish_wandb():
    """A test that started a W&B run must not leave it open for the next one."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(quiet=True)


def random_clip_weights(directory: Path, model_name: str = "stacktrain-micro-clip") -> str:
    """A randomly initialised (seed 0) open_clip ``model_name`` saved as a plain weights file (``pretrained=``)."""
    import torch

    from stacktrain.functional.clip import create_clip_model

    torch.manual_seed(0)
    path = Path(directory) / f"{model_name}.pt"
    torch.save(create_clip_model(model_name).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def micro_clip(tmp_path_factory) -> str:
    """A randomly initialised micro CLIP saved as a plain open_clip weights file (``pretrained=``)."""
    return random_clip_weights(tmp_path_factory.mktemp("clip"))


def refused(capsys: Any, argv: list[str]) -> str:
    """Run the CLI on ``argv``; it must stop with exit status 2, no traceback, and end with one line
    ``stacktrain: error: ... Fix: ...``, which is returned. The last line: Lightning may warn first (once
    per process) that the CLI was given ``args`` beside pytest's own command line."""
    from stacktrain.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    full = capsys.readouterr().err
    err = full.strip().splitlines()[-1]
    assert err.startswith("stacktrain: error: ") and "Fix:" in err and not err.startswith("stacktrain: error: stacktrain:")
    assert "Traceback" not in full
    return err


def make_trainer(root: Any = None, callbacks: Sequence[Any] = (), *, processes: int = 1, **overrides: Any) -> Any:
    """The one Trainer factory of the tests: CPU, quiet (no logger, checkpoints, progress bar or model
    summary), in ``root``; one process, or with ``processes=2`` DDP over gloo (as the 2-process drivers
    run under ``torch.distributed.run``); ``overrides`` win (``max_steps``, ``limit_val_batches``...).
    Test files keep only small helpers that call it with their own defaults."""
    from lightning.pytorch import Trainer

    options: dict[str, Any] = dict(accelerator="cpu", devices=processes, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False)
    if processes > 1:
        from datetime import timedelta

        from lightning.pytorch.strategies import DDPStrategy

        options["strategy"] = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=90))
    if root is not None:
        options["default_root_dir"] = str(root)
    options.update(overrides)
    return Trainer(callbacks=list(callbacks), **options)
