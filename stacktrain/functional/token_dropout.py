"""Shorter token sequences for ViT training: random token dropout, flexible patch scaling, and what
they cost. Plain torch (no Lightning), usable on any timm or open_clip ViT without a Trainer.

The pieces, in the order a ViT uses them::

    images -> patch embedding      (FlexiPatchConv: patch scale s, FlexiViT-style or lower resolution)
           -> + position embedding (resampled to the new grid with timm's resample_abs_pos_embed)
           -> TokenDropoutLayer    (keep a random subset of patch tokens per sample, prefix tokens kept)
           -> transformer blocks   (cost ~ sequence length, attention ~ its square)

`apply_token_dropout` puts both into a ViT *without changing its state_dict keys* (the dropout
module has no state; the patch convolution keeps the same weight and bias) and returns a
`TokenDropoutHandle` whose ``set(keep_ratio, patch_scale)`` changes the compression between steps;
``remove()`` restores the ViT. Both modules act in training mode only: evaluation always sees the
full sequence. Inside ``with suspend_token_dropout(model):`` the dropout of every `TokenDropoutLayer`
in ``model`` lets all tokens through while patch scaling stays on (asymmetric token dropout: one
view of a pair dropped, the other full, both at the same patch scale), and `token_dropout_active`
says whether a training forward would drop tokens at all. `ViTCostModel` gives a ViT's training
FLOPs as a function of the sequence length.

Functional use, e.g. in a plain PyTorch loop::

    compression = apply_token_dropout(vit, patch_scaling=True)
    compression.set(keep_ratio=0.5, patch_scale=2)     # 16x16 image, patch 2 -> 4x4 grid, 8 tokens kept
    loss = criterion(vit(images), targets)             # vit.train(): compressed; vit.eval(): full
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from stacktrain.errors import StackError, require_number

__all__ = [
    "kept_token_count",
    "random_token_keep",
    "TokenDropoutLayer",
    "token_dropout_layers",
    "token_dropout_active",
    "suspend_token_dropout",
    "FlexiPatchConv",
    "PatchMode",
    "vit_family",
    "find_vits",
    "select_vit",
    "ViTCostModel",
    "TokenDropoutHandle",
    "apply_token_dropout",
    "check_keep_ratio",
    "check_patch_scale",
]

PatchMode = Literal["flexi", "resolution"]
PATCH_MODES: tuple[str, ...] = ("flexi", "resolution")


# ----------------------------------------------------------------------------------------- dropout
def kept_token_count(num_patches: int, keep_ratio: float) -> int:
    """How many of ``num_patches`` patch tokens a keep ratio keeps: ``max(1, int(n * keep))``, the
    rule of timm's PatchDropout (a tiny epsilon keeps 0.7 * 10 from truncating to 6)."""
    return max(1, min(num_patches, int(num_patches * keep_ratio + 1e-6)))


def random_token_keep(
    x: torch.Tensor,
    keep_ratio: float,
    num_prefix_tokens: int = 1,
    generator: torch.Generator | None = None,
    ordered: bool = False,
) -> torch.Tensor:
    """Keep a random subset of the patch tokens of every sample, independently per sample.

    ``x`` is ``[B, L, D]`` with ``num_prefix_tokens`` class/register tokens first (always kept).
    Returns ``[B, prefix + kept_token_count(L - prefix, keep_ratio), D]``. One batched ``topk`` over
    uniform scores draws every sample's subset: no Python loop over samples. ``ordered`` keeps the
    kept tokens in their original order (not needed by ViTs with absolute position embeddings).
    """
    batch, length = x.shape[0], x.shape[1]
    num_patches = length - num_prefix_tokens
    keep = kept_token_count(num_patches, keep_ratio)
    if keep >= num_patches:
        return x
    device = generator.device if generator is not None else x.device
    scores = torch.rand(batch, num_patches, generator=generator, device=device)
    keep_index = scores.topk(keep, dim=1, sorted=False).indices.to(x.device)
    if ordered:
        keep_index = keep_index.sort(dim=1).values
    patches = x[:, num_prefix_tokens:].gather(1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if num_prefix_tokens == 0:
        return patches
    return torch.cat((x[:, :num_prefix_tokens], patches), dim=1)


class TokenDropoutLayer(nn.Module):
    """Random token dropout with a keep ratio that can change every step (``keep_ratio`` attribute).

    Drop-in for timm's ``VisionTransformer.patch_drop`` and open_clip's ``VisionTransformer.patch_dropout``
    (like timm's ``PatchDropout``, but the ratio is a settable attribute, the random numbers come from
    ``generator``, and the FLOPs and tokens of every training forward are counted for the cost report).
    Identity in eval mode, and while ``suspended`` (set by `suspend_token_dropout`), when the forward
    passes every token on and is counted as what it is: the full sequence at the current patch scale.
    Holds no parameters or buffers, so the ViT's ``state_dict`` is unchanged.
    """

    def __init__(
        self,
        num_prefix_tokens: int = 1,
        keep_ratio: float = 1.0,
        generator: torch.Generator | None = None,
        ordered: bool = False,
        cost_model: ViTCostModel | None = None,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.keep_ratio = float(keep_ratio)
        self.generator = generator
        self.ordered = ordered
        self.cost_model = cost_model
        #: set by `TokenDropoutHandle.set`: the patch scaling upstream of this module
        self.patch_scale = 1
        self.patch_mode = "flexi"
        #: set by `suspend_token_dropout`: training forwards keep every token (keep ratio 1 for them)
        self.suspended = False
        self.reset_counters()

        #: every sequence length a training forward sent on to the blocks (what torch.compile saw)
        self.sequence_lengths: set[int] = set()

    def reset_counters(self) -> None:
        """Zero the per-step tallies (samples, tokens, FLOPs with and without the compression)."""
        self.samples = 0
        self.tokens = 0
        self.tokens_full = 0
        self.flops = 0.0
        self.flops_full = 0.0

    # Under torch.compile this runs eagerly (a graph break): the keep ratio, the generator and the
    # counters stay Python state instead of guards that would recompile at every new ratio. The blocks
    # after it compile at the first sequence length, and at the second torch's automatic dynamic shapes
    # recompile them once with the length symbolic: two compiles whatever the number of lengths.
    # (torch._dynamo.mark_dynamic on the output did not reach the resumed graph in torch 2.14.)
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.keep_ratio < 1.0 and not self.suspended:
            x_out = random_token_keep(x, self.keep_ratio, self.num_prefix_tokens, self.generator, self.ordered)
        else:
            x_out = x
        self.sequence_lengths.add(int(x_out.shape[1]))
        if self.cost_model is not None:
            self._count(x.shape[0], x.shape[1] - self.num_prefix_tokens, x_out.shape[1], x.requires_grad)
        return x_out

    def _count(self, batch: int, patches: int, tokens: int, backward: bool) -> None:
        cost = self.cost_model
        assert cost is not None
        full_patches = patches * self.patch_scale * self.patch_scale
        full_tokens = full_patches + self.num_prefix_tokens
        kernel_area = cost.kernel_area(self.patch_scale, self.patch_mode)
        self.samples += batch
        self.tokens += batch * tokens
        self.tokens_full += batch * full_tokens
        self.flops += batch * cost.flops(tokens, patches, kernel_area, backward=backward)
        self.flops += cost.resample_flops(self.patch_scale, self.patch_mode, backward=backward)
        self.flops_full += batch * cost.flops(full_tokens, full_patches, cost.kernel_area(1, "flexi"), backward=backward)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, num_prefix_tokens={self.num_prefix_tokens}"


def token_dropout_layers(module: nn.Module) -> list[TokenDropoutLayer]:
    """Every `TokenDropoutLayer` in ``module``'s tree (empty when no token dropout is installed)."""
    return [child for child in module.modules() if isinstance(child, TokenDropoutLayer)]


def token_dropout_active(module: nn.Module) -> bool:
    """Whether a forward of ``module`` as it is now would drop tokens: some `TokenDropoutLayer` in its tree
    is in training mode, not suspended, at a keep ratio below 1. (Patch scaling is not dropout: a
    forward that only scales patches drops nothing.)"""
    return any(drop.training and not drop.suspended and drop.keep_ratio < 1.0 for drop in token_dropout_layers(module))


@contextmanager
def suspend_token_dropout(module: nn.Module) -> Iterator[list[TokenDropoutLayer]]:
    """Within the block, every `TokenDropoutLayer` in ``module``'s tree keeps all tokens (as at keep ratio
    1); on leaving it, also by an exception, each is put back as it was. Patch scaling (`FlexiPatchConv`)
    is untouched, so a forward in the block sees the full token sequence of the current patch grid, and
    the modules count it as such: their FLOPs and tokens tallies hold what really ran. Nests; a module
    without token dropout is unaffected. Yields the modules it suspended.

    Asymmetric token dropout of a pair of views (the paper's: dropout on one view, patch scaling on
    both)::

        dropped = vit(view_a)
        with suspend_token_dropout(vit):
            full = vit(view_b)
    """
    drops = token_dropout_layers(module)
    before = [drop.suspended for drop in drops]
    for drop in drops:
        drop.suspended = True
    try:
        yield drops
    finally:
        for drop, suspended in zip(drops, before):
            drop.suspended = suspended


# ----------------------------------------------------------------------------------- patch scaling
class FlexiPatchConv(nn.Conv2d):
    """A ViT's patch-embedding convolution that can make ``patch_scale`` times larger patches.

    ``mode="flexi"`` (FlexiViT): the stored kernel is resized to ``patch * scale`` by timm's
    pseudo-inverse resize (`timm.layers.PatchEmbedResamplerFixedOrigSize`, which caches the
    pseudo-inverse per size, so each step costs one small matmul and gradients reach the stored
    kernel), then applied with the larger stride. ``mode="resolution"``: the image is downsampled by
    ``scale`` (bilinear, antialiased) and the stored kernel applied unchanged. Either way the grid is
    ``scale`` times coarser in each direction. Shares the original convolution's weight and bias
    (same parameters, same ``state_dict`` keys); acts in training mode only.
    """

    def __init__(self, conv: nn.Conv2d, mode: PatchMode = "flexi") -> None:
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.mode = mode
        self.patch_scale = 1
        # kept out of the module tree: the original (to restore) and timm's cached resampler
        object.__setattr__(self, "original", conv)
        object.__setattr__(self, "_resampler", None)
        self.train(conv.training)

    def resampler(self) -> nn.Module:
        if self._resampler is None:
            from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize

            object.__setattr__(self, "_resampler", PatchEmbedResamplerFixedOrigSize(tuple(self.kernel_size)))
        return self._resampler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.patch_scale if self.training else 1
        if scale == 1:
            return self._conv_forward(x, self.weight, self.bias)
        if self.mode == "resolution":
            size = (x.shape[-2] // scale, x.shape[-1] // scale)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            return self._conv_forward(x, self.weight, self.bias)
        kernel = [self.kernel_size[0] * scale, self.kernel_size[1] * scale]
        weight = self.resampler()(self.weight, kernel)
        return F.conv2d(x, weight, self.bias, stride=kernel, padding=self.padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}, patch_scale={self.patch_scale}"


# ------------------------------------------------------------------------------------- finding ViTs
def vit_family(module: nn.Module) -> str | None:
    """``"timm"`` for a timm ``VisionTransformer`` (or subclass), ``"open_clip"`` for open_clip's visual
    ``VisionTransformer``, else None. open_clip is not imported here: a model holding one already did."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if isinstance(module, TimmViT):
        return "timm"
    open_clip_transformer = sys.modules.get("open_clip.transformer")
    if open_clip_transformer is not None and isinstance(module, open_clip_transformer.VisionTransformer):
        return "open_clip"
    return None


def find_vits(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ViT (timm or open_clip) in ``root``'s module tree, as ``(dotted path, module)``, outermost
    first; a ViT inside another ViT is not listed twice."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if vit_family(module) is None:
            continue
        if any(name.startswith(parent + ".") for parent, _ in found if parent):
            continue
        found.append((name, module))
    return found


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def select_vit(root: nn.Module, path: str | None = None, *, source: str = "TokenDropout") -> tuple[str, nn.Module]:
    """The ViT to compress in ``root``: the one at ``path`` (dotted attribute path) if given, else the
    only ViT, else the only *trainable* one (a frozen EMA teacher or momentum encoder is skipped).

    Raises `StackError` naming ``root``'s class when there is no ViT, the path does not lead to one, or
    the choice is ambiguous (then the fix lists the candidates' paths).
    """
    owner = type(root).__name__
    if path:
        target: Any = root
        for part in path.split("."):
            if not hasattr(target, part):
                raise StackError(
                    f"does not exist in {owner} (no attribute {part!r})", source=source, key="vit_path", value=path,
                    fix=_paths_fix(root),
                )
            target = getattr(target, part)
        if not isinstance(target, nn.Module) or vit_family(target) is None:
            raise StackError(
                f"is a {type(target).__name__}, not a timm or open_clip VisionTransformer", source=source,
                key="vit_path", value=path, fix=_paths_fix(root),
            )
        return path, target
    vits = find_vits(root)
    if not vits:
        raise StackError(
            f"{owner} has no ViT (no timm VisionTransformer or open_clip visual VisionTransformer in its modules); "
            "token dropout and patch scaling shorten a ViT's token sequence",
            source=source, key="model", value=owner,
            fix="attach TokenDropout to a module with a ViT backbone (e.g. model_name: vit_tiny_patch16_224), "
                "or remove TokenDropout from trainer.callbacks",
        )
    if len(vits) == 1:
        return vits[0]
    trainable = [(name, vit) for name, vit in vits if _trainable(vit)]
    if len(trainable) == 1:
        return trainable[0]
    names = [name for name, _ in (trainable or vits)]
    raise StackError(
        f"{owner} has several trainable ViTs ({', '.join(names)}) and it is not clear which to compress",
        source=source, key="vit_path", value=None, fix=f"set vit_path to one of {names}",
    )


def _paths_fix(root: nn.Module) -> str:
    names = [name or "<the module itself>" for name, _ in find_vits(root)]
    return f"use one of the ViT paths in this model: {names}" if names else "the model has no ViT"


# -------------------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class ViTCostModel:
    """Per-sample FLOPs of a ViT (multiply-add = 2, the convention of ``torch.utils.flop_counter``) as a
    function of its sequence length.

    Counted: the patch-embedding convolution, every linear layer of the blocks (per token), attention
    (``QK^T`` and ``AV``: ``4 L^2 D`` per block forward, ``10 L^2 D`` backward, flash-attention style
    recomputation), and the head. Backward of a linear layer is twice its forward (input and weight
    gradients); the patch embedding needs only its weight gradient (images need none). Norms,
    activations and softmax are not FLOPs in this convention.

    A convolutional stem before the patch projection (``patch_embed.stem``, e.g. `vit_convstem_tiny`)
    runs on the whole image, whatever the compression: a fixed per-sample term (``stem_flops`` forward;
    its backward computes every weight gradient and every input gradient but the image's), and the
    projection then needs its input gradient too.
    """

    embed_dim: int
    depth: int
    #: multiply-adds per token of all the linear layers of all the blocks
    block_linear_macs: int
    #: multiply-adds per patch of the patch embedding at patch scale 1
    patch_embed_macs: int
    #: multiply-adds per sample after pooling (classifier head / projection)
    head_macs: int
    in_chans: int
    patch_size: tuple[int, int]
    image_size: tuple[int, int] | None
    num_prefix_tokens: int
    #: FLOPs per sample of a convolutional stem's forward (0: the projection reads the image)
    stem_flops: float = 0.0
    #: of those, the first convolution's (its input is the image: no input gradient)
    stem_first_flops: float = 0.0

    @classmethod
    def from_vit(cls, vit: nn.Module) -> ViTCostModel:
        family = vit_family(vit)
        if family == "timm":
            blocks: Sequence[nn.Module] = list(vit.blocks)
            conv = vit.patch_embed.proj
            head = vit.head
            head_macs = head.in_features * head.out_features if isinstance(head, nn.Linear) else 0
            image_size = tuple(vit.patch_embed.img_size) if vit.patch_embed.img_size is not None else None
            prefix = int(vit.num_prefix_tokens)
            embed_dim = int(vit.embed_dim)
        elif family == "open_clip":
            blocks = list(vit.transformer.resblocks)
            conv = vit.conv1
            head_macs = vit.proj.numel() if vit.proj is not None else 0
            image_size = tuple(vit.image_size)
            prefix = 1
            embed_dim = int(vit.transformer.width)
        else:
            raise TypeError(f"not a timm or open_clip VisionTransformer: {type(vit).__name__}")
        linear_macs = 0
        for block in blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    linear_macs += module.in_features * module.out_features
                elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                    linear_macs += module.in_proj_weight.numel()
        kh, kw = conv.kernel_size
        stem = getattr(vit.patch_embed, "stem", None) if family == "timm" else None
        stem_flops, stem_first_flops, in_chans = _stem_flops(stem, image_size) if stem is not None else (
            0.0, 0.0, conv.in_channels)
        return cls(
            embed_dim=embed_dim, depth=len(blocks), block_linear_macs=linear_macs,
            patch_embed_macs=conv.out_channels * (conv.in_channels // conv.groups) * kh * kw, head_macs=head_macs,
            in_chans=in_chans, patch_size=(kh, kw), image_size=image_size, num_prefix_tokens=prefix,
            stem_flops=stem_flops, stem_first_flops=stem_first_flops,
        )

    def kernel_area(self, patch_scale: int, mode: str) -> int:
        """Pixels under one patch kernel: ``(patch * scale)^2`` in flexi mode, ``patch^2`` at lower resolution."""
        ph, pw = self.patch_size
        return ph * pw * (patch_scale * patch_scale if mode == "flexi" else 1)

    def sequence(
        self, keep_ratio: float = 1.0, patch_scale: int = 1, image_size: Sequence[int] | None = None
    ) -> tuple[int, int]:
        """``(patches, tokens)``: patch tokens made by the patch embedding at ``patch_scale``, and the
        sequence length through the blocks after keeping ``keep_ratio`` of them (prefix included)."""
        height, width = image_size if image_size is not None else self.image_size  # type: ignore[misc]
        ph, pw = self.patch_size
        patches = (height // (ph * patch_scale)) * (width // (pw * patch_scale))
        kept = patches if keep_ratio >= 1 else kept_token_count(patches, keep_ratio)
        return patches, kept + self.num_prefix_tokens

    def flops(self, tokens: int, patches: int, kernel_area: int, *, backward: bool = True) -> float:
        """FLOPs per sample: ``patches`` tokens embedded with a kernel of ``kernel_area`` pixels, ``tokens``
        tokens through the blocks; forward only, or forward + backward."""
        ph, pw = self.patch_size
        embed = 2.0 * patches * self.patch_embed_macs * kernel_area / (ph * pw)
        linear = 2.0 * tokens * self.block_linear_macs
        attention = 4.0 * tokens * tokens * self.embed_dim * self.depth
        head = 2.0 * self.head_macs
        stem = self.stem_flops
        if not backward:
            return embed + linear + attention + head + stem
        embed_backward = 2 if stem else 1  # weight gradient; with a stem the input gradient as well
        return (1 + embed_backward) * embed + 3 * (linear + head) + 3.5 * attention + 3 * stem - self.stem_first_flops

    def resample_flops(self, patch_scale: int, mode: str, *, backward: bool = True) -> float:
        """FLOPs of resizing the patch kernel once per forward in flexi mode (the pseudo-inverse matmul;
        its backward needs only the kernel's gradient)."""
        if mode != "flexi" or patch_scale == 1:
            return 0.0
        macs = self.patch_embed_macs * self.kernel_area(patch_scale, "flexi")
        return (4.0 if backward else 2.0) * macs

    def training_flops(
        self, keep_ratio: float = 1.0, patch_scale: int = 1, mode: str = "flexi",
        image_size: Sequence[int] | None = None,
    ) -> float:
        """Forward + backward FLOPs per sample at a compression (``keep_ratio``, ``patch_scale``)."""
        patches, tokens = self.sequence(keep_ratio, patch_scale, image_size)
        return self.flops(tokens, patches, self.kernel_area(patch_scale, mode), backward=True)

    def relative_cost(self, keep_ratio: float, patch_scale: int, mode: str = "flexi") -> float:
        """Training FLOPs at a compression over training FLOPs of the full sequence."""
        return self.training_flops(keep_ratio, patch_scale, mode) / self.training_flops()


def _stem_flops(stem: nn.Module, image_size: tuple[int, int] | None) -> tuple[float, float, int]:
    """``(forward FLOPs, the first convolution's, input channels)`` per sample of a stem on
    ``image_size`` images, measured with the flop counter (any stem layout)."""
    from stacktrain.functional.flops import forward_flops

    first = next((m for m in stem.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or image_size is None:
        raise StackError("has a patch-embedding stem whose cost cannot be measured (no Conv2d or no fixed image size)",
                         source="ViTCostModel", key="patch_embed.stem", value=type(stem).__name__,
                         fix="give the ViT a fixed img_size and a convolutional stem")
    image = torch.zeros(1, first.in_channels, *image_size)
    was_training = stem.training
    stem.eval()
    try:
        with torch.no_grad():
            total, first_flops = forward_flops(stem, image), forward_flops(first, image)
    finally:
        stem.train(was_training)
    return float(total), float(first_flops), int(first.in_channels)


# ------------------------------------------------------------------------------------- installation
class TokenDropoutHandle:
    """What `apply_token_dropout` put into a ViT; ``set`` changes the compression."""

    def __init__(self, vit: nn.Module, family: str, drop: TokenDropoutLayer, conv: FlexiPatchConv | None,
                 restore: list[tuple[Any, str, Any]], cost_model: ViTCostModel, mode: str) -> None:
        self.vit = vit
        self.family = family
        self.drop = drop
        self.conv = conv
        self.cost_model = cost_model
        self.mode = mode
        self._restore = restore
        self.keep_ratio = 1.0
        self.patch_scale = 1

    @property
    def patch_scaling(self) -> bool:
        return self.conv is not None

    def set(self, keep_ratio: float = 1.0, patch_scale: int = 1) -> None:
        """Compression of the following training forwards (evaluation stays full)."""
        if patch_scale != 1 and self.conv is None:
            raise ValueError("patch scaling was not installed (apply_token_dropout(patch_scaling=True))")
        self.keep_ratio = float(keep_ratio)
        self.patch_scale = int(patch_scale)
        self.drop.keep_ratio = self.keep_ratio
        self.drop.patch_scale = self.patch_scale
        self.drop.patch_mode = self.mode
        if self.conv is not None:
            self.conv.patch_scale = self.patch_scale

    def remove(self) -> None:
        """Put the ViT back as it was (modules, flags, methods)."""
        for owner, attribute, value in reversed(self._restore):
            if value is _DELETE:
                if attribute in vars(owner):
                    delattr(owner, attribute)
            else:
                setattr(owner, attribute, value)
        self._restore = []


_DELETE = object()


def apply_token_dropout(
    vit: nn.Module,
    *,
    patch_scaling: bool = False,
    patch_mode: PatchMode = "flexi",
    generator: torch.Generator | None = None,
    ordered: bool = False,
    source: str = "TokenDropout",
) -> TokenDropoutHandle:
    """Put a `TokenDropoutLayer` where the ViT drops patches (timm ``patch_drop``, open_clip
    ``patch_dropout``) and, with ``patch_scaling``, a `FlexiPatchConv` as its patch embedding plus the
    position-embedding resampling for the coarser grid: timm's own ``dynamic_img_size`` path (which
    calls ``resample_abs_pos_embed`` with the model's prefix tokens), or for open_clip an
    ``_embeds`` that does the same. The ViT's ``state_dict`` keys do not change."""
    family = vit_family(vit)
    if family is None:
        raise StackError("is not a ViT", source=source, key="vit", value=type(vit).__name__,
                         fix="pass a timm or open_clip VisionTransformer")
    if patch_mode not in PATCH_MODES:
        raise StackError("is not a patch scaling mode", source=source, key="patch_mode", value=patch_mode,
                         fix=f"use one of {list(PATCH_MODES)}")
    drop_attribute = "patch_drop" if family == "timm" else "patch_dropout"
    existing = getattr(vit, drop_attribute)
    if isinstance(existing, TokenDropoutLayer):
        raise StackError("already has token dropout applied", source=source, key=drop_attribute,
                         value=type(existing).__name__, fix="remove the other TokenDropout from the run")
    if not isinstance(existing, nn.Identity):
        rate = getattr(existing, "prob", None)
        raise StackError(
            f"already drops tokens itself ({type(existing).__name__}, rate {rate}); two droppers would compound",
            source=source, key="model patch_drop_rate / patch_dropout", value=rate,
            fix="build the ViT with patch_drop_rate 0 (open_clip: patch_dropout 0) and let TokenDropout set the rate",
        )
    cost_model = ViTCostModel.from_vit(vit)
    prefix = cost_model.num_prefix_tokens
    restore: list[tuple[Any, str, Any]] = []
    conv: FlexiPatchConv | None = None
    if patch_scaling:
        if family == "timm":
            embed = vit.patch_embed
            if not isinstance(getattr(embed, "proj", None), nn.Conv2d) or getattr(embed, "dynamic_img_pad", False):
                raise StackError(
                    "patch scaling needs a timm PatchEmbed with a Conv2d projection and no dynamic padding",
                    source=source, key="patch_embed", value=type(embed).__name__,
                    fix="use a standard timm ViT, or keep patch_scale at 1",
                )
            from timm.layers import Format

            conv = FlexiPatchConv(embed.proj, patch_mode)
            for owner, attribute, value in (
                (embed, "proj", conv), (embed, "flatten", False), (embed, "output_fmt", Format.NHWC),
                (embed, "strict_img_size", False), (vit, "dynamic_img_size", True),
            ):
                restore.append((owner, attribute, getattr(owner, attribute)))
                setattr(owner, attribute, value)
        else:
            conv = FlexiPatchConv(vit.conv1, patch_mode)
            restore.append((vit, "conv1", vit.conv1))
            vit.conv1 = conv
            restore.append((vit, "_embeds", _DELETE))
            vit._embeds = types.MethodType(_open_clip_embeds_any_grid, vit)
    drop = TokenDropoutLayer(prefix, generator=generator, ordered=ordered, cost_model=cost_model)
    # the mode of the slot it takes over, which its owner may keep apart from the ViT's: a frozen tower
    # in eval mode whose dropout slot follows training (PromptTunedCLIP) drops tokens in training steps
    drop.train(existing.training)
    restore.insert(0, (vit, drop_attribute, existing))
    setattr(vit, drop_attribute, drop)
    return TokenDropoutHandle(vit, family, drop, conv, restore, cost_model, patch_mode)


def _open_clip_embeds_any_grid(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer._embeds`` with the position embedding resampled to the patch grid
    the (scaled) convolution produced; identical to open_clip's at the native grid."""
    from timm.layers import resample_abs_pos_embed

    x = self.conv1(x)
    grid = [int(x.shape[-2]), int(x.shape[-1])]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    positions = resample_abs_pos_embed(
        self.positional_embedding.unsqueeze(0), new_size=grid, old_size=list(self.grid_size), num_prefix_tokens=1
    )[0]
    x = x + positions.to(x.dtype)
    x = self.patch_dropout(x)
    return self.ln_pre(x)


# -------------------------------------------------------------------------------------- validation
def check_keep_ratio(value: Any, key: str = "keep_ratio", *, source: str = "TokenDropout") -> float:
    """A keep ratio in (0, 1], else `StackError`."""
    require_number(value, key, source=source, low=0.0, high=1.0, low_inclusive=False,
                   fix="use a keep ratio in (0, 1], e.g. 0.5 keeps half of the patch tokens; 1 keeps all")
    return float(value)


def check_patch_scale(
    value: Any,
    image_sizes: Iterable[Sequence[int]],
    patch_size: Sequence[int],
    key: str = "patch_scale",
    *,
    source: str = "TokenDropout",
) -> int:
    """A whole patch scale >= 1 such that ``patch * scale`` divides every image size, else `StackError`."""
    require_number(value, key, source=source, low=1, integer=True,
                   fix="use a whole patch scale such as 1 (no scaling) or 2 (patches twice as large)")
    scale = int(value)
    ph, pw = int(patch_size[0]), int(patch_size[1])
    for size in image_sizes:
        height, width = int(size[0]), int(size[1])
        if height % (ph * scale) or width % (pw * scale):
            fitting = [s for s in range(1, max(height // ph, 1) + 1) if height % (ph * s) == 0 and width % (pw * s) == 0]
            raise StackError(
                f"does not divide the image: {height}x{width} images with {ph}x{pw} patches make patches of "
                f"{ph * scale}x{pw * scale} that do not tile the image",
                source=source, key=key, value=value,
                fix=f"use a patch scale from {fitting} (or change the image or patch size)",
            )
    return scale

