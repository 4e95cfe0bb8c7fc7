"""Shared test setup: W&B offline and quiet, small models, and cleanup of W&B runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def micro_clip(tmp_path_factory) -> str:
    """A randomly initialised micro CLIP saved as a plain open_clip weights file (``pretrained=``)."""
    import torch

    from stacktrain.functional.clip import create_clip_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "micro.pt"
    torch.save(create_clip_model("stacktrain-micro-clip").state_dict(), path)
    return str(path)
