"""Every shipped config builds (model, data, trainer and its callbacks) as `python train.py` would,
without training: a config that points at a missing schedule file or names a wrong key fails here."""

from __future__ import annotations

import glob
import os

import pytest
from conftest import REPO

CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))
#: configs whose model needs pretrained CLIP weights (a file the user pretrains first)
NEEDS_CLIP_WEIGHTS = {"prompt_tuning_noisy.yaml", "prompt_tuning_unsupervised.yaml", "stack_clip.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.basename(c) for c in CONFIGS])
def test_shipped_config_builds(config, tmp_path, monkeypatch):
    from stacktrain.cli import StackCLI

    if os.path.basename(config) in NEEDS_CLIP_WEIGHTS:
        pytest.skip("needs pretrained CLIP weights (covered by tests/test_stacks.py and test_prompt_tuning*.py)")
    monkeypatch.chdir(REPO)  # configs name files relative to the repository root (schedules)
    cli = StackCLI(args=["--config", config, "--trainer.logger", "false",
                         "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model is not None and cli.datamodule is not None
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    if "token_dropout" in os.path.basename(config):
        assert "TokenDropout" in names
