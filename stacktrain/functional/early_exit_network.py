"""A timm backbone cut into segments that end at exit points, with a classifier head per exit, and
early-exit inference that really stops computing for samples that have left.

Supported backbones:

* timm CNNs built by ``features_only=True`` as a sequential ``FeatureListNet`` (ResNet, ConvNeXt,
  VGG, RegNet, ...) or ``EfficientNetFeatures`` (EfficientNet, MobileNetV2/V3): exit points are the
  feature stages (``layer1``..``layer4``, ``stages.0``.., ``blocks.N``);
* timm ``VisionTransformer``: exit points are the blocks ``blocks.0``..``blocks.{depth-1}``; the stem
  is the ViT's own patch embedding, position embedding, ``patch_drop`` and ``norm_pre``, so token
  dropout attached to the ViT (``patch_drop``) shortens the sequence that every later segment sees.

No Lightning here.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from stacktrain.errors import StackError
from stacktrain.functional.early_exit import DEFAULT_WEIGHT, ensemble_predictions, ensemble_step, split_gradient
from stacktrain.functional.flops import forward_flops

__all__ = ["StagedBackbone", "ConvExitHead", "TokenExitHead", "BatchSlices", "EarlyExitNetwork"]


class _ViTStem(nn.Module):
    """The ViT up to its first block: patch embedding, position embedding, token dropout, pre-norm."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        tokens = vit._pos_embed(vit.patch_embed(images))
        tokens = vit.patch_drop(tokens)
        return vit.norm_pre(tokens)


class StagedBackbone(nn.Module):
    """The layers of a timm backbone grouped into ``segments`` that end at the chosen exit points.

    Attributes:
        kind: "cnn" or "vit".
        exit_names: the exit points, one per segment.
        exit_channels: feature channels (CNN) or embedding width (ViT) at each exit.
        segments: ``nn.ModuleList``; segment ``s`` maps the previous segment's output (the image
            for the first) to the features at exit ``s``.
        vit: the timm ``VisionTransformer`` itself for ViT backbones (None for CNNs).
        vit_pool: how that ViT pools its tokens for its head (timm's ``global_pool``), which the
            exit heads imitate.
    """

    def __init__(
        self,
        model_name: str,
        exits: Sequence[str | int] | None = None,
        *,
        in_chans: int | None = None,
        pretrained: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        source: str = "BoostedEarlyExit",
        key_prefix: str = "model.init_args",
    ) -> None:
        super().__init__()
        from timm.models import VisionTransformer

        from stacktrain.models import create_timm_model, require_weights_file

        kwargs = dict(model_kwargs or {})
        # Validates the name and the keywords (clear StackErrors) and tells ViTs from CNNs.
        probe = create_timm_model(model_name, num_classes=0, in_chans=in_chans, model_kwargs=kwargs,
                                  source=source, key_prefix=key_prefix)
        self.vit: nn.Module | None = None
        if isinstance(probe, VisionTransformer):
            self.kind = "vit"
            if pretrained:
                probe = create_timm_model(model_name, num_classes=0, in_chans=in_chans, pretrained=pretrained,
                                          model_kwargs=kwargs, source=source, key_prefix=key_prefix)
            layers, points, channels = self._vit_layers(probe)
            self.vit_pool = getattr(probe, "global_pool", "token")
            if self.vit_pool not in TokenExitHead.POOLS:
                raise StackError(
                    f"pools its tokens by {self.vit_pool!r}, which the exit heads cannot imitate",
                    source=source, key=f"{key_prefix}.backbone_kwargs.global_pool", value=self.vit_pool,
                    fix=f"use global_pool one of {TokenExitHead.POOLS}",
                )
        else:
            self.kind = "cnn"
            del probe
            try:
                features = timm.create_model(
                    model_name, features_only=True, in_chans=in_chans or 3, pretrained=bool(pretrained),
                    **({"pretrained_cfg_overlay": dict(file=pretrained)} if pretrained else {}), **kwargs,
                )
            except Exception as error:  # timm raises RuntimeError/ValueError/AttributeError here
                if pretrained:  # the weights file, not the architecture, may be what failed
                    require_weights_file(pretrained, f"{key_prefix}.pretrained", source=source)
                    try:
                        timm.create_model(model_name, features_only=True, in_chans=in_chans or 3, **kwargs)
                    except Exception:
                        pass
                    else:
                        raise StackError(
                            f"cannot be loaded into {model_name} ({type(error).__name__}: "
                            f"{(str(error).strip().splitlines() or [''])[0][:200]})",
                            source=source, key=f"{key_prefix}.pretrained", value=pretrained,
                            fix="pass a weights file saved with torch.save(model.state_dict()) for this backbone",
                        ) from error
                raise StackError(
                    f"has no stages that exits can be attached to ({type(error).__name__}: {error})",
                    source=source, key=f"{key_prefix}.backbone", value=model_name,
                    fix="use a staged timm CNN (resnet18, convnext_atto, vgg11, regnet, efficientnet_b0, "
                        "mobilenetv2_100) or a timm VisionTransformer",
                ) from error
            layers, points, channels = self._cnn_layers(features, model_name, source, key_prefix)
        self.available_exits = points
        chosen = self._choose_exits(exits, points, model_name, source, key_prefix)
        self.exit_names = [points[i] for i in chosen]
        self.exit_channels = [channels[i] for i in chosen]
        self.segments = nn.ModuleList()
        current: list[tuple[str, nn.Module]] = []
        wanted = set(self.exit_names)
        for name, layer in layers:
            current.append((name, layer))
            if name in wanted:
                self.segments.append(nn.Sequential(*[m for _, m in current]))
                current = []
                if len(self.segments) == len(self.exit_names):
                    break
        if len(self.segments) != len(self.exit_names):
            raise StackError(
                f"could not be cut at {self.exit_names} (layers: {[n for n, _ in layers]})",
                source=source, key=f"{key_prefix}.exits", value=list(exits) if exits is not None else None,
                fix="choose exit points among the listed layers",
            )

    # --------------------------------------------------------------------------------- discovery
    def _vit_layers(self, vit: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str], list[int]]:
        self.vit = vit
        # Keep only what the staged forward uses; the final norm and head belong to the exit heads.
        vit.norm = nn.Identity()
        vit.fc_norm = nn.Identity()
        vit.head = nn.Identity()
        layers: list[tuple[str, nn.Module]] = [("stem", _ViTStem(vit))]
        names = [f"blocks.{i}" for i in range(len(vit.blocks))]
        layers += list(zip(names, vit.blocks))
        return layers, names, [vit.embed_dim] * len(names)

    @staticmethod
    def _cnn_layers(features: nn.Module, model_name: str, source: str, key_prefix: str):
        info = getattr(features, "feature_info", None)
        if info is None:
            raise StackError("has no feature stages", source=source, key=f"{key_prefix}.backbone", value=model_name,
                             fix="use a staged timm CNN or a timm VisionTransformer")
        points = [entry["module"] for entry in info.info]
        channels = [entry["num_chs"] for entry in info.info]
        kind = type(features).__name__
        if kind == "FeatureListNet":
            # return_layers maps the flattened layer name to the index of its feature point
            flattened_to_point = {name: points[int(index)] for name, index in features.return_layers.items()}
            layers = [(flattened_to_point.get(name, name), module) for name, module in features.items()]
        elif kind == "EfficientNetFeatures":
            layers = [("conv_stem", features.conv_stem), ("bn1", features.bn1)]
            layers += [(f"blocks.{i}", block) for i, block in enumerate(features.blocks)]
        else:
            raise StackError(
                f"builds its features as {kind}, which cannot be cut into sequential stages",
                source=source, key=f"{key_prefix}.backbone", value=model_name,
                fix="use a staged timm CNN (resnet, convnext, vgg, regnet, efficientnet, mobilenet) or a ViT",
            )
        return layers, points, channels

    @staticmethod
    def _choose_exits(exits, points: list[str], model_name: str, source: str, key_prefix: str) -> list[int]:
        if len(points) == 0:
            raise StackError("has no stages", source=source, key=f"{key_prefix}.backbone", value=model_name,
                             fix="use a backbone with feature stages")
        if exits is None:
            count = min(4, len(points))
            if points[0].startswith("blocks.") and all(p.startswith("blocks.") for p in points):
                # ViT (and other uniform block stacks): four exits evenly spaced, the last at the end
                return sorted({-(-len(points) * (i + 1) // count) - 1 for i in range(count)})
            return list(range(len(points) - count, len(points)))  # CNN: the last stages
        chosen: list[int] = []
        for exit_point in exits:
            if isinstance(exit_point, bool) or not isinstance(exit_point, (int, str)):
                raise StackError("must be stage names or indices", source=source, key=f"{key_prefix}.exits",
                                 value=list(exits), fix=f"use names from {points} or indices 0..{len(points) - 1}")
            if isinstance(exit_point, int):
                if not -len(points) <= exit_point < len(points):
                    raise StackError(
                        f"holds index {exit_point}, outside the backbone's {len(points)} exit points",
                        source=source, key=f"{key_prefix}.exits", value=list(exits),
                        fix=f"use indices 0..{len(points) - 1} (points: {', '.join(points)})",
                    )
                chosen.append(exit_point % len(points))
            else:
                if exit_point not in points:
                    close = difflib.get_close_matches(exit_point, points, n=3)
                    raise StackError(
                        f"names {exit_point!r}, not an exit point of {model_name}"
                        + (f" (closest: {', '.join(close)})" if close else ""),
                        source=source, key=f"{key_prefix}.exits", value=list(exits),
                        fix=f"use names from: {', '.join(points)}",
                    )
                chosen.append(points.index(exit_point))
        if len(chosen) == 0 or chosen != sorted(set(chosen)):
            raise StackError("must be non-empty, without repeats, in the order of the backbone",
                             source=source, key=f"{key_prefix}.exits", value=list(exits),
                             fix=f"list exit points front to back, e.g. {points[-min(3, len(points)):]}")
        return chosen


class ConvExitHead(nn.Module):
    """Classifier on a feature map: optional stride-2 conv-BN-ReLU of ``hidden`` channels, global
    average pooling, linear. Intermediate exits get the conv (MSDNet's CIFAR heads have two stride-2
    convs; one keeps an early head cheap next to its stage); the last exit does not."""

    def __init__(self, channels: int, num_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU(inplace=True)]
            channels = hidden
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class TokenExitHead(nn.Module):
    """Classifier on ViT tokens: LayerNorm, pooling as the ViT's own head pools (timm's
    ``global_pool``: "token" reads the class token, "avg" averages the patch tokens), linear.

    A ViT trained to average its patch tokens keeps its class token only as a passenger; reading that
    token at the exits would train the exits on a different summary than the network's own head.
    A ViT with no prefix token is averaged whatever ``pool`` says."""

    POOLS = ("token", "avg")

    def __init__(self, width: int, num_classes: int, num_prefix_tokens: int = 1, pool: str = "token") -> None:
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"exit heads pool by one of {self.POOLS}, not {pool!r}")
        self.norm = nn.LayerNorm(width)
        self.num_prefix_tokens = num_prefix_tokens
        self.pool = pool if num_prefix_tokens else "avg"
        self.linear = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(tokens)
        pooled = tokens[:, 0] if self.pool == "token" else tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return self.linear(pooled)


class BatchSlices(nn.Module):
    """Runs ``module`` over a batch ``rows`` samples at a time and concatenates the outputs: the same
    result for a module that treats samples independently (inference), with activations small enough
    to stay in cache (see `EarlyExitNetwork.for_inference`)."""

    def __init__(self, module: nn.Module, rows: int) -> None:
        super().__init__()
        self.module = module
        self.rows = rows

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] <= self.rows:
            return self.module(batch)
        return torch.cat([self.module(part) for part in batch.split(self.rows)])


class EarlyExitNetwork(nn.Module):
    """A `StagedBackbone` with one head per exit.

    ``forward(images)`` returns the raw logits of every head (with per-exit gradient rescaling in
    training when ``rescale_gradients``); `early_exit` runs the budgeted inference loop.
    """

    def __init__(self, backbone: StagedBackbone, num_classes: int, head_hidden: int | None = 128,
                 rescale_gradients: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_exits = len(backbone.segments)
        self.rescale_gradients = rescale_gradients
        heads = []
        for index, channels in enumerate(backbone.exit_channels):
            if backbone.kind == "vit":
                heads.append(TokenExitHead(channels, num_classes, backbone.vit.num_prefix_tokens,
                                           backbone.vit_pool))
            else:
                last = index == self.num_exits - 1
                heads.append(ConvExitHead(channels, num_classes, None if last else head_hidden))
        self.heads = nn.ModuleList(heads)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        features = images
        for index, (segment, head) in enumerate(zip(self.backbone.segments, self.heads)):
            features = segment(features)
            if self.training and self.rescale_gradients and torch.is_grad_enabled():
                for_head, features = split_gradient(features, index, self.num_exits)
            else:
                for_head = features
            logits.append(head(for_head))
        return logits

    def exit_costs(self, image_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(segment_flops, head_flops)`` per exit for one image, measured with the flop counter.
        A sample leaving at exit ``k`` costs ``sum(segment[:k+1]) + sum(head[:k+1])``."""
        segment_flops, head_flops = [], []
        was_training = self.training
        self.eval()
        parameter = next(self.parameters(), None)
        features = torch.zeros(1, *image_shape, device=parameter.device if parameter is not None else None)
        with torch.no_grad():
            for segment, head in zip(self.backbone.segments, self.heads):
                segment_flops.append(forward_flops(segment, features))
                features = segment(features)
                head_flops.append(forward_flops(head, features))
        self.train(was_training)
        return torch.tensor(segment_flops, dtype=torch.float64), torch.tensor(head_flops, dtype=torch.float64)

    @torch.no_grad()
    def early_exit(
        self, images: torch.Tensor, thresholds: torch.Tensor, mode: str = "boost", weights: Sequence[float] | None = None,
        form: str = "reference",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Budgeted inference that skips the work of samples that have left.

        After each exit, samples whose confidence reaches ``thresholds[k]`` leave with that exit's
        prediction; only the others go on through the next segment. Returns ``(predictions,
        exit index, confidence)`` per sample.

        The loop keeps its work proportional to the samples still present: one host read per exit
        (how many leave), and the remaining rows are gathered only when some left (``index_select`` on
        the kept positions), so a stage where nobody leaves costs no copy.
        """
        batch = images.shape[0]
        device = images.device
        predictions = torch.empty(batch, dtype=torch.long, device=device)
        exits = torch.full((batch,), self.num_exits - 1, dtype=torch.long, device=device)
        confidence_out = torch.empty(batch, device=device)
        active = torch.arange(batch, device=device)
        features = images
        previous: torch.Tensor | None = None
        weights = list(weights) if weights is not None else [DEFAULT_WEIGHT[form]] * self.num_exits
        last = self.num_exits - 1
        for index, (segment, head) in enumerate(zip(self.backbone.segments, self.heads)):
            features = segment(features)
            logits = head(features)
            current = ensemble_step(logits, previous, weights[index], form) if mode == "boost" else logits
            confidence, predicted = current.float().softmax(dim=-1).max(dim=-1)
            if index == last:
                predictions[active], exits[active], confidence_out[active] = predicted, index, confidence
                break
            leaving = confidence >= thresholds[index]
            left = int(leaving.sum())
            if left == 0:
                previous = current
                continue
            leavers = active[leaving]
            predictions[leavers], exits[leavers], confidence_out[leavers] = predicted[leaving], index, confidence[leaving]
            if left == active.numel():
                break
            kept = (~leaving).nonzero().squeeze(1)
            active, features, previous = active[kept], features.index_select(0, kept), current.index_select(0, kept)
        return predictions, exits, confidence_out

    def for_inference(self, channels_last: bool = True, first_segment_rows: int | None = 64) -> "EarlyExitNetwork":
        """An evaluation copy tuned for CPU/GPU inference: every convolution followed by a BatchNorm is
        folded into one convolution (``torch.fx`` fusion, per segment and head; a part that cannot be
        traced stays as it is); with ``channels_last``, weights use the channels-last layout (feed it
        ``images.contiguous(memory_format=torch.channels_last)``); and a CNN's first segment runs over
        the batch in slices of ``first_segment_rows`` samples (None: whole batches). It gives the same
        predictions up to float rounding.

        Why, measured on the cluttered digits' CNN (one CPU thread, batch 256): the first stage works
        on full-resolution maps (256 x 32 x 32 x 32 activations, 32 MB, far beyond the cache), so it
        costs more time per FLOP than the later stages, and every sample that leaves at the first exit
        pays for it. A contiguous max-pool and the BatchNorm passes made it cost about half of the time
        for a quarter of the FLOPs (fusion and channels-last); running it 64 samples at a time keeps
        its activations in cache and made the full network 14% and early exit 20% faster (early exit
        over full: 0.64x -> 0.59x at 0.44 of the FLOPs). Slicing the second stage too gained nothing."""
        import copy

        from torch.fx.experimental.optimization import fuse

        if first_segment_rows is not None and first_segment_rows < 1:
            raise ValueError(f"first_segment_rows must be a positive number of samples or None, not {first_segment_rows}")
        network = copy.deepcopy(self).eval()
        for parts in (network.backbone.segments, network.heads):
            for index, part in enumerate(parts):
                if any(isinstance(m, nn.BatchNorm2d) for m in part.modules()):
                    try:
                        parts[index] = fuse(part)
                    except Exception:  # noqa: BLE001 - untraceable control flow: keep the module unfused
                        pass
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        if first_segment_rows and network.backbone.kind == "cnn":
            segments = network.backbone.segments
            segments[0] = BatchSlices(segments[0], first_segment_rows)
        return network

    @torch.no_grad()
    def full_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The plain network: every segment and the last head only (the baseline of budgeted
        inference)."""
        features = images
        for segment in self.backbone.segments:
            features = segment(features)
        return self.heads[-1](features)

    def predictions(self, images: torch.Tensor, mode: str = "boost", weights: Sequence[float] | None = None,
                    form: str = "reference") -> list[torch.Tensor]:
        """Every exit's prediction for all samples (the anytime view)."""
        return ensemble_predictions(self(images), mode, weights, form)
