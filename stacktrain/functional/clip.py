"""open_clip models by name with clear errors, stacktrain's tiny model configs, zero-shot helpers.

No Lightning here. stacktrain ships small CLIP configs (``stacktrain-tiny-clip``,
``stacktrain-micro-clip``) in ``clip_configs/``; `register_model_configs` adds that folder to
open_clip's registry (``open_clip.add_model_config``). Importing this module registers them, and
`create_clip_model` / `clip_tokenizer` register again if needed, so every process (DDP children
included) finds them before ``create_model`` / ``get_tokenizer``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from stacktrain.errors import StackError, closest_names

__all__ = [
    "CONFIG_DIR",
    "STACKTRAIN_CLIP_MODELS",
    "register_model_configs",
    "create_clip_model",
    "clip_tokenizer",
    "encode_images",
    "zero_shot_weights",
    "clip_logits",
    "check_image_shape",
]

CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
STACKTRAIN_CLIP_MODELS = tuple(sorted(path.stem for path in CONFIG_DIR.glob("*.json")))
_SCHEMAS = ("hf-hub:", "local-dir:")


def register_model_configs() -> None:
    """Make stacktrain's model configs known to open_clip in this process (idempotent)."""
    if all(name in open_clip.list_models() for name in STACKTRAIN_CLIP_MODELS):
        return
    open_clip.add_model_config(CONFIG_DIR)


register_model_configs()


def _check_model_name(model_name: str, *, source: str, key: str) -> None:
    register_model_configs()
    if model_name.startswith(_SCHEMAS):
        return
    if model_name.replace("/", "-") not in open_clip.list_models():
        close = closest_names(model_name, open_clip.list_models())
        raise StackError(
            "is not an open_clip model" + (f"; closest: {', '.join(close)}" if close else ""),
            source=source, key=key, value=model_name,
            fix="use a name from open_clip.list_models(), e.g. 'ViT-B-32', or 'stacktrain-tiny-clip' offline",
        )


def _check_pretrained(model_name: str, pretrained: str, *, source: str, key: str) -> None:
    if model_name.startswith(_SCHEMAS) or os.path.isfile(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
    if pretrained in tags:
        return
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz")):
        problem = "does not exist"
    else:
        problem = f"is neither a local weights file nor a released tag of {model_name}"
        problem += f" (tags: {', '.join(tags)})" if tags else " (it has no released tags)"
    raise StackError(
        problem, source=source, key=key, value=pretrained,
        fix="pass the path of a weights file (an open_clip state_dict, e.g. saved by CLIPPretraining), a released tag, "
        "or offline 'stacktrain-tiny-clip' (with model_name stacktrain-tiny-clip)",
    )


def create_clip_model(
    model_name: str,
    pretrained: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    *,
    source: str = "model",
    key_prefix: str = "model.init_args",
) -> nn.Module:
    """``open_clip.create_model`` with errors that name the key, the value and the fix.

    ``pretrained`` is anything open_clip accepts: a released tag (``"openai"``, downloaded by
    open_clip) or a local file holding the model's ``state_dict``. ``model_kwargs`` go to
    ``create_model`` (``force_image_size``, ``precision``, ...). The model is returned in train mode
    as open_clip leaves it; callers freeze or train it.
    """
    _check_model_name(model_name, source=source, key=f"{key_prefix}.model_name")
    if pretrained:
        _check_pretrained(model_name, pretrained, source=source, key=f"{key_prefix}.pretrained")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained or None, **(model_kwargs or {}))
    except TypeError as error:
        raise StackError(
            f"cannot build {model_name}: {error}", source=source, key=f"{key_prefix}.model_kwargs",
            value=model_kwargs, fix="remove or rename the keyword open_clip.create_model does not take",
        ) from error
    except Exception as error:  # a foreign or corrupt file: RuntimeError, UnpicklingError, IndexError, KeyError...
        if not pretrained:
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise StackError(
            f"cannot be loaded into {model_name} ({type(error).__name__}: {first_line})", source=source, key=f"{key_prefix}.pretrained",
            value=pretrained, fix=f"pass the model_name these weights were trained with, or weights made for {model_name}",
        ) from error


@functools.lru_cache(maxsize=8)
def clip_tokenizer(model_name: str) -> Any:
    """The tokenizer of ``model_name`` (works offline for CLIP's own BPE tokenizer). Built once per
    process and name: reading the BPE merges takes a noticeable fraction of a second."""
    register_model_configs()
    return open_clip.get_tokenizer(model_name)


def encode_images(model: nn.Module, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Image features of ``images`` (the visual tower's output, L2-normalized by default)."""
    features = model.encode_image(images)
    return F.normalize(features, dim=-1) if normalize else features


@torch.no_grad()
def zero_shot_weights(model: nn.Module, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot class embeddings ``[C, D]``: each class's normalized text features averaged over the
    templates (``"a photo of a {}."``) and normalized again, as open_clip's
    ``build_zero_shot_classifier`` computes them."""
    device = next(model.parameters()).device
    weights = open_clip.build_zero_shot_classifier(
        model, tokenizer=tokenizer, classnames=list(class_names), templates=list(templates), device=device,
    )
    return weights.T.contiguous()


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's logits: the model's own (learned, log-space) scale times cosine similarity of
    normalized features. ``text_features`` is ``[C, D]``."""
    return logit_scale.exp() * image_features @ text_features.T


def check_image_shape(model: nn.Module, image_shape: Sequence[int] | None, *, source: str) -> None:
    """Raise `StackError` if the data's images (``image_shape`` = (C, H, W)) do not fit the visual
    tower: CLIP takes 3-channel images of its configured size."""
    if image_shape is None:
        return
    channels, height, width = (int(v) for v in image_shape)
    if channels != 3:
        raise StackError(
            f"CLIP takes 3-channel images but the data gives {channels} channel(s)", source=source,
            key="data.init_args.channels", value=channels, fix="set data.init_args.channels: 3",
        )
    expected = getattr(model.visual, "image_size", None)
    if expected is not None:
        expected = (expected, expected) if isinstance(expected, int) else tuple(expected)
        if expected != (height, width):
            raise StackError(
                f"the model takes {expected} images but the data gives {(height, width)}", source=source,
                key="data.init_args.image_size", value=height,
                fix=f"set data.init_args.image_size: {expected[0]} (or model_kwargs.force_image_size: {height})",
            )
