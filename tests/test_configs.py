"""Every shipped config builds (model, data, trainer and its callbacks) as `python train.py` would,
without training, and what it builds is what the file says: the model and data classes with the
file's arguments, and every technique callback it lists attached once, configured as written."""

from __future__ import annotations

import glob
import os
from typing import Any

import pytest
import yaml
from conftest import REPO, random_clip_weights

from stacktrain.functional.token_dropout_schedule import AccelerationSchedule, read_schedule_file

CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))
#: configs whose model loads the cached tiny CLIP by name (given here as a random tiny CLIP's file, so
#: that building them does not pretrain it)
NEEDS_CLIP_WEIGHTS = {"prompt_tuning_noisy.yaml", "prompt_tuning_unsupervised.yaml", "stack_clip.yaml"}
#: init arguments that are factories (built by the CLI into callables), not values to compare
FACTORIES = {"optimizer", "lr_scheduler"}
#: arguments kept under another attribute name
RENAMED = {
    "GradientQuantization": {"hypernet": "hypernet_kind"},
    "ClutteredDigitsDataModule": {key: f"render.{key}" for key in ("clutter", "fragment_size", "noise")},
}


@pytest.fixture(scope="module")
def tiny_clip_weights(tmp_path_factory) -> str:
    """Random weights of the configs' model (stacktrain-tiny-clip) as an open_clip weights file."""
    return random_clip_weights(tmp_path_factory.mktemp("clip"), "stacktrain-tiny-clip")


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: YAML has no tuples."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_token_dropout(callback: Any, args: dict[str, Any]) -> set[str]:
    """TokenDropout keeps its schedule settings in an `AccelerationSchedule`: compare that."""
    if "schedule_file" in args:
        assert callback.schedule_file == args["schedule_file"]
        assert callback.schedule == read_schedule_file(str(REPO / args["schedule_file"]))[0]
        return {"schedule_file"}
    expected = AccelerationSchedule(shape=args.get("schedule", "constant"), keep_ratio=args.get("keep_ratio", 0.5),
                                    patch_scale=args.get("patch_scale", 1), until=args.get("until", 1.0))
    assert callback.schedule == expected
    return {"schedule", "keep_ratio", "patch_scale", "until"} & set(args)


def _check_arguments(obj: Any, args: dict[str, Any], checked: set[str] = frozenset()) -> None:
    """Every argument of the file is an attribute (or saved hyperparameter) of ``obj`` with that value."""
    hparams = getattr(obj, "hparams", {})
    renamed = RENAMED.get(type(obj).__name__, {})
    for key, value in args.items():
        if key in checked or key in FACTORIES:
            continue
        key = renamed.get(key, key)
        if key in hparams:
            actual = hparams[key]
        elif "." in key:  # a setting kept in a dict attribute
            holder, item = key.split(".")
            actual = getattr(obj, holder)[item]
        else:
            assert hasattr(obj, key), f"{type(obj).__name__} has no attribute {key!r} to check against the config"
            actual = getattr(obj, key)
        assert _plain(actual) == _plain(value), f"{type(obj).__name__}.{key} = {actual!r}, the config says {value!r}"


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.basename(c) for c in CONFIGS])
def test_shipped_config_builds_what_it_says(config, tmp_path, monkeypatch, tiny_clip_weights):
    from stacktrain.cli import StackCLI

    monkeypatch.chdir(REPO)  # configs name files relative to the repository root (schedules)
    content = yaml.safe_load(open(config))
    args = ["--config", config, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    if os.path.basename(config) in NEEDS_CLIP_WEIGHTS:
        args += ["--model.init_args.pretrained", tiny_clip_weights]
    cli = StackCLI(args=args, run=False)

    model_args = dict(content["model"].get("init_args") or {})
    assert type(cli.model).__name__ == content["model"]["class_path"].rsplit(".", 1)[-1]
    if os.path.basename(config) in NEEDS_CLIP_WEIGHTS:
        assert model_args.pop("pretrained") == "stacktrain-tiny-clip"  # resolved to the cached weights
        assert cli.model.hparams.pretrained == tiny_clip_weights
    _check_arguments(cli.model, model_args)

    data = content["data"]
    assert type(cli.datamodule).__name__ == data["class_path"].rsplit(".", 1)[-1]
    data_args = dict(data.get("init_args") or {})
    base = data_args.pop("base", None)
    _check_arguments(cli.datamodule, data_args)
    if base is not None:  # a multi-view module wraps its base data module
        assert type(cli.datamodule.base).__name__ == base["class_path"].rsplit(".", 1)[-1]
        _check_arguments(cli.datamodule.base, base.get("init_args") or {})

    trainer_args = {k: v for k, v in (content.get("trainer") or {}).items() if k in ("max_epochs", "max_steps")}
    _check_arguments(cli.trainer, trainer_args)

    listed = [entry for entry in (content.get("trainer") or {}).get("callbacks") or []]
    attached = {type(c).__name__: c for c in cli.trainer.callbacks}
    for entry in listed:
        name = entry["class_path"].rsplit(".", 1)[-1]
        assert sum(type(c).__name__ == name for c in cli.trainer.callbacks) == 1, f"{name} attached != once"
        callback_args = dict(entry.get("init_args") or {})
        checked = _check_token_dropout(attached[name], callback_args) if name == "TokenDropout" else set()
        _check_arguments(attached[name], callback_args, checked)
    techniques = {"TokenDropout", "PruneRegrow", "GradientQuantization"}
    listed_techniques = {e["class_path"].rsplit(".", 1)[-1] for e in listed} & techniques
    assert set(attached) & techniques == listed_techniques  # nothing attached that the file does not list
