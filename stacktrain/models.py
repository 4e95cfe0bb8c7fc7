"""Model helpers shared by the LightningModules: timm creation with clear errors, input checks.

No Lightning here: these take and return plain ``nn.Module``s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import timm
from torch import nn

import stacktrain.vgg  # noqa: F401  (registers timm's `stacktrain_vgg`, the benchmarks' CNN)
import stacktrain.vit_convstem  # noqa: F401  (registers timm's `vit_convstem_tiny`, a ViT with a conv stem)
from stacktrain.errors import StackError, closest_names, require_existing_path


def create_timm_model(
    model_name: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    pretrained: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    source: str = "model",
    key_prefix: str = "model.init_args",
) -> nn.Module:
    """``timm.create_model`` with errors that name the key, the value and the fix.

    ``pretrained`` is a local weights file (``.pth``, ``.bin``, ``.safetensors``), loaded through
    timm's own mechanism (``pretrained_cfg_overlay=dict(file=...)``), so a classifier with another
    number of classes or input channels is adapted the way timm adapts its released weights.
    """
    if not isinstance(model_name, str):
        raise StackError(
            f"must be a model name (a string), got {type(model_name).__name__}", source=source,
            key=f"{key_prefix}.model_name", value=model_name, fix="use a name from timm.list_models(), e.g. 'resnet18'",
        )
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if ":" not in model_name and not timm.is_model(model_name):
        close = closest_names(model_name, timm.list_models())
        raise StackError(
            "is not a timm model" + (f"; closest: {', '.join(close)}" if close else ""),
            source=source,
            key=f"{key_prefix}.model_name",
            value=model_name,
            fix="use a name from timm.list_models(), e.g. 'resnet18' or 'vit_tiny_patch16_224'",
        )
    if pretrained:
        path = require_weights_file(pretrained, f"{key_prefix}.pretrained", source=source)
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = dict(file=path)
    try:
        return timm.create_model(model_name, **kwargs)
    except TypeError as error:
        raise StackError(
            f"cannot build {model_name}: {error}",
            source=source,
            key=f"{key_prefix}.model_kwargs",
            value=model_kwargs,
            fix="remove or rename the keyword the model does not take",
        ) from error
    except Exception as error:  # a file that is not a state_dict: UnpicklingError, RuntimeError, SafetensorError...
        if not pretrained:
            raise
        raise StackError(
            f"cannot be loaded into {model_name} ({type(error).__name__}: {_first_line(error)})",
            source=source, key=f"{key_prefix}.pretrained", value=pretrained,
            fix="pass a weights file saved with torch.save(model.state_dict()) or safetensors for this architecture",
        ) from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def require_weights_file(path: str, key: str, *, source: str) -> str:
    """``path`` if it is an existing, readable file (not a folder), else a `StackError` naming it."""
    path = require_existing_path(path, key, source=source)
    if not os.path.isfile(path):
        raise StackError("is a folder, not a weights file", source=source, key=key, value=path,
                         fix="pass the path of the weights file itself (.pth, .bin, .safetensors)")
    return path


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first ``Conv2d`` in registration order (the stem or a ViT's patch embedding)."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def check_input_shape(
    model: nn.Module, image_shape: Sequence[int], *, source: str, key_prefix: str = "model.init_args"
) -> None:
    """Raise `StackError` if ``model`` cannot take images of ``image_shape`` = (C, H, W).

    Checks the input channels of the first convolution and, for timm ViTs with a fixed input
    size, the patch embedding's ``img_size`` and that the patch size divides the image.
    """
    channels, height, width = (int(v) for v in image_shape)
    conv = first_conv(model)
    if conv is not None and conv.in_channels != channels:
        raise StackError(
            f"the model takes {conv.in_channels}-channel images but the data gives {channels} channels",
            source=source,
            key=f"{key_prefix}.in_chans",
            value=conv.in_channels,
            fix=f"set {key_prefix}.in_chans: {channels} (or change the data module's channels)",
        )
    for module in model.modules():
        patch_size = getattr(module, "patch_size", None)
        img_size = getattr(module, "img_size", None)
        if patch_size is None or not isinstance(getattr(module, "proj", None), nn.Conv2d):
            continue
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        strict = getattr(module, "strict_img_size", False) and not getattr(module, "dynamic_img_pad", False)
        if strict and img_size is not None and tuple(img_size) != (height, width):
            raise StackError(
                f"the ViT is built for {tuple(img_size)} images but the data gives {(height, width)}",
                source=source,
                key=f"{key_prefix}.model_kwargs.img_size",
                value=tuple(img_size),
                fix=f"set {key_prefix}.model_kwargs.img_size: {height} (or dynamic_img_size: true)",
            )
        if height % ph or width % pw:
            raise StackError(
                f"patch size {(ph, pw)} does not divide the image size {(height, width)}",
                source=source,
                key=f"{key_prefix}.model_kwargs.patch_size",
                value=(ph, pw),
                fix="pick a patch size that divides the image size, or resize the data",
            )
        break


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

