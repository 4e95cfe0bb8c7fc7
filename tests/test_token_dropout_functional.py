"""The functional core of token dropout and patch scaling (no Trainer): masks, patch kernels, ViT
discovery, installation into timm / open_clip ViTs, and the cost model against the FLOP counter."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from stacktrain.errors import StackError
from stacktrain.functional.flops import flop_counter, training_flops
from stacktrain.functional.token_dropout import (
    FlexiPatchConv,
    TokenDropoutLayer,
    ViTCostModel,
    check_keep_ratio,
    check_patch_scale,
    token_dropout_active,
    find_vits,
    apply_token_dropout,
    kept_token_count,
    random_token_keep,
    select_vit,
    suspend_token_dropout,
)
from stacktrain.functional.clip import create_clip_model

# 16x16 grayscale, 2 px patches: 64 patch tokens + 1 class token
SMALL = dict(img_size=16, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def small_vit(**overrides) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, **{**SMALL, **overrides})


def test_kept_token_count_follows_timm_and_never_truncates_exact_products():
    assert kept_token_count(64, 0.5) == 32
    assert kept_token_count(64, 0.75) == 48
    assert kept_token_count(10, 0.7) == 7  # 10 * 0.7 = 6.999...
    assert kept_token_count(64, 0.001) == 1
    assert kept_token_count(64, 1.0) == 64


def test_random_token_keep_keeps_prefix_and_distinct_random_subsets_per_sample():
    batch, patches, dim = 6, 64, 3
    prefix = torch.full((batch, 2, dim), -1.0)
    # each patch token carries its own index, so kept tokens can be identified
    tokens = torch.arange(patches, dtype=torch.float).view(1, patches, 1).expand(batch, patches, dim)
    x = torch.cat((prefix, tokens), dim=1)
    out = random_token_keep(x, 0.25, num_prefix_tokens=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (batch, 2 + 16, dim)
    assert torch.equal(out[:, :2], prefix)
    kept = out[:, 2:, 0].long()
    for row in kept:
        assert len(set(row.tolist())) == 16  # no token twice
    assert len({tuple(sorted(row.tolist())) for row in kept}) == batch  # every sample its own subset
    again = random_token_keep(x, 0.25, num_prefix_tokens=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    ordered = random_token_keep(x, 0.25, num_prefix_tokens=2, generator=torch.Generator().manual_seed(0), ordered=True)
    assert torch.equal(ordered[:, 2:, 0], ordered[:, 2:, 0].sort(dim=1).values)


def test_random_token_drop_is_identity_in_eval_and_at_keep_one():
    drop = TokenDropoutLayer(num_prefix_tokens=1, keep_ratio=0.5)
    x = torch.randn(2, 17, 4)
    drop.eval()
    assert drop(x) is x
    drop.train()
    assert drop(x).shape == (2, 1 + 8, 4)
    drop.keep_ratio = 1.0
    assert drop(x) is x


def test_suspend_token_drop_keeps_every_token_at_the_patch_scale_and_puts_the_dropout_back():
    vit = small_vit()
    compression = apply_token_dropout(vit, patch_scaling=True)
    compression.set(keep_ratio=0.5, patch_scale=2)  # 16 px, patch 2 at scale 2: a 4x4 grid, 16 patches
    vit.train()
    lengths: list[int] = []
    vit.blocks[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    images = torch.randn(2, 1, 16, 16)
    assert token_dropout_active(vit)
    vit(images)
    with suspend_token_dropout(vit) as suspended:
        assert suspended == [compression.drop] and not token_dropout_active(vit)
        vit(images)
        with suspend_token_dropout(vit):  # nested: leaving the inner block keeps the outer one's suspension
            pass
        vit(images)
    vit(images)
    assert lengths == [1 + 8, 1 + 16, 1 + 16, 1 + 8]  # 16 patches at scale 2: 8 kept, then all 16
    assert compression.drop.keep_ratio == 0.5 and token_dropout_active(vit)
    with pytest.raises(RuntimeError, match="inside"):
        with suspend_token_dropout(vit):
            raise RuntimeError("inside")
    assert not compression.drop.suspended and token_dropout_active(vit)
    vit.eval()
    assert not token_dropout_active(vit)
    assert suspend_token_dropout(small_vit()).__enter__() == []  # no token dropout installed: nothing to do


@pytest.mark.parametrize("scale", [1, 2])
def test_a_suspended_forward_is_counted_as_the_full_sequence_at_the_patch_scale(scale):
    """Asymmetric dropout's cost: one view at keep 0.5, the other full, both at the patch scale; the
    module's tally equals the FLOP counter's and the cost model's sum of the two."""
    vit = small_vit()
    compression = apply_token_dropout(vit, patch_scaling=True)
    compression.set(keep_ratio=0.5, patch_scale=scale)
    vit.train()
    batch = 3
    view_a, view_b = torch.randn(batch, 1, 16, 16), torch.randn(batch, 1, 16, 16)

    def asymmetric(model: nn.Module) -> torch.Tensor:
        dropped = model(view_a)
        with suspend_token_dropout(model):
            full = model(view_b)
        return torch.cat((dropped, full))

    compression.drop.reset_counters()
    with flop_counter() as counter:
        asymmetric(vit).sum().backward()
    measured = int(counter.get_total_flops())
    model = compression.cost_model
    expected = batch * (model.training_flops(0.5, scale) + model.training_flops(1.0, scale)) \
        + 2 * model.resample_flops(scale, "flexi")
    assert measured == expected
    assert compression.drop.flops == measured
    assert compression.drop.flops_full == 2 * batch * model.training_flops()
    assert compression.drop.tokens == batch * (model.sequence(0.5, scale)[1] + model.sequence(1.0, scale)[1])
    assert compression.drop.samples == 2 * batch


def test_flexi_patch_kernel_sees_an_upsampled_patch_as_the_original_kernel_sees_the_patch():
    """FlexiViT's property: <resize(x), resized kernel> == <x, kernel> (pseudo-inverse resize)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 8, kernel_size=2, stride=2)
    flexi = FlexiPatchConv(conv, "flexi")
    flexi.patch_scale = 2
    patches = torch.randn(5, 1, 2, 2)  # one patch per image: each resized on its own
    upsampled = F.interpolate(patches, scale_factor=2, mode="bicubic", antialias=True, align_corners=False)
    flexi.train()
    assert torch.allclose(flexi(upsampled), conv(patches), atol=1e-4)
    image = torch.randn(3, 1, 8, 8)
    assert flexi(image).shape == (3, 8, 2, 2)
    flexi.eval()  # evaluation: scale ignored, the stored kernel at its own stride
    assert torch.equal(flexi(image), conv(image))
    assert flexi.weight is conv.weight and flexi.bias is conv.bias


def test_flexi_kernel_gradient_reaches_the_stored_kernel():
    conv = nn.Conv2d(1, 4, kernel_size=2, stride=2)
    flexi = FlexiPatchConv(conv, "flexi")
    flexi.patch_scale = 2
    flexi(torch.randn(2, 1, 8, 8)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_resolution_mode_downsamples_the_image():
    conv = nn.Conv2d(1, 4, kernel_size=2, stride=2)
    flexi = FlexiPatchConv(conv, "resolution")
    flexi.patch_scale = 2
    image = torch.randn(2, 1, 16, 16)
    small = F.interpolate(image, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(flexi(image), conv(small), atol=1e-6)


@pytest.mark.parametrize("mode", ["flexi", "resolution"])
def test_installing_keeps_state_dict_and_eval_outputs_and_remove_restores(mode):
    torch.manual_seed(0)
    vit = small_vit()
    keys = list(vit.state_dict())
    images = torch.randn(3, 1, 16, 16)
    vit.eval()
    reference = vit(images)
    compression = apply_token_dropout(vit, patch_scaling=True, patch_mode=mode)
    assert list(vit.state_dict()) == keys
    compression.set(0.5, 2)
    assert torch.allclose(vit(images), reference, atol=1e-6)  # eval: full sequence whatever the setting
    vit.train()
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0].shape[1]))
    vit(images).sum().backward()
    assert seen["tokens"] == 1 + 8  # 8x8 grid at scale 2 -> 16 patches, half kept
    assert vit.pos_embed.grad is not None
    compression.remove()
    assert isinstance(vit.patch_drop, nn.Identity) and type(vit.patch_embed.proj) is nn.Conv2d
    assert vit.dynamic_img_size is False and vit.patch_embed.flatten is True
    vit.eval()
    assert torch.allclose(vit(images), reference, atol=1e-6)


def test_a_vit_that_already_drops_patches_is_refused():
    with pytest.raises(StackError, match="patch_drop_rate"):
        apply_token_dropout(small_vit(patch_drop_rate=0.5))


@pytest.mark.parametrize("keep,scale,mode", [(1.0, 1, "flexi"), (0.5, 1, "flexi"), (0.25, 1, "flexi"),
                                             (1.0, 2, "flexi"), (0.5, 2, "flexi"), (0.75, 4, "flexi"),
                                             (1.0, 2, "resolution"), (0.5, 2, "resolution")])
def test_cost_model_matches_the_flop_counter(keep, scale, mode):
    """Training FLOPs (forward + backward) of a timm ViT as a function of the sequence, exactly as
    torch.utils.flop_counter counts them (attention included)."""
    vit = small_vit()
    compression = apply_token_dropout(vit, patch_scaling=True, patch_mode=mode)
    compression.set(keep, scale)
    vit.train()
    batch = 3
    measured = training_flops(vit, lambda y: y.sum(), torch.randn(batch, 1, 16, 16))
    model = compression.cost_model
    assert measured == batch * model.training_flops(keep, scale, mode) + model.resample_flops(scale, mode)
    # and the dropout module's own tally of that forward agrees
    compression.drop.reset_counters()
    vit(torch.randn(batch, 1, 16, 16)).sum().backward()
    assert compression.drop.flops == measured
    assert compression.drop.flops_full == batch * model.training_flops()
    assert compression.drop.tokens == batch * model.sequence(keep, scale)[1]


def test_relative_cost_shrinks_with_the_sequence():
    model = ViTCostModel.from_vit(small_vit())
    assert model.relative_cost(1.0, 1) == 1.0
    half, quarter, scaled = model.relative_cost(0.5, 1), model.relative_cost(0.25, 1), model.relative_cost(1.0, 2)
    assert 0.1 < quarter < 0.25 < half < 0.55 and scaled < 0.3  # attention shrinks quadratically


class Holder(nn.Module):
    def __init__(self, *vits: nn.Module, frozen: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)
        for index, vit in enumerate(vits):
            if index in frozen:
                vit.requires_grad_(False)
            setattr(self, f"vit{index}", vit)


def test_select_vit_finds_the_trainable_vit_anywhere_and_names_the_module_when_there_is_none():
    student, teacher = small_vit(), small_vit()
    nested = nn.Sequential(nn.Identity(), Holder(student, teacher, frozen=(1,)))
    name, found = select_vit(nested)
    assert found is student and name == "1.vit0"
    assert [n for n, _ in find_vits(nested)] == ["1.vit0", "1.vit1"]
    assert select_vit(nested, "1.vit1")[1] is teacher
    with pytest.raises(StackError, match="several trainable ViTs") as error:
        select_vit(Holder(small_vit(), small_vit()))
    assert "vit0" in str(error.value) and "vit_path" in str(error.value)
    with pytest.raises(StackError, match="Holder has no ViT"):
        select_vit(Holder())
    with pytest.raises(StackError, match="not a timm or open_clip VisionTransformer"):
        select_vit(Holder(student), "head")
    with pytest.raises(StackError, match="no attribute 'backbone'"):
        select_vit(Holder(student), "backbone.blocks")


def test_keep_ratio_and_patch_scale_checks_name_key_value_and_fix():
    assert check_keep_ratio(1.0) == 1.0 and check_keep_ratio(0.1) == 0.1
    for bad in (0.0, -0.2, 1.5, "half"):
        with pytest.raises(StackError, match="keep_ratio"):
            check_keep_ratio(bad)
    assert check_patch_scale(2, [(16, 16), (8, 8)], (2, 2)) == 2
    with pytest.raises(StackError) as error:
        check_patch_scale(3, [(16, 16)], (2, 2))
    message = str(error.value)
    assert "patch_scale=3" in message and "does not divide the image" in message and "[1, 2, 4, 8]" in message
    with pytest.raises(StackError, match="does not divide"):
        check_patch_scale(4, [(16, 16), (12, 12)], (2, 2))  # fits the global view, not the local crop
    with pytest.raises(StackError, match="integer"):
        check_patch_scale(1.5, [(16, 16)], (2, 2))


def test_open_clip_visual_transformer_is_found_compressed_and_counted():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)

    class CLIPLike(nn.Module):  # the visual tower at <module>.model.visual, as in PromptTunedCLIP
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.visual = visual

    holder = CLIPLike()
    assert select_vit(holder) == ("model.visual", visual)
    images = torch.randn(2, 3, 16, 16)
    visual.eval()
    reference = visual(images)
    keys = list(visual.state_dict())
    compression = apply_token_dropout(visual, patch_scaling=True)
    assert list(visual.state_dict()) == keys
    assert torch.allclose(visual(images), reference, atol=1e-6)
    compression.set(0.5, 2)
    visual.train()
    measured = training_flops(visual, lambda y: y.sum(), images)
    model = compression.cost_model
    assert measured == 2 * model.training_flops(0.5, 2) + model.resample_flops(2, "flexi")
    compression.remove()
    assert "_embeds" not in vars(visual) and type(visual.conv1) is nn.Conv2d
    visual.eval()
    assert torch.allclose(visual(images), reference, atol=1e-6)


def test_token_drop_takes_the_mode_of_the_slot_it_fills():
    """A frozen tower kept in eval mode whose dropout slot follows training (PromptTunedCLIP) gets a
    token dropper that acts in training steps; a plain ViT's slot has the ViT's own mode."""
    clip = create_clip_model("stacktrain-micro-clip").eval()
    clip.visual.patch_dropout.train()
    compression = apply_token_dropout(clip.visual)
    compression.set(keep_ratio=0.5)
    assert compression.drop.training and not clip.visual.training
    lengths = []
    clip.visual.transformer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        clip.visual(torch.zeros(2, 3, 32, 32))
    assert lengths == [1 + 8]
    # forward only: no gradient flows through a frozen tower, and the count says so
    cost = compression.cost_model
    assert compression.drop.flops_full == 2 * cost.flops(17, 16, cost.kernel_area(1, "flexi"), backward=False)
    compression.remove()
