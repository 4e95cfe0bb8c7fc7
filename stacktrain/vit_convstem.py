"""A small ViT with a convolutional stem, registered with timm as ``vit_convstem_tiny``.

Why: on the cluttered digits (6000 training images, 32 px) a plain ViT with 4x4 patches learns
almost nothing (test accuracy about 0.2, benchmarks/results/calibration.json) while a small CNN
reaches 0.89: at this data scale the linear patch projection gives the transformer no locality.
A few 3x3 conv + BN + ReLU layers before the patch projection ("early convolutions", Xiao et al.
2021) supply it, and the transformer still sees the same 64 tokens.

The stem convolutions have stride 1 and keep the image size, so the patch projection ``proj`` is an
ordinary timm ``PatchEmbed`` projection (kernel = stride = ``patch_size``) over ``stem_channels``
feature maps instead of pixels. That keeps the geometry every consumer reads from
``patch_embed.proj`` true: timm's grid and position embeddings, ``ViTCostModel.from_vit``'s patch size
and token count, and `FlexiPatchConv` patch scaling (which swaps ``proj`` only; the stem then runs
at full resolution whatever the patch scale). A strided stem would be cheaper but would make the
projection's kernel differ from the patch size that those consumers assume.

The model is timm's own ``VisionTransformer`` with `ConvStemPatchEmbed` as its ``embed_layer``, so
everything that handles a timm ViT (token dropout's ``patch_drop`` slot, ``dynamic_img_size``,
``forward_features`` / ``forward_head``) handles it. Defaults are the benchmarks' small ViT on
32 px images (patch 4, width 96, depth 6, 4 heads, MLP ratio 2) with a 3-layer, 32-channel stem and
average pooling (configs/vit_convstem_cluttered.yaml)::

    ImageClassifier(model_name="vit_convstem_tiny", in_chans=1, model_kwargs={"stem_channels": 16})
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from stacktrain.errors import StackError

__all__ = ["ConvStemPatchEmbed", "stem_macs"]


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose projection reads ``stem_layers`` stride-1 3x3 conv + BN + ReLU layers
    of ``stem_channels`` channels instead of the raw image.

    Same interface as ``PatchEmbed`` (``img_size``, ``patch_size``, ``grid_size``, ``num_patches``,
    ``feat_ratio``, ``dynamic_feat_size``, ``set_input_size``, ``flatten`` / ``output_fmt``,
    ``strict_img_size``): the stem keeps the spatial size, so all of them mean what they mean in timm.
    Takes the keyword arguments timm's ``VisionTransformer`` passes to its ``embed_layer``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        stem_channels: int = 32,
        stem_layers: int = 3,
        norm_layer: Callable[..., nn.Module] | None = None,
        flatten: bool = True,
        output_fmt: str | None = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        for key, value in (("stem_channels", stem_channels), ("stem_layers", stem_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StackError(
                    "must be a whole number >= 1", source="model", key=f"model.init_args.model_kwargs.{key}",
                    value=value, fix="e.g. stem_channels: 32, stem_layers: 2 (use a plain timm ViT for no stem)",
                )
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=stem_channels, embed_dim=embed_dim,
            norm_layer=norm_layer, flatten=flatten, output_fmt=output_fmt, bias=bias,
            strict_img_size=strict_img_size, dynamic_img_pad=dynamic_img_pad, device=device, dtype=dtype,
        )
        self.in_chans = in_chans
        self.stem_channels = stem_channels
        layers: list[nn.Module] = []
        channels = in_chans
        for _ in range(stem_layers):
            layers += [
                nn.Conv2d(channels, stem_channels, 3, padding=1, bias=False, device=device, dtype=dtype),
                nn.BatchNorm2d(stem_channels, device=device, dtype=dtype),
                nn.ReLU(inplace=True),
            ]
            channels = stem_channels
        # Registration order = forward order (stem, proj, norm): `stacktrain.models.first_conv` and timm's
        # `first_conv` find the stem's first convolution, the one that sees the image's channels.
        proj, norm = self.proj, self.norm
        del self.proj, self.norm
        self.stem = nn.Sequential(*layers)
        self.proj, self.norm = proj, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.stem(x))


def stem_macs(embed: nn.Module, image_size: tuple[int, int] | None = None) -> int:
    """Multiply-adds per sample of the stem convolutions of ``embed`` (a `ConvStemPatchEmbed`; 0 for any
    other patch embedding) on ``image_size`` images (default ``embed.img_size``).

    The hand count of what `ViTCostModel.from_vit` measures with the flop counter (its ``stem_flops`` is
    twice this, a multiply-add being 2 FLOPs). The stem runs on the full image before token dropout and
    patch scaling, so neither compression reduces it.
    """
    stem = getattr(embed, "stem", None)
    if stem is None:
        return 0
    height, width = image_size if image_size is not None else embed.img_size
    total = 0
    for module in stem.modules():
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += module.out_channels * (module.in_channels // module.groups) * kh * kw * height * width
    return total


default_cfgs = generate_default_cfgs({
    "vit_convstem_tiny": dict(num_classes=10, input_size=(3, 32, 32), fixed_input_size=True, mean=(0.5,),
                              std=(0.5,), first_conv="patch_embed.stem.0", classifier="head"),
})


@register_model
def vit_convstem_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm ``VisionTransformer`` with a conv stem (``stem_channels``, ``stem_layers``) before the patch
    projection. Defaults, the setting measured on the cluttered digits (0.80 test accuracy in 15 epochs,
    seed 0; 2 stem layers and class-token pooling gave 0.68, the plain ViT 0.20): 32 px images, patch 4
    (64 tokens), width 96, depth 6, 4 heads, MLP ratio 2, a 3-layer stem of 32 channels, average pooling
    of the patch tokens (the class token is kept, so token dropout has its usual prefix token)."""
    stem = dict(stem_channels=kwargs.pop("stem_channels", 32), stem_layers=kwargs.pop("stem_layers", 3))
    if "embed_layer" in kwargs:
        raise StackError("is set by vit_convstem_tiny itself", source="model",
                         key="model.init_args.model_kwargs.embed_layer", value=kwargs["embed_layer"],
                         fix="remove embed_layer; set stem_channels / stem_layers instead")
    model_args = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0, num_classes=10,
                      global_pool="avg")
    return build_model_with_cfg(
        VisionTransformer, "vit_convstem_tiny", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        embed_layer=partial(ConvStemPatchEmbed, **stem), **dict(model_args, **kwargs),
    )
