"""PromptTunedCLIP end to end on small open_clip models: what trains and what stays frozen, PTNL's
training samples, feature caching, errors before training, exact resume, a standard ViT-B-32
loaded from a local file, and readiness for the other techniques of the stack."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger

from conftest import make_trainer
from resume_harness import assert_resumed_exactly, load_checkpoint_weights_only, stop_and_resume
from stacktrain.callbacks import EfficiencyReport, ExactResume
from stacktrain.datamodules import DigitsDataModule, ShapesDataModule
from stacktrain.errors import StackError
from stacktrain.functional.clip import clip_logits, create_clip_model, encode_images
from stacktrain.functional.prompt_tuning import top_confident_per_class
from stacktrain.lightning_modules import PromptTunedCLIP
from stacktrain.lightning_modules.prompt_tuning import CachedFeatures, FewShotView
from stacktrain.stack import FLOPS_PER_STEP, Technique


def shapes(**kwargs) -> ShapesDataModule:
    options = dict(train_size=120, val_size=40, test_size=40, batch_size=8)
    options.update(kwargs)
    return ShapesDataModule(**options)


def tuned(path: str, **kwargs) -> PromptTunedCLIP:
    options = dict(model_name="stacktrain-micro-clip", pretrained=path, n_ctx=4, shots=4)
    options.update(kwargs)
    return PromptTunedCLIP(**options)


def fit(model, data, tmp_path, **kwargs) -> Trainer:
    options = dict(max_steps=4, limit_val_batches=2, num_sanity_val_steps=0)
    options.update(kwargs)
    trainer = make_trainer(tmp_path, **options)
    trainer.fit(model, data)
    return trainer


class RecordingLogger(Logger):
    """Keeps every logged metric with its step, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))


def test_only_the_prompt_trains_and_the_baseline_is_logged_first(micro_clip, tmp_path):
    model = tuned(micro_clip)
    initial_ctx = model.prompt.ctx.detach().clone()
    frozen = {k: v.clone() for k, v in model.model.state_dict().items()}
    logger = RecordingLogger()
    report = EfficiencyReport(dirpath=str(tmp_path / "report"))
    trainer = fit(model, shapes(), tmp_path, logger=logger, callbacks=[report], log_every_n_steps=1,
                  val_check_interval=2)
    assert trainer.global_step == 4
    assert not torch.equal(model.prompt.ctx, initial_ctx)
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert all(not p.requires_grad for p in model.model.parameters())
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    # frozen towers in eval mode, except the visual tower's patch_dropout slot (token dropout acts there)
    slot = model.model.visual.patch_dropout
    assert all(not m.training for m in model.model.modules() if m is not slot)
    assert slot.training
    # the zero-shot baseline is logged before any training metric
    first_step, first = logger.records[0]
    assert first_step == 0 and first["prompt_tuning/zero_shot_acc"] == model.zero_shot_accuracy
    # ...and it is the hand-written prompts' accuracy on the validation split, recounted here
    model.eval()
    with torch.no_grad():
        hits = [clip_logits(encode_images(model.model, images), model.zero_shot_text, model.model.logit_scale)
                .argmax(-1) == labels for images, labels in trainer.datamodule.val_dataloader()]
    assert model.zero_shot_accuracy == pytest.approx(float(torch.cat(hits).float().mean()), abs=1e-6)
    # a random micro CLIP scores ~0 zero-shot: with class prototypes as the text side the accuracy is far
    # from 0, and the baseline still counts it exactly
    with torch.no_grad():
        pairs = [(encode_images(model.model, images), labels) for images, labels in trainer.datamodule.val_dataloader()]
        features, labels = torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])
        model.zero_shot_text = torch.stack([
            F.normalize(features[labels == c].mean(0), dim=-1) if (labels == c).any() else torch.zeros(features.shape[1])
            for c in range(len(model.class_names))])
        logits = clip_logits(features, model.zero_shot_text, model.model.logit_scale)
    expected = float((logits.argmax(-1) == labels).float().mean())
    assert expected > 0.2  # chance: 1/9
    assert model._zero_shot_baseline() == pytest.approx(expected, abs=1e-6)
    assert first["prompt_tuning/train_samples"] == 40 and first["prompt_tuning/label_noise"] == 0.0
    later = {k for _, metrics in logger.records[1:] for k in metrics}
    assert {"train/loss", "val/acc", "val/zero_shot_acc", "efficiency/step_wall_ms"} <= later
    assert model.zero_shot_accuracy == first["prompt_tuning/zero_shot_acc"]
    rows = {row.quantity: row for row in report.rows() if row.technique == "prompt_tuning"}
    assert rows["trainable parameters"].actual / rows["trainable parameters"].count == 4 * 64
    assert 0 < rows[FLOPS_PER_STEP].ratio < 1 and rows[FLOPS_PER_STEP].count == 4


def test_k_shots_with_ptnl_noise_keep_every_class_at_k(micro_clip, tmp_path):
    """PTNL's noise: each class keeps exactly k samples labelled as it, round(noise * k) of them images
    of other classes (reproducible from the seed)."""
    data = shapes()
    model = tuned(micro_clip, label_noise=0.25, seed=3)
    fit(model, data, tmp_path, max_steps=1)
    view = data.train_set
    assert isinstance(view, FewShotView) and len(view) == 40
    truth = view.base.labels[model.selection["indices"]]
    given = model.selection["labels"]
    assert torch.bincount(given, minlength=10).tolist() == [4] * 10  # balanced labels, as PTNL keeps them
    assert [int((given != truth)[given == c].sum()) for c in range(10)] == [1] * 10  # 1 of 4 from another class
    assert model.selection_stats["label_noise"] == 0.25
    again = tuned(micro_clip, label_noise=0.25, seed=3)
    fit(again, data, tmp_path, max_steps=1)
    assert torch.equal(again.selection["indices"], model.selection["indices"])
    assert torch.equal(again.selection["labels"], given)


def test_k_shots_with_seeded_symmetric_noise(micro_clip, tmp_path):
    data = shapes()
    model = tuned(micro_clip, label_noise=0.25, seed=3, noise_model="flip")
    fit(model, data, tmp_path, max_steps=1)
    view = data.train_set
    assert isinstance(view, FewShotView) and len(view) == 40
    truth = view.base.labels[model.selection["indices"]]
    given = model.selection["labels"]
    assert torch.bincount(truth, minlength=10).tolist() == [4] * 10
    assert [int((given != truth)[truth == c].sum()) for c in range(10)] == [1] * 10  # 25% of 4 shots
    assert model.selection_stats["label_noise"] == 0.25
    again = tuned(micro_clip, label_noise=0.25, seed=3, noise_model="flip")
    fit(again, data, tmp_path, max_steps=1)  # the data module's view is replaced, not stacked
    assert torch.equal(again.selection["indices"], model.selection["indices"])
    assert torch.equal(again.selection["labels"], given)


def test_unsupervised_mode_trains_on_the_most_confident_zero_shot_labels(micro_clip, tmp_path):
    data = shapes()
    model = tuned(micro_clip, unsupervised=True, shots=3, cache_features=True)
    fit(model, data, tmp_path, max_steps=1)
    pool = data.train_set.base
    with torch.no_grad():
        probs = clip_logits(encode_images(model.model, pool.images), model.zero_shot_text,
                            model.model.logit_scale).softmax(-1)
    indices, labels = top_confident_per_class(probs, 3)
    assert torch.equal(model.selection["indices"], indices) and torch.equal(model.selection["labels"], labels)
    assert model.selection_stats["pseudo_label_acc"] == pytest.approx(float((labels == pool.labels[indices]).float().mean()))


def test_cached_features_train_the_same_prompt_as_images(micro_clip, tmp_path):
    runs = {}
    for cache in (False, True):
        data = shapes()
        model = tuned(micro_clip, cache_features=cache, label_noise=0.25, loss="gce")
        fit(model, data, tmp_path, max_steps=6)
        runs[cache] = (model, data)
    cached_view = runs[True][1].train_set
    assert isinstance(cached_view, CachedFeatures) and cached_view[0][0].shape == (64,)
    assert torch.allclose(runs[True][0].prompt.ctx, runs[False][0].prompt.ctx, atol=1e-5)
    assert not torch.equal(runs[True][0].prompt.ctx, tuned(micro_clip).prompt.ctx)


@pytest.mark.parametrize("kwargs,data,message", [
    (dict(class_names=["square", "circle", "triangle", "diamond", "cross", "ring", "star", "crescent", "heart",
                       "arrow"]), {}, "class_names=.* does not match the data's classes"),
    (dict(class_names=["circle", "square"]), {}, "has 2 names but the data has 10 classes"),
    (dict(shots=13), {}, r"shots=13 is more than the data allows: class '\w+' has only \d+ training samples"),
    (dict(unsupervised=True, shots=13), {}, r"shots=13 is more than the data allows: 13 x 10 classes > 120"),
    (dict(cache_features=True), dict(augment=True), "cache_features=True needs training images without random"),
    (dict(), dict(image_size=24), r"takes \(32, 32\) images but the data gives \(24, 24\)"),
])
def test_bad_settings_fail_before_the_first_batch(micro_clip, tmp_path, kwargs, data, message):
    model = tuned(micro_clip, **kwargs)
    before = model.prompt.ctx.detach().clone()
    with pytest.raises(StackError, match=message) as info:
        fit(model, shapes(**data), tmp_path)
    assert "Fix:" in str(info.value)
    assert model.trainer.global_step == 0 and torch.equal(model.prompt.ctx, before)


def test_grayscale_data_and_unnamed_classes(micro_clip, tmp_path):
    with pytest.raises(StackError, match="CLIP takes 3-channel images but the data gives 1.*channels: 3"):
        fit(tuned(micro_clip), DigitsDataModule(image_size=32, channels=1), tmp_path)
    # the digits only number their classes: the model may name them
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    model = tuned(micro_clip, class_names=names)
    fit(model, DigitsDataModule(image_size=32, channels=3, batch_size=8), tmp_path, max_steps=1)
    assert model.prompt.class_names == names


@pytest.mark.parametrize("kwargs,message", [
    (dict(model_name="ViT-B-33"), "model_name='ViT-B-33' is not an open_clip model; closest: ViT-B-32"),
    (dict(pretrained="/nowhere/weights.pt"), "pretrained='/nowhere/weights.pt' does not exist"),
    (dict(pretrained="laion9b"), "pretrained='laion9b' is neither a local weights file nor a released tag"),
    (dict(pretrained=None), "pretrained=None is needed: prompt tuning adapts a pretrained CLIP"),
    (dict(unsupervised=True, label_noise=0.25), "label_noise=0.25 cannot be combined with unsupervised"),
    (dict(loss="mse"), "loss='mse' is not one of"),
    (dict(label_noise=1.0), r"label_noise=1.0 is out of range"),
    (dict(shots=0), r"shots=0 is out of range"),
])
def test_bad_arguments_are_named(micro_clip, kwargs, message):
    with pytest.raises(StackError, match=message):
        tuned(micro_clip, **kwargs)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    torch.save(create_clip_model("stacktrain-micro-clip").state_dict(), tmp_path / "micro.pt")
    with pytest.raises(StackError, match="pretrained=.* cannot be loaded into stacktrain-tiny-clip.*model_name"):
        PromptTunedCLIP("stacktrain-tiny-clip", pretrained=str(tmp_path / "micro.pt"))


def test_stop_and_resume_gives_identical_prompts(micro_clip, tmp_path):
    runs = stop_and_resume(
        lambda: tuned(micro_clip, label_noise=0.25, loss="gce"), lambda: shapes(augment=True),
        lambda: [ExactResume(), EfficiencyReport(dirpath=str(tmp_path / "report"))],
        total=12, stop_at=7, root=tmp_path,
    )
    assert_resumed_exactly(runs)
    full, resumed = runs.uninterrupted[0], runs.resumed[0]
    assert torch.equal(full.prompt.ctx, resumed.prompt.ctx)
    checkpoint = load_checkpoint_weights_only(runs.checkpoint)
    assert list(checkpoint["state_dict"]) == ["prompt.ctx"]  # the frozen CLIP comes from `pretrained`
    assert os.path.getsize(runs.checkpoint) < 200_000
    assert checkpoint["prompt_tuning"]["selection"]["labels"].shape == (40,)
    # resuming the prompt on other towers is refused
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(create_clip_model("stacktrain-micro-clip").state_dict(), other)
    trainer = make_trainer(max_steps=12, limit_val_batches=0)
    with pytest.raises(StackError, match="holds weights other than those the checkpoint's prompt was tuned on"):
        trainer.fit(tuned(str(other), label_noise=0.25, loss="gce"), shapes(augment=True), ckpt_path=runs.checkpoint)


def test_a_standard_vit_b_32_loads_from_a_local_file_and_tunes(tmp_path):
    """The path real users take with released weights: a standard architecture, by name, weights from
    a file (here randomly initialised ViT-B-32 weights, since nothing can be downloaded)."""
    torch.manual_seed(0)
    source = create_clip_model("ViT-B-32")
    path = tmp_path / "vit_b_32.pt"
    torch.save({k: v.half() for k, v in source.state_dict().items()}, path)  # half the bytes to write
    model = PromptTunedCLIP("ViT-B-32", pretrained=str(path), n_ctx=4, shots=2, cache_features=True)
    assert torch.equal(model.model.visual.conv1.weight, source.visual.conv1.weight.half().float())
    del source
    data = ShapesDataModule(image_size=224, classes=["circle", "square"], train_size=8, val_size=4, test_size=4,
                            batch_size=2)
    before = model.prompt.ctx.detach().clone()
    trainer = fit(model, data, tmp_path, max_steps=2, limit_val_batches=0)
    assert trainer.global_step == 2 and model.prompt.class_names == ["circle", "square"]
    assert model.prompt.ctx.shape == (4, 512) and not torch.equal(model.prompt.ctx, before)
    assert model.zero_shot_accuracy is not None


def test_declared_stack_conflicts(micro_clip, tmp_path):
    class TokenDropout(Technique):  # stands in for the real callback: only its name matters here
        name = "token_dropout"

    assert "TokenDropout" not in tuned(micro_clip).conflicts
    assert "PruneRegrow" in tuned(micro_clip).conflicts
    model = tuned(micro_clip, cache_features=True)
    with pytest.raises(StackError, match="TokenDropout: .*cannot be attached to PromptTunedCLIP: cache_features=True"):
        fit(model, shapes(), tmp_path, callbacks=[TokenDropout()])
    assert model.trainer.global_step == 0


def test_token_dropout_in_the_frozen_visual_tower_acts_only_in_training(micro_clip, tmp_path):
    """A token-dropout module placed in open_clip's `patch_dropout` slot shortens the sequence of the
    frozen visual tower in training steps, and evaluation sees every token."""
    from open_clip.transformer import PatchDropout

    model = tuned(micro_clip)
    model.model.visual.patch_dropout = PatchDropout(0.5)
    model.train()
    lengths = {"train": set(), "eval": set()}
    model.model.visual.transformer.register_forward_pre_hook(
        lambda module, args: lengths["train" if model.model.visual.patch_dropout.training else "eval"].add(
            args[0].shape[1]))
    fit(model, shapes(), tmp_path, max_steps=2, check_val_every_n_epoch=1, limit_val_batches=1)
    assert lengths["train"] == {1 + 8} and 1 + 16 in lengths["eval"]  # class token + half of 16 patches
