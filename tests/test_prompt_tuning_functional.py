"""The functional core of prompt tuning (no Lightning): text encoding from embeddings, CoOp's
prompt learner, generalized cross-entropy, and PTNL's few-shot / noise / pseudo-label selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stacktrain.errors import StackError
from stacktrain.functional.clip import clip_tokenizer, create_clip_model, zero_shot_weights
from stacktrain.functional.prompt_tuning import (
    PromptLearner,
    apply_prompt_tuning,
    encode_text_embeddings,
    generalized_cross_entropy,
    noisy_few_shot,
    sample_few_shot,
    symmetric_label_noise,
    text_tower,
    top_confident_per_class,
)

NAMES = ["circle", "hot dog", "square"]


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = create_clip_model("stacktrain-micro-clip").eval().requires_grad_(False)
    return model, clip_tokenizer("stacktrain-micro-clip")


def test_encoding_from_embeddings_is_encode_text(micro):
    model, tokenizer = micro
    tokens = tokenizer(["a photo of a circle.", "a small red star on the left", ""])
    tower = text_tower(model)
    from_embeddings = encode_text_embeddings(tower, tower.token_embedding(tokens), tokens)
    assert torch.equal(from_embeddings, model.encode_text(tokens))
    assert tower.context_length == 24 and tower.pool_type == "argmax"


@pytest.mark.parametrize("position,text", [
    ("end", "a photo of a {}."), ("front", "{} a photo of a."), ("middle", "a photo {} of a."),
])
def test_prompt_initialised_from_a_phrase_is_the_hand_written_prompt(micro, position, text):
    """Before any training, the learned prompt equals the tokenized sentence, for every class
    position (class names of one and two tokens)."""
    model, tokenizer = micro
    learner = PromptLearner(model, tokenizer, NAMES, ctx_init="a photo of a", class_token_position=position)
    assert learner.n_ctx == 4 and learner.name_lens == [1, 2, 1]
    expected = model.encode_text(tokenizer([text.format(name) for name in NAMES]), normalize=True)
    assert torch.equal(learner.encode(model), expected)


def test_random_context_is_seeded_and_the_only_saved_state(micro):
    model, tokenizer = micro
    make = lambda seed, **kw: PromptLearner(model, tokenizer, NAMES, n_ctx=5,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed), **kw)
    shared, again, other = make(0), make(0), make(1)
    assert shared.ctx.shape == (5, 64) and torch.equal(shared.ctx, again.ctx)
    assert not torch.equal(shared.ctx, other.ctx)
    assert abs(shared.ctx.std().item() - 0.02) < 0.005
    assert list(shared.state_dict()) == ["ctx"]  # prefix/suffix are rebuilt from the frozen model
    assert shared().shape == (3, 24, 64)
    specific = make(0, class_specific=True)
    assert specific.ctx.shape == (3, 5, 64)
    # each class's prompt uses its own context: changing class 0's context changes class 0 only
    before = specific.encode(model)
    with torch.no_grad():
        specific.ctx[0] += 1.0
    after = specific.encode(model)
    assert not torch.allclose(before[0], after[0]) and torch.equal(before[1:], after[1:])


def test_gradient_reaches_only_the_context(micro):
    model, tokenizer = micro
    learner = PromptLearner(model, tokenizer, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(0))
    images = torch.randn(6, 64)
    logits = F.normalize(images, dim=-1) @ learner.encode(model).T
    F.cross_entropy(logits * 10, torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_apply_prompt_tuning_freezes_the_model_and_returns_the_seeded_learner():
    torch.manual_seed(0)
    model = create_clip_model("stacktrain-micro-clip")
    tokenizer = clip_tokenizer("stacktrain-micro-clip")
    assert any(p.requires_grad for p in model.parameters())
    learner = apply_prompt_tuning(model, tokenizer, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(3))
    assert not any(p.requires_grad for p in model.parameters())  # only the context trains
    assert [name for name, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    direct = PromptLearner(model, tokenizer, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(learner.ctx, direct.ctx) and learner.class_names == direct.class_names


def test_names_can_be_bound_after_construction(micro):
    model, tokenizer = micro
    late = PromptLearner(model, tokenizer, None, n_ctx=4, generator=torch.Generator().manual_seed(0))
    assert late.ctx.shape == (4, 64)  # the parameter exists before the class names are known
    with pytest.raises(StackError, match="has no class names yet"):
        late()
    late.bind_classes(model, tokenizer, NAMES)
    early = PromptLearner(model, tokenizer, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(late.encode(model), early.encode(model))


def test_prompts_that_do_not_fit_the_context_are_rejected(micro):
    model, tokenizer = micro
    with pytest.raises(StackError, match=r"n_ctx=20 leaves no room for the class name 'hot dog'.*at most 19"):
        PromptLearner(model, tokenizer, NAMES, n_ctx=20)
    PromptLearner(model, tokenizer, NAMES, n_ctx=19)  # exactly fits: SOS + 19 + 2 + "." + EOT = 24
    with pytest.raises(StackError, match="class_token_position='left'"):
        PromptLearner(model, tokenizer, NAMES, class_token_position="left")
    with pytest.raises(StackError, match="needs the class names at construction"):
        PromptLearner(model, tokenizer, None, class_specific=True)


def test_text_towers_without_token_embeddings_are_rejected():
    class HuggingFaceLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.text = nn.Linear(2, 2)

    with pytest.raises(StackError, match="without token_embedding.*open_clip's own TextTransformer"):
        text_tower(HuggingFaceLike())


def test_zero_shot_weights_average_the_templates(micro):
    model, tokenizer = micro
    weights = zero_shot_weights(model, tokenizer, ["circle", "square"], ["a photo of a {}.", "a {}"])
    by_hand = []
    for name in ["circle", "square"]:
        features = model.encode_text(tokenizer([f"a photo of a {name}.", f"a {name}"]), normalize=True).mean(0)
        by_hand.append(F.normalize(features, dim=-1))
    assert torch.allclose(weights, torch.stack(by_hand), atol=1e-6)


# ------------------------------------------------------------------------------ the robust loss


def test_generalized_cross_entropy_values():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p(class 1) = 3/4
    target = torch.tensor([1])
    assert generalized_cross_entropy(logits, target, q=0.5).item() == pytest.approx((1 - 0.75**0.5) / 0.5)
    assert generalized_cross_entropy(logits, target, q=1.0).item() == pytest.approx(0.25)  # MAE: 1 - p
    ce = F.cross_entropy(logits, target).item()
    assert generalized_cross_entropy(logits, target, q=1e-4).item() == pytest.approx(ce, rel=1e-3)
    with pytest.raises(StackError, match=r"q=0 is out of range \(0, 1\]"):
        generalized_cross_entropy(logits, target, q=0)


def test_gce_gradient_is_cross_entropy_weighted_by_p_to_the_q():
    """Why GCE resists label noise: a sample whose label the model contradicts (small p_y) pulls
    with weight p_y^q, so mislabelled samples count less than under cross-entropy."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 0.0, 2.5]], requires_grad=True)
    targets = torch.tensor([0, 0])  # the second sample's label is contradicted
    gce_grad, = torch.autograd.grad(generalized_cross_entropy(logits, targets, 0.5, reduction="sum"), logits)
    ce_grad, = torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), logits)
    p_y = logits.softmax(-1)[torch.arange(2), targets].detach()
    assert torch.allclose(gce_grad, ce_grad * p_y.sqrt()[:, None], atol=1e-6)
    assert gce_grad[1].norm() / ce_grad[1].norm() < 0.2 and gce_grad[0].norm() / ce_grad[0].norm() > 0.9


# ------------------------------------------------------------------------------ PTNL's protocol


def test_few_shot_sampling_takes_k_per_class_and_is_seeded():
    labels = torch.arange(60) % 3
    picked = sample_few_shot(labels, 4, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[picked], minlength=3).tolist() == [4, 4, 4]
    assert len(set(picked.tolist())) == 12
    assert torch.equal(picked, sample_few_shot(labels, 4, 3, torch.Generator().manual_seed(0)))
    assert not torch.equal(picked, sample_few_shot(labels, 4, 3, torch.Generator().manual_seed(1)))
    labels = torch.cat([labels, torch.tensor([0, 2])])  # class b is the smallest: 20 samples
    with pytest.raises(StackError, match=r"shots=21 is more than the data allows: class 'b' has only 20.*at most 20"):
        sample_few_shot(labels, 21, 3, torch.Generator(), class_names=["a", "b", "c"])


@pytest.mark.parametrize("rate,wrong_per_class", [(0.0, 0), (0.125, 2), (0.25, 4), (0.5, 8)])
def test_symmetric_noise_flips_exactly_the_rate_of_every_class(rate, wrong_per_class):
    labels = torch.arange(10).repeat_interleave(16)  # 16 shots of 10 classes
    noisy = symmetric_label_noise(labels, rate, 10, torch.Generator().manual_seed(3))
    wrong = noisy != labels
    assert [int(wrong[labels == c].sum()) for c in range(10)] == [wrong_per_class] * 10
    assert noisy.min() >= 0 and noisy.max() <= 9
    if rate == 0.5:  # flipped labels spread over the other classes
        assert len(set(noisy[wrong].tolist())) == 10
        again = symmetric_label_noise(labels, rate, 10, torch.Generator().manual_seed(3))
        assert torch.equal(noisy, again)


@pytest.mark.parametrize("num_noisy", [0, 2, 4, 8])
def test_ptnl_noise_keeps_k_per_class_with_a_set_number_from_other_classes(num_noisy):
    """PTNL's noisy k-shot set: 16 samples labelled as every class, ``num_noisy`` of them from other
    classes' reserves (never an image that is also one of the correct samples), seeded."""
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(1))
    indices, noisy = noisy_few_shot(labels, 16, num_noisy, 10, torch.Generator().manual_seed(3))
    assert len(indices) == 160 and torch.bincount(noisy, minlength=10).tolist() == [16] * 10
    wrong = labels[indices] != noisy
    assert [int(wrong[noisy == c].sum()) for c in range(10)] == [num_noisy] * 10
    assert not set(indices[~wrong].tolist()) & set(indices[wrong].tolist())
    assert len(set(indices[~wrong].tolist())) == int((~wrong).sum())  # correct samples are distinct
    again = noisy_few_shot(labels, 16, num_noisy, 10, torch.Generator().manual_seed(3))
    assert torch.equal(indices, again[0]) and torch.equal(noisy, again[1])


def test_ptnl_noise_needs_enough_samples_and_a_rate_below_one():
    labels = torch.arange(3).repeat_interleave(10)
    with pytest.raises(StackError, match=r"shots=12 is more than the data allows: class .a."):
        noisy_few_shot(labels, 12, 4, 3, torch.Generator(), class_names=["a", "b", "c"])
    with pytest.raises(StackError, match=r"num_noisy=4 must be in \[0, 4\)"):
        noisy_few_shot(labels, 4, 4, 3, torch.Generator())


def test_top_confident_keeps_the_k_surest_per_predicted_class():
    probs = torch.tensor([
        [0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.1, 0.9], [0.2, 0.8],
    ])
    indices, labels = top_confident_per_class(probs, 2)
    assert indices.tolist() == [0, 2, 5, 6] and labels.tolist() == [0, 0, 1, 1]
    indices, labels = top_confident_per_class(probs[:3], 2)  # nothing predicted as class 1
    assert indices.tolist() == [0, 2] and labels.tolist() == [0, 0]
