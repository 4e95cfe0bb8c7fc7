"""Checks of a run made before its first batch, as plain functions the CLI and `RunGuard` call:
the checkpoint given to resume from (readable, and made by the configured model), and the paths the
run will write (writable). Each failure is a `StackError` naming the key, the value and the fix."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from stacktrain.errors import StackError

__all__ = [
    "LIGHTNING_CKPT_NAMES",
    "load_checkpoint",
    "hparam_differences",
    "shape_differences",
    "check_checkpoint_matches",
    "require_writable_dir",
]

#: ``ckpt_path`` values Lightning resolves itself (not files).
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
_KEY = "ckpt_path"


def load_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path`` loaded on the CPU; a `StackError` when it is missing, unreadable,
    truncated or not a Lightning checkpoint (torch's own errors are tracebacks about zip archives)."""
    if not os.path.isfile(path):
        what = "is a directory, not a checkpoint file" if os.path.isdir(path) else "does not exist"
        raise StackError(what, key=_KEY, value=path,
                         fix="give the path of a .ckpt file (e.g. runs/stacktrain/<run>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and EOF errors: a truncated or foreign file
        detail = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise StackError(f"is not a readable checkpoint: truncated, corrupt or not a checkpoint file ({detail})",
                         key=_KEY, value=path,
                         fix="resume from another checkpoint of the run (an earlier epoch's, or last.ckpt)") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise StackError("is not a Lightning checkpoint (it holds no state_dict)", key=_KEY, value=path,
                         fix="give a .ckpt file written by a stacktrain / Lightning run")
    return dict(checkpoint)


def _plain(value: Any) -> Any:
    """Comparable form of a config value: namespaces and mappings as dicts, tuples as lists, ints as floats."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def hparam_differences(saved: Mapping[str, Any], configured: Any) -> list[str]:
    """What differs between a checkpoint's ``hyper_parameters`` and the configured model (a
    ``class_path`` + ``init_args`` namespace or dict), as ``key: config X, checkpoint Y`` lines.
    Only keys present on both sides are compared (optimizer and scheduler are not hyperparameters)."""
    config = _plain(configured) or {}
    diffs: list[str] = []
    saved_class = saved.get("_class_path")
    if saved_class and config.get("class_path") and saved_class != config["class_path"]:
        diffs.append(f"model class: config {config['class_path']}, checkpoint {saved_class}")
    init_args = config.get("init_args") or {}
    for key, value in saved.items():
        if key.startswith("_") or key not in init_args:
            continue
        mine, theirs = _plain(init_args[key]), _plain(value)
        if not _same(mine, theirs):
            diffs.append(f"{key}: config {_short(mine)}, checkpoint {_short(theirs)}")
    return diffs


def _short(value: Any) -> str:
    text = repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def shape_differences(saved: Mapping[str, Any], model: Mapping[str, torch.Tensor], limit: int = 3) -> list[str]:
    """Weights whose shapes differ, and weights only one side has, between a checkpoint's
    ``state_dict`` and the model's (the first ``limit`` of each kind, then a count)."""
    resized = [f"{k} {list(v.shape)} in the checkpoint, {list(model[k].shape)} in the model"
               for k, v in saved.items() if k in model and isinstance(v, torch.Tensor) and v.shape != model[k].shape]
    missing = [k for k in model if k not in saved]
    unexpected = [k for k in saved if k not in model]
    out: list[str] = []
    for label, items in (("shape", resized), ("not in the checkpoint", missing), ("only in the checkpoint", unexpected)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            out.append(f"{label}: {', '.join(items[:limit])}{more}")
    return out


def check_checkpoint_matches(path: str, checkpoint: Mapping[str, Any], configured_model: Any,
                             model_state: Mapping[str, torch.Tensor] | None, *, compaction_handled: bool) -> None:
    """Refuse a checkpoint whose model is not the configured one (hyperparameters or weights' shapes).
    ``compaction_handled``: a `PruneRegrow` in the run resizes the model to a compacted checkpoint."""
    diffs = hparam_differences(checkpoint.get("hyper_parameters") or {}, configured_model) if configured_model else []
    if diffs:
        raise StackError(f"was trained with another model than the config's ({'; '.join(diffs[:4])})",
                         key=_KEY, value=path,
                         fix="resume with the config the checkpoint was trained with (its config.yaml in the run "
                             "directory), or train the config from scratch without --ckpt_path")
    if model_state is None:
        return
    compacted = bool((checkpoint.get("callbacks") or {}).get("PruneRegrow", {}).get("compacted", False))
    if compacted and compaction_handled:
        return
    diffs = shape_differences(checkpoint["state_dict"], model_state)
    if not diffs:
        return
    if compacted:
        raise StackError("holds a network compacted by PruneRegrow (smaller layers) and this run has no PruneRegrow "
                         f"to rebuild them ({diffs[0]})", key=_KEY, value=path,
                         fix="resume with the config the checkpoint was trained with (PruneRegrow in "
                             "trainer.callbacks), or export it with stacktrain.export.export_compact")
    raise StackError(f"does not fit the configured model's weights ({'; '.join(diffs)})", key=_KEY, value=path,
                     fix="resume with the config the checkpoint was trained with (its config.yaml in the run directory)")


def require_writable_dir(path: str, key: str, *, source: str = "stacktrain") -> None:
    """``path`` is a directory the run can create files in, or can be created: else a `StackError`.
    Creates nothing (a probe file in the first existing ancestor is removed at once)."""
    text = os.path.abspath(os.fspath(path))
    existing = text
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise StackError(f"cannot be created: {existing} is a file, not a directory", source=source, key=key,
                         value=path, fix="choose another directory or move the file away")
    try:  # a probe file: os.access says yes to root on read-only mounts and ACLs
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        where = "is not writable" if existing == text else f"cannot be created: {existing} is not writable"
        raise StackError(where, source=source, key=key, value=path,
                         fix="choose a directory you can write to, or fix its permissions")


def output_dirs(trainer: Any, *, checkpoints: bool) -> list[tuple[str, str]]:
    """``(config key, directory)`` of everything the run will write: each logger's ``save_dir``, the
    checkpoint directory (``checkpoints``: fit only) and any report callback's ``dirpath``."""
    out: list[tuple[str, str]] = []
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None) or trainer.default_root_dir
        out.append((f"trainer.logger.init_args.save_dir ({type(logger).__name__})", str(save_dir)))
    if not trainer.loggers:
        out.append(("trainer.default_root_dir", str(trainer.default_root_dir)))
    if checkpoints:
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                out.append((f"{type(callback).__name__}.dirpath", str(callback.dirpath)))
    for callback in trainer.callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath and callback not in trainer.checkpoint_callbacks and isinstance(dirpath, (str, os.PathLike)):
            out.append((f"{type(callback).__name__}.dirpath", os.fspath(dirpath)))
    return out
