"""``compile: true`` with each technique: the compiled run trains like the eager one, TokenDropout keeps
recompilation bounded whatever its schedule, and what cannot be compiled stops before the first batch.

Most runs use torch._dynamo's ``CompileCounter`` backend: it counts the graphs Dynamo captures and runs
them as captured (no code generation), so it is cheap and gives eager numbers; one test compiles with
inductor, the default backend.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from torch._dynamo.testing import CompileCounter

from conftest import TINY_VIT, make_trainer
from stacktrain.callbacks import GradientQuantization, PruneRegrow, TokenDropout
from stacktrain.datamodules import DigitsDataModule, MultiViewDataModule
from stacktrain.errors import StackError
from stacktrain.lightning_modules import ImageClassifier, SimCLR


def vit(**kwargs) -> ImageClassifier:
    return ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(TINY_VIT), **kwargs)


#: configs/quickstart.yaml's ViT: 16 px, 4 px patches (16 tokens + class token), 6 blocks of width 96
QUICKSTART_VIT = dict(img_size=16, patch_size=4, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0)


def quickstart_vit(**kwargs) -> ImageClassifier:
    return ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(QUICKSTART_VIT), **kwargs)


def resnet(**kwargs) -> ImageClassifier:
    return ImageClassifier("test_resnet", in_chans=1, **kwargs)


def fit(make_module, callbacks, steps: int, tmp_path, backend=None, data=None):
    """Train ``steps`` steps; compiled with ``backend`` (a fresh Dynamo cache) when given."""
    torch._dynamo.reset()
    seed_everything(0)
    options = {"compile": True, "compile_options": {"backend": backend}} if backend is not None else {}
    module = make_module(**options)
    trainer = make_trainer(tmp_path, callbacks, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data or DigitsDataModule(image_size=16, channels=1, batch_size=32))
    assert trainer.global_step == steps
    return module


def assert_same_weights(first, second) -> None:
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_token_dropout_recompiles_a_bounded_number_of_times_whatever_the_schedule(tmp_path):
    """The quickstart ViT on a linear schedule: a new sequence length every step or two; the graph count
    stays the same for 6 or 12 steps (before the dropout ran outside the graph, every new keep ratio recompiled:
    9 graphs in 12 steps, up to Dynamo's cache limit)."""
    counts, lengths = [], []
    for steps in (6, 12):
        counter = CompileCounter()
        dropout = TokenDropout(keep_ratio=0.25, schedule="linear", until=1.0)
        compiled = fit(quickstart_vit, [dropout], steps, tmp_path / str(steps), backend=counter)
        counts.append(counter.frame_count)
        lengths.append(dropout.compiled_shapes["sequence_lengths"])
        assert dropout.compiled_shapes["graphs"] == counter.frame_count  # what its log line says
        eager = fit(quickstart_vit, [TokenDropout(keep_ratio=0.25, schedule="linear", until=1.0)], steps, tmp_path / "eager")
        assert_same_weights(compiled, eager)  # same masks, same updates
    assert len(lengths[0]) >= 4 and len(lengths[1]) > len(lengths[0])
    # the same graphs for 6 and 12 lengths: the forward up to the dropout, what follows it at the first
    # length, then once more with the length symbolic (and the graphs Dynamo splits around them)
    assert counts[0] == counts[1] <= 5


def test_patch_scaling_adds_a_bounded_number_of_compiles(tmp_path):
    counter = CompileCounter()
    schedule = [{"end": 0.5, "keep_ratio": 0.5, "patch_scale": 2}, {"end": 0.75, "keep_ratio": 0.6},
                {"end": 1.0, "keep_ratio": 0.8}]
    dropout = TokenDropout(schedule=schedule)
    compiled = fit(vit, [dropout], 8, tmp_path, backend=counter)
    assert len(dropout.compiled_shapes["sequence_lengths"]) == 3
    assert counter.frame_count <= 8  # the patch embedding recompiles for its second scale
    assert_same_weights(compiled, fit(vit, [TokenDropout(schedule=schedule)], 8, tmp_path / "eager"))


def test_prune_regrow_compiles_again_once_after_compaction(tmp_path):
    def explorer():
        return [PruneRegrow(target_flops_ratio=0.5, update_every=2, update_unit="step", explore_until=0.5,
                            compact_after_explore=True)]

    counter = CompileCounter()
    callbacks = explorer()
    compiled = fit(resnet, callbacks, 6, tmp_path, backend=counter)
    assert callbacks[0].compacted
    assert counter.frame_count == 2  # dense network, then the compacted one (the trace ran eagerly)
    assert_same_weights(compiled, fit(resnet, explorer(), 6, tmp_path / "eager"))


def test_weight_gradient_quantization_compiles(tmp_path):
    def quantization():
        return [GradientQuantization(bits=4, targets="weights", compensation="hypernet", stochastic_rounding=False)]

    counter = CompileCounter()
    compiled = fit(resnet, quantization(), 3, tmp_path, backend=counter)
    assert counter.frame_count == 1
    # the weight-gradient hooks ran after the compiled backward: the same updates as eager
    assert_same_weights(compiled, fit(resnet, quantization(), 3, tmp_path / "eager"))


def test_activation_gradient_quantization_is_refused_before_the_first_batch(tmp_path):
    with pytest.raises(StackError, match=r"GradientQuantization: targets='both' cannot be compiled .*every layer"):
        fit(resnet, [GradientQuantization(bits=4, targets="both")], 1, tmp_path, backend=CompileCounter())


def test_simclr_compiles_its_backbone_with_token_dropout(tmp_path):
    def simclr(**kwargs):
        return SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(TINY_VIT), projection_dim=16,
                      hidden_dim=32, **kwargs)

    def data():
        return MultiViewDataModule(DigitsDataModule(image_size=16, channels=1, batch_size=16), global_views=2)

    counter = CompileCounter()
    dropout = TokenDropout(keep_ratio=0.5)
    compiled = fit(simclr, [dropout], 3, tmp_path, backend=counter, data=data())
    # asymmetric token dropout (the default): view 0 at 8 of 16 patch tokens, view 1 full, every step;
    # the two lengths end in one symbolic-length graph instead of one graph per length
    assert 0 < counter.frame_count <= 5 and dropout.compiled_shapes["sequence_lengths"] == [9, 17]
    assert_same_weights(compiled, fit(simclr, [TokenDropout(keep_ratio=0.5)], 3, tmp_path / "eager", data=data()))


def test_vit_with_token_dropout_under_inductor(tmp_path):
    """The real compiler (inductor, C++ on the CPU) with TokenDropout, at one keep ratio (a second
    length would compile the symbolic graph too: a minute on 2 cores, left to the counting tests);
    the number of graphs the log line reports is Dynamo's own count."""
    from torch._dynamo.utils import counters

    def one_block(**kwargs):
        return ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs={**TINY_VIT, "depth": 1}, **kwargs)

    dropout = TokenDropout(keep_ratio=0.5)
    counters.clear()
    compiled = fit(one_block, [dropout], 2, tmp_path, backend="inductor")
    assert dropout.compiled_shapes["sequence_lengths"] == [9]
    assert dropout.compiled_shapes["graphs"] == counters["stats"]["unique_graphs"] <= 5
    assert_same_weights(compiled, fit(one_block, [TokenDropout(keep_ratio=0.5)], 2, tmp_path / "eager"))
