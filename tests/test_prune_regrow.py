"""`PruneRegrow` in real (tiny) training runs on the digits: exploration lands on the FLOPs budget,
regrowing happens, compaction shrinks the network and training goes on, exact resume, clear errors
before the first batch (the export: tests/test_export.py)."""

from __future__ import annotations

import json
import os
from functools import partial

import pytest
import torch
import torchvision
from lightning.pytorch import LightningModule, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY_VIT, make_trainer
from ddp_harness import assert_states_equal
from resume_harness import assert_resumed_exactly, load_checkpoint_weights_only, stop_and_resume
from stacktrain.callbacks import EfficiencyReport, ExactResume, PruneRegrow
from stacktrain.datamodules import DigitsDataModule
from stacktrain.errors import StackError
from stacktrain.functional.prune_regrow_meta import PRUNE_REGROW_META_VERSION, PruneRegrowMeta
from stacktrain.functional.flops import forward_flops
from stacktrain.lightning_modules import ImageClassifier
from stacktrain.stack import FLOPS_PER_STEP, INFERENCE_FLOPS, INFERENCE_FLOPS_AVERAGE

MODEL = "test_resnet"  # timm's 0.4M-parameter ResNet: basic and bottleneck blocks, tiered stem


def make_module(model_name: str = MODEL, **kwargs) -> ImageClassifier:
    return ImageClassifier(
        model_name, in_chans=1, optimizer=partial(torch.optim.AdamW, lr=3e-3),
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=3e-3), **kwargs,
    )


def make_data() -> DigitsDataModule:
    return DigitsDataModule(image_size=16, batch_size=32)


def fit(callbacks, steps: int, tmp_path, module=None, **kwargs):
    seed_everything(0)
    module = module or make_module()
    options = dict(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0)
    options.update(kwargs)
    trainer = make_trainer(tmp_path, callbacks, **options)
    trainer.fit(module, make_data())
    return module, trainer


class Steps(ImageClassifier):
    """Counts training steps, to prove that an error came before the first batch."""

    steps = 0

    def training_step(self, batch, batch_idx):
        Steps.steps += 1
        return super().training_step(batch, batch_idx)


# ------------------------------------------------------------------------------ exploration
def test_exploration_regrows_and_lands_on_the_flops_budget(tmp_path):
    explorer = PruneRegrow(target_flops_ratio=0.5, update_every=3, update_unit="step", explore_until=0.6)
    report = EfficiencyReport(dirpath=str(tmp_path / "report"))
    module, trainer = fit([explorer, report], 15, tmp_path)
    history = explorer.history
    # updates at step 0 (uniform start), every 3 steps, and at T_max = 0.6 * 15 = 9; frozen afterwards
    assert [h["step"] for h in history] == [0, 3, 6, 9] and explorer.schedule["t_max"] == 9
    deltas = [h["delta"] for h in history]
    assert deltas[0] == pytest.approx(0.3) and deltas == sorted(deltas, reverse=True) and deltas[-1] == 0.0
    assert sum(h["regrown_units"] for h in history[1:]) > 0  # pruned channels came back
    assert history[0]["flops_ratio"] > history[-1]["flops_ratio"]  # started wider than the budget
    assert 0.475 <= history[-1]["flops_ratio"] <= 0.5
    assert len({h["digest"] for h in history}) == len(history)  # the masks moved at every update
    assert all(h["digest"] == h["local_digest"] for h in history)
    # the masks are applied to the trained weights: every pruned slice is zero
    for group, mask in zip(explorer.plan.groups, explorer.masks):
        for s in group.slices:
            if s.zeroed and not bool(mask.all()):
                tensor = getattr(module.get_submodule(s.module), s.param)
                assert tensor.index_select(s.dim, s.grid[~mask].flatten()).abs().sum() == 0, s.key
    # per-layer widths differ: one global |gamma| threshold, not a uniform ratio
    fractions = {w / g.channels for w, g in zip(history[-1]["widths"], explorer.plan.groups)}
    assert len(fractions) > 2
    lines = {quantity: line for (technique, quantity), line in report.lines.items() if technique == "prune_regrow"}
    assert lines[FLOPS_PER_STEP].ratio == 1.0  # masked training computes the dense network
    # inference FLOPs: the final network's (what the user gets), the training average labelled as such
    assert lines[INFERENCE_FLOPS].ratio == pytest.approx(history[-1]["flops_ratio"])
    assert lines[INFERENCE_FLOPS_AVERAGE].ratio > lines[INFERENCE_FLOPS].ratio
    text = report.markdown()
    assert f"| prune_regrow | {INFERENCE_FLOPS} |" in text and f"| prune_regrow | {INFERENCE_FLOPS_AVERAGE} |" in text
    assert "of the network at the end of training" in text
    assert os.path.isfile(tmp_path / "prune_regrow_widths.png")


def test_prune_only_is_the_gradual_ablation_and_never_regrows(tmp_path):
    explorer = PruneRegrow(target_flops_ratio=0.5, update_every=3, update_unit="step", explore_until=0.6,
                           regrow_fraction=0.0)
    fit([explorer], 10, tmp_path)
    history = explorer.history
    # the paper's prune-only ablation: dense at step 0, the global allocation shrinks to the budget by
    # T_max = 6 along the cubic (1.0, then 0.5 + 0.5 * (1 - 3/6)^3 = 0.5625, then 0.5), nothing regrows
    assert [h["step"] for h in history] == [0, 3, 6]
    assert [h["regrown_units"] for h in history[1:]] == [0, 0]
    assert history[0]["flops_ratio"] == 1.0
    assert 0.5 < history[1]["flops_ratio"] <= 0.5625 and 0.45 <= history[2]["flops_ratio"] <= 0.5
    for before, after in zip(history, history[1:]):  # widths only shrink
        assert all(a <= b for a, b in zip(after["widths"], before["widths"]))
    full = [g.channels for g in explorer.plan.groups]
    kept = {round(w / f, 2) for w, f in zip(history[-1]["widths"], full)}
    assert len(kept) > 1  # BatchNorm |gamma| allocation, not one uniform ratio


def test_compaction_shrinks_the_network_and_training_goes_on(tmp_path):
    explorer = PruneRegrow(target_flops_ratio=0.5, update_every=3, update_unit="step", explore_until=0.5,
                           compact_after_explore=True)
    module, trainer = fit([explorer], 14, tmp_path)
    assert explorer.compacted and explorer.compacted_at == 7 == explorer.schedule["t_max"]
    assert trainer.global_step == 14
    dense = forward_flops(make_module().model, torch.zeros(1, 1, 16, 16))
    measured = forward_flops(module.model, torch.zeros(1, 1, 16, 16))  # the flop counter on the compact net
    assert measured == explorer.compact_flops
    assert abs(measured / dense - 0.5) <= 0.05 * 0.5  # within 5% of the target
    assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in make_module().parameters())
    optimizer = trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in module.parameters()}
    for param in module.parameters():
        assert optimizer.state[param]["exp_avg"].shape == param.shape
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 14  # the schedule went on
    assert explorer.layer_sizes and all(k.startswith("model.") for k in explorer.layer_sizes)
    # a checkpoint taken after compaction exports too (the dense model is rebuilt, then shrunk)
    from stacktrain import export_compact

    trainer.save_checkpoint(tmp_path / "compact.ckpt")
    result = export_compact(tmp_path / "compact.ckpt", tmp_path / "export")
    assert result["compact_flops"] == measured
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        exported = torch.export.load(result["program"]).module()(x)
        assert torch.allclose(exported, module.eval()(x), atol=1e-5)


class PlainModule(LightningModule):
    """Not an ImageClassifier: a torchvision network inside the smallest LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_any_lightning_module_with_a_torchvision_network(tmp_path):
    explorer = PruneRegrow(channel_sparsity=0.5, update_every=2, update_unit="step", explore_until=0.5,
                           compact_after_explore=True)
    seed_everything(0)
    module = PlainModule()
    trainer = make_trainer(str(tmp_path), [explorer], max_steps=8)
    trainer.fit(module, DigitsDataModule(image_size=16, channels=3, batch_size=32))
    assert explorer.network == "net" and explorer.compacted and trainer.global_step == 8
    assert explorer.history[-1]["channel_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert forward_flops(module, torch.zeros(1, 3, 16, 16)) == explorer.compact_flops < explorer.dense_flops


def test_no_op_budget_changes_nothing(tmp_path):
    plain, _ = fit([], 6, tmp_path)
    noop = PruneRegrow(target_flops_ratio=1.0)
    attached, _ = fit([noop], 6, tmp_path)
    assert noop.masks is None and noop.history == []
    assert_states_equal(plain.state_dict(), attached.state_dict())


# ------------------------------------------------------------------------------ errors
def test_model_without_prunable_convolutions_fails_before_the_first_batch(tmp_path):
    Steps.steps = 0
    vit = Steps("vit_tiny_patch16_224", in_chans=1, model_kwargs=TINY_VIT)
    trainer = make_trainer(str(tmp_path), [PruneRegrow()], max_steps=3)
    with pytest.raises(StackError, match=r"PruneRegrow: model='Steps' has no prunable convolution") as error:
        trainer.fit(vit, make_data())
    assert "Fix: use a CNN" in str(error.value)
    assert Steps.steps == 0 and trainer.global_step == 0


def test_unreachable_budget_fails_before_the_first_batch_with_or_without_an_input_shape(tmp_path):
    Steps.steps = 0
    trainer = make_trainer(str(tmp_path), [PruneRegrow(target_flops_ratio=0.02, min_channel_ratio=0.5)], max_steps=3)
    with pytest.raises(StackError, match=r"target_flops_ratio=0.02 cannot be reached.*Fix: use a budget of at least"):
        trainer.fit(Steps(MODEL, in_chans=1), make_data())
    assert Steps.steps == 0
    # traced on the first batch (no input shape known): the budget still fails before training_step
    loader = DataLoader(TensorDataset(torch.zeros(8, 1, 16, 16), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = make_trainer(str(tmp_path), [PruneRegrow(target_flops_ratio=0.02, min_channel_ratio=0.5)], max_steps=3)
    with pytest.raises(StackError, match=r"target_flops_ratio=0.02 cannot be reached"):
        trainer.fit(Steps(MODEL, in_chans=1), train_dataloaders=loader)
    assert Steps.steps == 0


def test_attaches_in_one_line_to_a_module_without_forward_and_a_plain_loader(tmp_path):
    from prune_regrow_attach_driver import NetOnly, explorer, tensor_loader

    seed_everything(0)
    callback, module = explorer(), NetOnly()
    dense = forward_flops(module.net, torch.zeros(1, 1, 16, 16))
    trainer = make_trainer(str(tmp_path), [callback], max_steps=6)
    trainer.fit(module, train_dataloaders=tensor_loader())
    assert callback.traced == "net" and callback.network == "net" and callback.example_shape == [1, 1, 16, 16]
    assert callback.group_names[0] == "conv1.0"  # names inside the traced network
    # updates at 0, 2 and T_max = 3; compacted there: the network really is about half as costly
    assert [h["step"] for h in callback.history] == [0, 2, 3] and callback.compacted and callback.compacted_at == 3
    assert callback.dense_flops == dense
    assert 0.45 <= forward_flops(module.net, torch.zeros(1, 1, 16, 16)) / dense <= 0.5
    assert len(callback.update_ms) == 3 and all(ms > 0 for ms in callback.update_ms)
    assert float(trainer.callback_metrics["prune_regrow/update_ms"]) == pytest.approx(callback.update_ms[-1], rel=1e-5)


class TwoNets(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 3))
        self.student = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                           torch.nn.Conv2d(8, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
                                           torch.nn.Flatten(), torch.nn.Linear(8, 4))

    def training_step(self, batch, batch_idx):
        Steps.steps += 1
        return torch.nn.functional.cross_entropy(self.student(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.1)


def test_two_candidate_networks_ask_for_module_name_before_the_first_batch(tmp_path):
    from prune_regrow_attach_driver import tensor_loader

    Steps.steps = 0
    def trainer(callback: PruneRegrow):
        return make_trainer(tmp_path, [callback], max_steps=1)

    with pytest.raises(StackError, match=r"module_name=None.*2 submodules hold convolutions.*teacher \(2 conv\), "
                                         r"student \(2 conv\).*Fix: pass module_name"):
        trainer(PruneRegrow()).fit(TwoNets(), train_dataloaders=tensor_loader())
    assert Steps.steps == 0
    with pytest.raises(StackError, match=r"module_name='pupil' is not a submodule"):
        trainer(PruneRegrow(module_name="pupil")).fit(TwoNets(), train_dataloaders=tensor_loader())
    callback = PruneRegrow(module_name="student", min_channel_ratio=0.1)
    trainer(callback).fit(TwoNets(), train_dataloaders=tensor_loader())
    assert callback.traced == "student" and callback.group_names[0] == "0" and len(callback.history) == 1


@pytest.mark.parametrize("kwargs, key", [
    (dict(target_flops_ratio=0.5, channel_sparsity=0.5), "target_flops_ratio"),
    (dict(target_flops_ratio=0.0), "target_flops_ratio"),
    (dict(channel_sparsity=1.0), "channel_sparsity"),
    (dict(regrow_fraction=1.0), "regrow_fraction"),
    (dict(explore_until=0), "explore_until"),
    (dict(update_unit="epochs"), "update_unit"),
    (dict(criterion="svd"), "criterion"),
    (dict(input_shape=[1, -16]), None),
    (dict(prune_residual="no"), "prune_residual"),
    (dict(module_name=""), "module_name"),
])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(StackError, match=f"PruneRegrow: {key or 'input_shape'}="):
        PruneRegrow(**kwargs)


def test_checkpoint_metadata_is_one_versioned_schema(tmp_path):
    """The callback's state and `export_compact` read the same `PruneRegrowMeta`; another version is refused."""
    from stacktrain.export import export_compact

    explorer = PruneRegrow(target_flops_ratio=0.5, update_every=2, update_unit="step", explore_until=0.5,
                           prune_residual=False)
    fit([explorer], 4, tmp_path)
    state = explorer.state_dict()
    meta = PruneRegrowMeta.from_dict(state)
    assert meta.version == PRUNE_REGROW_META_VERSION == state["version"] == 2
    assert meta.group_names == explorer.group_names and meta.prune_residual is False and meta.traced == ""
    assert meta.input_shape == [1, 1, 16, 16] and meta.network == "model" and meta.dense_flops == explorer.dense_flops
    assert PruneRegrowMeta.from_dict({**state, "version": 1}).group_names == meta.group_names  # version 1 still reads
    with pytest.raises(StackError, match=r"PruneRegrow: version=3 of the PruneRegrow state is not one"):
        PruneRegrow().load_state_dict({**state, "version": 3})
    checkpoint = {"callbacks": {"PruneRegrow": {**state, "version": 7}}, "state_dict": {}, "hyper_parameters": {}}
    path = tmp_path / "future.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(StackError, match=r"export_compact: version=7"):
        export_compact(path, tmp_path / "out")


# ------------------------------------------------------------------------------ resume and export
@pytest.mark.parametrize("explore_until, stop_at", [(0.6, 5), (0.4, 7)], ids=["during-exploration", "after-compaction"])
def test_stop_and_resume_is_exact(tmp_path, explore_until, stop_at):
    """Stopped mid-exploration (masks, most-recently-used memory and regrow sampling resume), or after
    compaction (the smaller layers are rebuilt from the checkpoint): same weights and state."""
    runs = stop_and_resume(
        make_module, make_data,
        lambda: [PruneRegrow(target_flops_ratio=0.5, update_every=2, update_unit="step", explore_until=explore_until,
                             compact_after_explore=True), ExactResume()],
        total=12, stop_at=stop_at, root=tmp_path, full_length=True,
    )
    assert_resumed_exactly(runs)
    state = load_checkpoint_weights_only(runs.checkpoint)["callbacks"]["PruneRegrow"]
    assert state["compacted"] == (stop_at > explore_until * 12)
    explorer = next(c for c in runs.resumed[1].callbacks if isinstance(c, PruneRegrow))
    assert explorer.compacted and len(explorer.history) >= 3


def test_benchmark_runs_in_small_mode(tmp_path):
    from benchmarks import prune_regrow

    results = prune_regrow.main(["--small", "--out", str(tmp_path / "bench.json")])
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["benchmark"] == "prune_regrow" and set(payload["results"]) == set(results)
    assert payload["prune_only"] == "gradual" and payload["settings"]["model"] == "test_resnet"
    for ratio in (0.5, 0.25):
        for kind in ("chex", "chex_whole_residual", "prune_only", "uniform"):
            row = results[f"{kind}@{ratio}"]  # every variant lands on its budget, compacted
            assert ratio - 0.1 * ratio <= row["flops_ratio"] <= ratio + 1e-9, (kind, ratio, row["flops_ratio"])
        assert results[f"chex@{ratio}"]["infer_ms"] > 0 and results[f"chex@{ratio}"]["update_ms"] > 0
    assert results["chex@0.5_masked"]["flops_ratio"] == 1.0  # masks only: the dense network
    # uniform widths against the gradual global allocation: different networks at the same budget
    assert results["uniform@0.25"]["widths"] is None and results["prune_only@0.25"]["widths"] is not None
    assert payload["markdown"] == prune_regrow.report(payload)  # the report rebuilds from the JSON alone
    assert any(v["claim"].startswith("Gradual prune-only beats") for v in prune_regrow.verdicts(payload))


def test_an_extended_run_replans_exploration_over_its_new_length(tmp_path):
    """A run planned for 8 steps (T_max 6), checkpointed at step 4 mid-exploration and resumed for 16:
    exploration is re-planned over the new length (T_max 12) and goes on to it; the OneCycleLR
    schedule is re-planned too (`RunGuard`), instead of raising after the first batch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stacktrain.callbacks import RunGuard

    def explorer():
        return PruneRegrow(target_flops_ratio=0.5, update_every=2, update_unit="step", explore_until=0.75)

    saver = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=4, save_top_k=-1)
    first = explorer()
    fit([first, saver], 8, tmp_path, enable_checkpointing=True)
    assert first.schedule == {"total_steps": 8, "t_max": 6, "interval": 2}
    checkpoint = str(next((tmp_path / "ck").glob("*step=4*.ckpt")))
    longer, guard = explorer(), RunGuard()
    trainer = make_trainer(str(tmp_path), [longer, guard], max_steps=16, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(make_module(), make_data(), ckpt_path=checkpoint)
    assert trainer.global_step == 16
    assert longer.schedule == {"total_steps": 16, "t_max": 12, "interval": 2}
    assert [h["step"] for h in longer.history] == [0, 2, 4, 6, 8, 10, 12]
    assert 0.475 <= longer.history[-1]["flops_ratio"] <= 0.5
    assert guard.replanned == ["OneCycleLR re-planned from 8 to 16 steps at step 4"]
