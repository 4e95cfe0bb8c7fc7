"""``pretrained: stacktrain-tiny-clip``: a name that resolves to the cached tiny CLIP, pretrained (with
progress output) on first use, so the prompt-tuning and CLIP-stack configs run with one command.
The recipes are shrunk to a few steps here (the cache key follows the recipe), and the cache is a
temporary folder: nothing here touches the user's ``~/.cache/stacktrain``."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import REPO

from stacktrain.errors import StackError
from stacktrain.lightning_modules import clip_pretrain
from stacktrain.lightning_modules.clip_pretrain import STACKTRAIN_PRETRAINED, resolve_pretrained

CLIP_CONFIGS = ["prompt_tuning_noisy.yaml", "prompt_tuning_unsupervised.yaml", "stack_clip.yaml"]


@pytest.fixture
def fast_recipes(tmp_path, monkeypatch):
    """A temporary cache, and the named recipes shortened to 2 steps of 8 images."""
    monkeypatch.setenv("STACKTRAIN_CACHE", str(tmp_path / "cache"))
    for name, recipe in list(STACKTRAIN_PRETRAINED.items()):
        monkeypatch.setitem(STACKTRAIN_PRETRAINED, name, dict(recipe, steps=2, batch_size=8))
    return tmp_path / "cache"


def test_a_name_pretrains_once_with_progress_then_comes_from_the_cache(fast_recipes, capsys, monkeypatch):
    path = resolve_pretrained("stacktrain-micro-clip", "stacktrain-micro-clip")
    printed = capsys.readouterr().out
    assert "is not in the cache yet: pretraining it once" in printed
    assert "pretrain_clip: step 2/2" in printed  # progress lines name the step and the total
    assert os.path.dirname(path) == str(fast_recipes) and os.path.isfile(path)
    assert os.path.isfile(path.replace(".pt", ".json"))  # the recipe and the time beside the weights
    assert not list(fast_recipes.glob("*partial*"))

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the cached weights must be reused")

    monkeypatch.setattr(clip_pretrain, "pretrain_clip", no_pretraining)
    assert resolve_pretrained("stacktrain-micro-clip", "stacktrain-micro-clip") == path
    assert capsys.readouterr().out == ""


def test_a_changed_recipe_gets_its_own_file(fast_recipes, monkeypatch):
    first = resolve_pretrained("stacktrain-micro-clip", "stacktrain-micro-clip")
    monkeypatch.setitem(STACKTRAIN_PRETRAINED, "stacktrain-micro-clip",
                        dict(STACKTRAIN_PRETRAINED["stacktrain-micro-clip"], steps=3))
    second = resolve_pretrained("stacktrain-micro-clip", "stacktrain-micro-clip")
    assert first != second and os.path.isfile(first) and os.path.isfile(second)


def test_tags_files_and_none_pass_through_unchanged(micro_clip, fast_recipes):
    assert resolve_pretrained("ViT-B-32", "openai") == "openai"  # open_clip downloads it, as before
    assert resolve_pretrained("stacktrain-micro-clip", micro_clip) == micro_clip
    assert resolve_pretrained("stacktrain-micro-clip", None) is None
    assert not fast_recipes.exists()  # nothing was pretrained


def test_a_name_for_another_architecture_is_refused_before_pretraining(fast_recipes):
    from stacktrain.lightning_modules import PromptTunedCLIP

    with pytest.raises(StackError, match=r"model.init_args.pretrained='stacktrain-tiny-clip' are weights of model "
                                         r"'stacktrain-tiny-clip', not of 'ViT-B-32'.*model_name: stacktrain-tiny-clip"):
        PromptTunedCLIP("ViT-B-32", pretrained="stacktrain-tiny-clip")
    assert not fast_recipes.exists()


def test_prompt_tuning_and_pretraining_load_the_named_weights(fast_recipes):
    from stacktrain.lightning_modules import CLIPPretraining, PromptTunedCLIP

    model = PromptTunedCLIP("stacktrain-micro-clip", pretrained="stacktrain-micro-clip", n_ctx=4)
    assert model.hparams.pretrained == "stacktrain-micro-clip"  # the name, not the machine's path
    (path,) = fast_recipes.glob("stacktrain-micro-clip-*.pt")
    weights = torch.load(path, weights_only=True)
    assert torch.equal(model.model.visual.conv1.weight, weights["visual.conv1.weight"])
    again = CLIPPretraining("stacktrain-micro-clip", pretrained="stacktrain-micro-clip", export_weights=None)
    assert torch.equal(again.model.visual.conv1.weight, weights["visual.conv1.weight"])


@pytest.mark.parametrize("config", CLIP_CONFIGS)
def test_clip_configs_build_on_a_fresh_machine(config, fast_recipes, tmp_path, monkeypatch):
    """What ``python train.py fit --config configs/<config>`` builds with an empty cache: the tiny CLIP is
    pretrained first, with no path to paste in."""
    from stacktrain.cli import StackCLI

    monkeypatch.chdir(REPO)
    cli = StackCLI(args=["--config", str(REPO / "configs" / config), "--trainer.logger", "false",
                         "--trainer.default_root_dir", str(tmp_path / "runs")], run=False)
    assert cli.model.hparams.pretrained == "stacktrain-tiny-clip"
    assert len(list(fast_recipes.glob("stacktrain-tiny-clip-*.pt"))) == 1


def test_the_noisy_config_trains_with_one_command(fast_recipes, tmp_path, monkeypatch):
    from stacktrain.cli import StackCLI

    monkeypatch.chdir(REPO)
    cli = StackCLI(args=["fit", "--config", str(REPO / "configs" / "prompt_tuning_noisy.yaml"),
                         "--trainer.logger", "false", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                         "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
                         "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert cli.trainer.global_step == 2
    assert cli.model.zero_shot_accuracy is not None
