"""`vit_convstem_tiny`: a timm ViT with a stride-1 conv stem before the patch projection, its geometry,
token dropout and patch scaling on it, and that the FLOP counter and `ViTCostModel` both count its stem."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from stacktrain.errors import StackError
from stacktrain.functional.flops import forward_flops, training_flops
from stacktrain.functional.token_dropout import FlexiPatchConv, ViTCostModel, apply_token_dropout
from stacktrain.models import check_input_shape, create_timm_model, first_conv
from stacktrain.vit_convstem import ConvStemPatchEmbed, stem_macs

# 16x16 grayscale, 2 px patches (64 patch tokens), an 8-channel stem of 2 layers
SMALL = dict(img_size=16, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, stem_channels=8,
             stem_layers=2)


def small(**overrides) -> nn.Module:
    return create_timm_model("vit_convstem_tiny", num_classes=10, in_chans=1, model_kwargs={**SMALL, **overrides})


def test_defaults_are_the_benchmarks_vit_with_a_stem_64_tokens_on_32px():
    model = create_timm_model("vit_convstem_tiny", num_classes=10, in_chans=1)
    embed = model.patch_embed
    assert isinstance(embed, ConvStemPatchEmbed)
    assert embed.grid_size == (8, 8) and embed.num_patches == 64 and embed.patch_size == (4, 4)
    assert [(c.in_channels, c.out_channels, c.stride) for c in embed.stem if isinstance(c, nn.Conv2d)] == [
        (1, 32, (1, 1)), (32, 32, (1, 1)), (32, 32, (1, 1))]
    assert (embed.proj.in_channels, embed.proj.out_channels, embed.proj.kernel_size) == (32, 96, (4, 4))
    assert (model.embed_dim, len(model.blocks), model.blocks[0].mlp.fc1.out_features) == (96, 6, 192)
    assert (model.global_pool, model.num_prefix_tokens) == ("avg", 1)
    images = torch.randn(2, 1, 32, 32)
    assert embed(images).shape == (2, 64, 96)
    assert model.forward_features(images).shape == (2, 65, 96)  # class token + 64 patches
    assert model(images).shape == (2, 10)
    # the image's channels are checked at the stem, not at the projection
    assert first_conv(model) is embed.stem[0]
    check_input_shape(model, (1, 32, 32), source="test")
    with pytest.raises(StackError, match="in_chans"):
        check_input_shape(model, (3, 32, 32), source="test")
    with pytest.raises(StackError, match="img_size"):
        check_input_shape(model, (1, 64, 64), source="test")


def test_stem_settings_are_checked():
    assert len(small(stem_layers=1).patch_embed.stem) == 3
    with pytest.raises(StackError, match="stem_channels"):
        small(stem_channels=0)
    with pytest.raises(StackError, match="stem_layers"):
        small(stem_layers=1.5)
    with pytest.raises(StackError, match="is not a timm model"):
        create_timm_model("vit_convstem_tiniest", num_classes=10)


def test_token_dropout_keeps_state_dict_keys_and_shortens_the_sequence():
    model = small()
    keys = list(model.state_dict())
    compression = apply_token_dropout(model, patch_scaling=False)
    assert list(model.state_dict()) == keys
    compression.set(keep_ratio=0.25)
    model.train()
    model(torch.randn(3, 1, 16, 16))
    assert compression.drop.sequence_lengths == {1 + 16}
    model.eval()
    assert model.forward_features(torch.randn(3, 1, 16, 16)).shape == (3, 65, 32)  # evaluation sees all
    compression.remove()
    assert isinstance(model.patch_drop, nn.Identity)


def test_patch_scaling_swaps_the_projection_after_the_stem():
    model = small().eval()
    images = torch.randn(3, 1, 16, 16)
    before = model(images)
    keys = list(model.state_dict())
    compression = apply_token_dropout(model, patch_scaling=True)
    assert isinstance(model.patch_embed.proj, FlexiPatchConv) and list(model.state_dict()) == keys
    assert torch.allclose(model(images), before, atol=1e-6)  # native grid: the same model
    compression.set(keep_ratio=0.5, patch_scale=2)
    model.train()
    model(images).sum().backward()
    assert compression.drop.sequence_lengths == {1 + 8}  # 4x4 grid of 4 px patches, half kept
    assert model.patch_embed.stem[0].weight.grad is not None


def test_flop_counter_and_cost_model_both_count_the_stem():
    model = small()
    embed = model.patch_embed
    # by hand: 3x3 convs at 16x16, 1 -> 8 then 8 -> 8 channels
    first, second = 9 * 1 * 8 * 16 * 16, 9 * 8 * 8 * 16 * 16
    assert stem_macs(embed) == first + second == 165888
    cost = ViTCostModel.from_vit(model)
    assert (cost.patch_size, cost.in_chans, cost.sequence()) == ((2, 2), 1, (64, 65))
    assert (cost.stem_flops, cost.stem_first_flops) == (2 * (first + second), 2 * first)
    measured = forward_flops(model, torch.randn(1, 1, 16, 16))
    assert measured == cost.flops(65, 64, 4, backward=False)
    # training: the stem's forward and backward (no input gradient for the image) and the projection's
    # input gradient (its input is the stem's output now, not the image)
    batch = 2
    measured = training_flops(model.train(), lambda y: y.sum(), torch.randn(batch, 1, 16, 16))
    assert measured == batch * cost.training_flops()
    # the stem is a fixed cost: compression saves less than on a plain ViT
    plain = ViTCostModel(**{**cost.__dict__, "stem_flops": 0.0, "stem_first_flops": 0.0})
    assert plain.relative_cost(0.5, 1) < cost.relative_cost(0.5, 1) < 1.0


def test_stem_macs_is_zero_for_a_plain_patch_embedding():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=16, patch_size=2,
                            embed_dim=32, depth=1, num_heads=2)
    assert stem_macs(vit.patch_embed) == 0


def test_a_training_step_changes_the_stem_and_the_blocks():
    torch.manual_seed(0)
    model = small(depth=1).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 16, 16)), torch.randint(0, 10, (8,)))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {"patch_embed.stem.0.weight", "patch_embed.stem.1.weight", "patch_embed.proj.weight",
            "blocks.0.attn.qkv.weight", "head.weight"} <= changed
    assert model.patch_embed.stem[1].num_batches_tracked.item() == 1
