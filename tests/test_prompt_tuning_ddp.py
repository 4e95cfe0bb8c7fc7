"""Prompt tuning as 2 CPU processes under DDP (gloo), through the shipped config: both ranks end with
the same prompt, each trained on its own half of the few-shot samples."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS
from ddp_harness import assert_states_equal, check, load_rank_states, run_ddp
from stacktrain.datamodules.shapes import SHAPES
from stacktrain.functional.clip import create_clip_model

pytestmark = pytest.mark.ddp


def test_prompt_tuning_on_two_processes_keeps_the_prompt_identical(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "micro.pt"
    torch.save(create_clip_model("stacktrain-micro-clip").state_dict(), weights)
    result = check(run_ddp(
        ["fit", "--config", str(CONFIGS / "prompt_tuning_noisy.yaml"), "--trainer.logger", "false",
         "--model.init_args.model_name", "stacktrain-micro-clip", "--model.init_args.pretrained", str(weights),
         "--model.init_args.n_ctx", "4", "--model.init_args.shots", "4", "--model.init_args.cache_features", "false",
         "--trainer.max_steps", "4", "--trainer.check_val_every_n_epoch", "1",
         "--data.init_args.train_size", "120", "--data.init_args.val_size", "40", "--data.init_args.test_size", "40",
         "--data.init_args.batch_size", "8", "--data.init_args.augment", "true"],
        workdir=tmp_path, dump_dir=tmp_path / "ranks",
    ))
    # 40 few-shot samples over 2 ranks, batch 8: 2 steps per epoch on each rank
    assert "stacktrain: fit finished after 4 steps" in result.stdout and "val/zero_shot_acc=" in result.stdout
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    assert rank0["global_step"] == rank1["global_step"] == 4
    assert_states_equal(rank0["model"], rank1["model"])
    from stacktrain.lightning_modules import PromptTunedCLIP

    fresh = PromptTunedCLIP("stacktrain-micro-clip", pretrained=str(weights), n_ctx=4, shots=4,
                            class_specific_context=True, class_names=SHAPES)
    assert not torch.equal(fresh.prompt.ctx, rank0["model"]["prompt.ctx"])  # it trained
    assert torch.equal(fresh.model.logit_scale, rank0["model"]["model.logit_scale"])  # the towers did not
