"""`GradientQuantization` on a Trainer: training on digits, logging, bad settings, exact resume, AMP's
skipped steps, bf16, gradient accumulation and clipping, stack order, no-op cost, and 2-process DDP
with a compressed all-gather."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONFIGS, make_trainer, refused
from ddp_harness import assert_states_equal, check, load_rank_states, offline_wandb_records, run_ddp
from resume_harness import assert_resumed_exactly, load_checkpoint_weights_only, stop_and_resume
from stacktrain.callbacks import ExactResume, GradientQuantization
from stacktrain.cli import main
from stacktrain.datamodules import DigitsDataModule
from stacktrain.errors import StackError
from stacktrain.lightning_modules import ImageClassifier
from stacktrain.stack import STACK_ORDER, Technique

GQ_CONFIG = CONFIGS / "grad_quant_int4.yaml"


class SmallNet(LightningModule):
    """Any LightningModule: a conv, an in-place ReLU, a frozen layer, a head; SGD. ``nan_batch``
    puts a NaN into that batch's input."""

    def __init__(self, nan_batch: int | None = None, lr: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.frozen = nn.Linear(8 * 16, 8 * 16)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8 * 16, 10)
        self.nan_batch = nan_batch
        self.lr = lr
        self.steps_run = 0

    def forward(self, x):
        x = F.max_pool2d(self.act(self.conv(x)), 4).flatten(1)
        return self.head(self.frozen(x))

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        x, y = batch
        if batch_idx == self.nan_batch:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_loader(batches: int = 8, batch_size: int = 16) -> DataLoader:
    data = DigitsDataModule(image_size=16, batch_size=batch_size)
    data.setup("fit")
    n = batches * batch_size
    return DataLoader(TensorDataset(data.train_set.images[:n], data.train_set.labels[:n]), batch_size=batch_size)


def trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    options = dict(max_steps=4, limit_val_batches=0, num_sanity_val_steps=0)
    options.update(kwargs)
    return make_trainer(tmp_path, callbacks, **options)


def classifier(**kwargs) -> ImageClassifier:
    return ImageClassifier("test_resnet", in_chans=1, optimizer=functools.partial(torch.optim.AdamW, lr=3e-3), **kwargs)


# ----------------------------------------------------------------------------------- training, logs
@pytest.mark.parametrize("compensation", ["none", "error_feedback", "hypernet"])
def test_trains_on_digits_and_logs_under_its_name(tmp_path, compensation):
    seed_everything(0)
    model = SmallNet()
    callback = GradientQuantization(bits=4, compensation=compensation)
    fit = trainer(tmp_path, [callback], max_steps=20, logger=CSVLogger(str(tmp_path)), log_every_n_steps=5,
                  limit_val_batches=5)
    fit.fit(model, DigitsDataModule(batch_size=64))
    metrics = fit.callback_metrics
    assert float(metrics["grad_quant/bits"]) == 4
    for target in ("weights", "activations"):
        assert 0.05 < float(metrics[f"grad_quant/rel_error_{target}"]) < 0.6
    assert float(metrics["val/acc"]) > 0.3  # it learns (chance is 0.1)
    assert "grad_quant/bytes_per_step" not in metrics  # nothing is communicated on one device
    state = callback.state_dict()
    if compensation == "hypernet":
        assert "grad_quant/hypernet_grad_norm" in metrics
        assert float(state["hypernet"]["net"]["output.weight"].abs().sum()) > 0  # the hypernetwork learned
        assert set(state["hypernet"]["previous"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    if compensation == "error_feedback":
        residuals = state["residuals_by_rank"][0]
        assert set(residuals) == {"conv.weight", "conv.bias", "head.weight", "head.bias"}  # not the frozen layer
        assert float(residuals["head.weight"].abs().sum()) > 0
    assert len(callback.error_log["weights"]) == 4  # the error is measured on the logged steps only


def test_linear_hypernetwork_on_weights_only_leaves_biases_a_plain_quantized_step(tmp_path):
    """MetaQuant's recipe: the linear meta-network (hidden 100) sees conv and linear weights only."""
    seed_everything(0)
    model = SmallNet()
    callback = GradientQuantization(bits=4, targets="weights", compensation="hypernet", hypernet="linear",
                                    hypernet_targets="weights", meta_lr=1e-3)
    trainer(tmp_path, [callback], max_steps=5).fit(model, digits_loader())
    net = callback.hypernet.net
    assert net.kind == "linear" and net.hidden.weight.shape == (100, 1)
    assert set(callback.hypernet.previous) == {"conv.weight", "head.weight"}
    gain = float(net.output.weight @ net.hidden.weight)  # H(g) = (1 + gain) g
    assert 0 < abs(gain) < 0.5  # trained (it starts at 0) by four steps of Adam at 1e-3
    # the bias's gradient went through 4 bits and nothing else: at most 15 distinct values
    assert len(torch.unique(model.head.bias.grad)) <= 15


def test_resuming_with_another_hypernetwork_kind_starts_it_afresh(tmp_path):
    seed_everything(0)
    first = GradientQuantization(bits=4, compensation="hypernet", hypernet="mlp")
    trainer(tmp_path, [first], max_steps=3).fit(SmallNet(), digits_loader())
    saved = first.state_dict()
    assert saved["hypernet_kind"] == "mlp"
    second = GradientQuantization(bits=4, compensation="hypernet", hypernet="linear")
    with pytest.warns(UserWarning, match="hypernet_kind: 'mlp' -> 'linear'"):
        second.load_state_dict(saved)
    trainer(tmp_path, [second], max_steps=3).fit(SmallNet(), digits_loader())
    assert second.hypernet.net.kind == "linear" and second.hypernet.net.hidden.weight.shape == (100, 1)


class BareParameterNet(LightningModule):
    """A model without Linear/Conv layers: nothing for ``hypernet_targets: weights``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(16 * 16, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(x.flatten(1) @ self.weight, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_hypernet_on_weights_without_linear_or_conv_fails_before_the_first_batch(tmp_path):
    model = BareParameterNet()
    callback = GradientQuantization(bits=4, targets="weights", compensation="hypernet", hypernet_targets="weights")
    with pytest.raises(StackError, match="hypernet_targets='weights'.*Fix: use hypernet_targets 'all'"):
        trainer(tmp_path, [callback]).fit(model, digits_loader())
    assert model.weight.abs().sum() == 0  # no step was taken


# ----------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bits=1), "bits=1 is out of range [2, 8]"),
        (dict(bits=9), "bits=9 is out of range [2, 8]"),
        (dict(bits=4.5), "bits=4.5 must be an integer"),
        (dict(targets="gradients"), "targets='gradients' is not one of"),
        (dict(compensation="meta"), "compensation='meta' is not one of"),
        (dict(communication_bits=16), "communication_bits=16 is not a supported communication width"),
        (dict(targets="activations", compensation="error_feedback"), "needs quantized weight gradients"),
        (dict(bits=None, compensation="hypernet"), "has nothing to compensate"),
        (dict(meta_lr=0.0), "meta_lr=0.0 is out of range"),
        (dict(hypernet_inputs="weight"), "hypernet_inputs='weight' is not one of"),
        (dict(hypernet="lstm"), "hypernet='lstm' is not a hypernetwork kind"),
        (dict(hypernet_targets="biases"), "hypernet_targets='biases' is not one of"),
        (dict(hypernet_hidden=0), "hypernet_hidden=0 is out of range"),
    ],
)
def test_bad_settings_raise_a_stack_error_naming_the_key(kwargs, message):
    with pytest.raises(StackError, match="GradientQuantization: .*Fix: ") as info:
        GradientQuantization(**kwargs)
    assert message in str(info.value)


def test_settings_changed_after_construction_fail_before_the_first_batch(tmp_path):
    model = SmallNet()
    callback = GradientQuantization(bits=4)
    callback.bits = 12
    with pytest.raises(StackError, match="bits=12 is out of range"):
        trainer(tmp_path, [callback]).fit(model, digits_loader())
    assert model.steps_run == 0 and model.trainer.global_step == 0


def test_a_model_without_trainable_parameters_is_rejected_before_the_first_batch(tmp_path):
    model = SmallNet()
    model.requires_grad_(False)
    with pytest.raises(StackError, match="has no trainable parameters"):
        trainer(tmp_path, [GradientQuantization()]).fit(model, digits_loader())
    assert model.steps_run == 0


def test_a_strategy_comm_hook_conflicts_with_communication_bits():
    from types import SimpleNamespace

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    callback = GradientQuantization(communication_bits=8)
    fake_trainer = SimpleNamespace(strategy=DDPStrategy(ddp_comm_hook=fp16_compress_hook))
    with pytest.raises(StackError, match="communication_bits=8 cannot replace the DDP communication hook"):
        callback.setup_technique(fake_trainer, SmallNet(), "fit")


def test_the_config_reports_a_bad_bit_width_as_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GQ_CONFIG.read_text().replace("bits: 4                     #", "bits: 9   #", 1))
    err = refused(capsys, ["fit", "--config", str(bad), "--trainer.logger", "false", "--trainer.default_root_dir",
                           str(tmp_path)])
    assert err.startswith("stacktrain: error: GradientQuantization: bits=9 is out of range [2, 8]")


def test_the_config_runs(tmp_path):
    cli = main(["fit", "--config", str(GQ_CONFIG), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
                "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 3
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, GradientQuantization))
    assert callback.bits == 4 and callback.compensation == "hypernet" and callback.communication_bits == 4
    assert callback.hypernet.net.kind == "linear" and callback.hypernet_targets == "weights" and callback.meta_lr == 1e-3
    assert isinstance(cli.model.optimizers().optimizer, torch.optim.SGD)
    assert callback.comm is None  # one process: nothing to communicate


# ----------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("compensation", ["error_feedback", "hypernet", "hypernet_linear"])
def test_stop_and_resume_is_exact_with_hypernetwork_and_residuals(tmp_path, compensation):
    options = (dict(compensation="hypernet", hypernet="linear", hypernet_targets="weights", meta_lr=1e-3)
               if compensation == "hypernet_linear" else dict(compensation=compensation))
    compensation = options["compensation"]
    runs = stop_and_resume(
        SmallNet, lambda: DigitsDataModule(batch_size=64),
        lambda: [GradientQuantization(bits=4, **options), ExactResume()],
        total=9, stop_at=4, root=tmp_path,
    )
    assert_resumed_exactly(runs)  # weights and technique state (hypernetwork, residuals, seed)
    saved = load_checkpoint_weights_only(runs.checkpoint)["callbacks"]["GradientQuantization"]
    state = runs.resumed[1].callbacks[0].state_dict()
    if compensation == "hypernet":
        assert set(saved["hypernet"]) == {"net", "optimizer", "previous"}
        assert state["hypernet"]["optimizer"]["state"]  # Adam moments are part of what matched
    else:
        assert saved["residuals_by_rank"][0]["head.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------------- AMP
class StepRecorder(Callback):
    """Per batch: weights before/after, the grad scaler's scale, and the technique state after."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        quant = next((c for c in trainer.callbacks if isinstance(c, GradientQuantization)), None)
        self.rows.append({
            "moved": not all(torch.equal(a, b) for a, b in zip(self.before, pl_module.parameters())),
            "scale": trainer.precision_plugin.scaler.get_scale(),
            "state": None if quant is None else quant.state_dict(),
        })


def fp16_run(tmp_path, callbacks):
    seed_everything(0)
    model = SmallNet(nan_batch=3)
    recorder = StepRecorder()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    trainer(tmp_path, [*callbacks, recorder], max_steps=6, plugins=[plugin]).fit(model, digits_loader())
    return recorder.rows


@pytest.mark.parametrize("compensation", ["none", "error_feedback", "hypernet"])
def test_a_nan_gradient_skips_the_step_under_amp_exactly_as_without_quantization(tmp_path, compensation):
    """Lightning's MixedPrecision plugin with a GradScaler (the CUDA fp16 path, run on CPU): the batch
    with a NaN leaves the weights and the technique's state as they were, in both runs, and the
    scaler backs off in both."""
    plain = fp16_run(tmp_path / "plain", [])
    quantized = fp16_run(tmp_path / "quant", [GradientQuantization(bits=4, targets="both", compensation=compensation)])
    assert [r["moved"] for r in plain] == [r["moved"] for r in quantized] == [True, True, True, False, True, True]
    assert [r["scale"] for r in plain] == [r["scale"] for r in quantized]
    assert quantized[3]["scale"] == quantized[2]["scale"] / 2
    assert_states_equal(quantized[2]["state"], quantized[3]["state"])  # the skipped step changed nothing
    if compensation == "hypernet":
        assert not torch.equal(quantized[3]["state"]["hypernet"]["net"]["output.weight"],
                               quantized[5]["state"]["hypernet"]["net"]["output.weight"])


def test_bf16_autocast_on_cpu(tmp_path):
    seed_everything(0)
    model = SmallNet()
    callback = GradientQuantization(bits=4, compensation="hypernet")
    fit = trainer(tmp_path, [callback], max_steps=4, precision="bf16-mixed")
    fit.fit(model, digits_loader())
    assert fit.global_step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert callback.hypernet.previous  # gradients went through the hypernetwork


# ----------------------------------------------------------------------------------- accumulation, clipping
class NormRecordingSGD(torch.optim.SGD):
    """Records the total gradient norm that the update is made from (after Lightning's clipping,
    which runs inside the closure)."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.norms: list[float] = []

    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        super().step()
        return loss


class ClippedNet(SmallNet):
    def configure_optimizers(self):
        return NormRecordingSGD(self.parameters(), lr=self.lr)


class QuantizedCount(Callback):
    """How many weight gradients the quantizer processed between two optimizer steps."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        quant = next(c for c in trainer.callbacks if isinstance(c, GradientQuantization))
        self.counts.append(quant.quantizer.error_count["weights"])


def test_gradient_accumulation_and_clipping_act_on_the_hypernetwork_updates(tmp_path):
    seed_everything(0)
    model = ClippedNet(lr=0.5)
    counter = QuantizedCount()
    fit = trainer(tmp_path, [GradientQuantization(bits=4, compensation="hypernet"), counter], max_steps=3,
                  accumulate_grad_batches=2, gradient_clip_val=0.05, log_every_n_steps=1)
    fit.fit(model, digits_loader())
    assert fit.global_step == 3 and model.steps_run == 6
    trainable = sum(p.requires_grad for p in model.parameters())
    assert counter.counts == [2 * trainable] * 3  # every micro-batch's gradients were quantized
    norms = fit.optimizers[0].norms
    assert len(norms) == 3 and max(norms) <= 0.05 * (1 + 1e-5)  # the clipped updates were applied


# ----------------------------------------------------------------------------------- stack contract
class MaskAfterStep(Technique):
    """A stand-in for PruneRegrow: zeroes half the conv filters after every optimizer step."""

    name = "mask_after_step"
    stack_order = STACK_ORDER["prune_regrow"]

    def on_after_optimizer_step(self, trainer, pl_module, optimizer):
        with torch.no_grad():
            pl_module.conv.weight[::2] = 0


def test_order_of_the_callbacks_does_not_matter(tmp_path):
    def run(order):
        seed_everything(0)
        model = SmallNet()
        callbacks = [GradientQuantization(bits=4, compensation="hypernet", seed=3), MaskAfterStep()]
        fit = trainer(tmp_path, callbacks[::order], max_steps=4)
        fit.fit(model, digits_loader())
        assert [type(c).__name__ for c in fit.callbacks if isinstance(c, Technique)] == [
            "GradientQuantization", "MaskAfterStep"]
        return model

    first, second = run(1), run(-1)
    assert_states_equal(first.state_dict(), second.state_dict())
    assert float(first.conv.weight[::2].abs().sum()) == 0


def test_no_op_settings_change_nothing(tmp_path):
    def run(callbacks):
        seed_everything(0)
        model = SmallNet()
        trainer(tmp_path, callbacks, max_steps=4).fit(model, digits_loader())
        return model

    callback = GradientQuantization(bits=None, communication_bits=None)
    assert_states_equal(run([]).state_dict(), run([callback]).state_dict())
    assert callback.quantizer is None and callback.hypernet is None and callback.comm is None


# ----------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
def test_two_processes_with_int4_communication_end_with_identical_weights(tmp_path):
    """Also: the config's W&B logger (offline, under tmp_path/runs) gets the bytes-per-step table and plot."""
    result = check(run_ddp(
        ["fit", "--config", str(GQ_CONFIG), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6",
         "--trainer.limit_val_batches", "2"],
        workdir=tmp_path, dump_dir=tmp_path / "ranks",
    ))
    assert "4-bit all-gather" in result.stdout + result.stderr
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    assert rank0["global_step"] == rank1["global_step"] == 6
    assert_states_equal(rank0["model"], rank1["model"])  # weights
    assert_states_equal(rank0["techniques"], rank1["techniques"])  # hypernetwork, bytes counted
    state = rank0["techniques"]["GradientQuantization"]
    sent = sum(row[1] for row in state["bytes_history"])
    fp32 = sum(row[2] for row in state["bytes_history"])
    assert len(state["bytes_history"]) == 6 and fp32 == 6 * 4 * sum(p.numel() for p in classifier().parameters())
    assert sent / fp32 <= 0.14
    report = (next(tmp_path.glob("**/efficiency.md"))).read_text()
    assert "| grad_quant | communicated bytes/step |" in report
    # W&B (rank 0's run): the table holds rank 0's bytes per step, and the line plot is there
    records = offline_wandb_records(tmp_path / "runs", [b"grad_quant/bytes_per_step_plot"])
    assert b"grad_quant/bytes_per_step_plot" in records
    (table,) = (tmp_path / "runs" / "wandb").glob("offline-run-*/files/media/table/grad_quant/bytes_per_step_[0-9]*.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["step", "bytes_sent", "fp32_allreduce_bytes"]
    assert content["data"] == state["bytes_history"]
    torch.manual_seed(0)  # the config's seed_everything: the initial weights
    fresh = classifier().state_dict()
    assert not torch.equal(fresh["model.fc.weight"], rank0["model"]["model.fc.weight"])  # it trained


# ----------------------------------------------------------------------------------- benchmark
def test_benchmark_small_mode_writes_its_table(tmp_path):
    import json

    from benchmarks import grad_quant

    out = tmp_path / "grad_quant.json"
    grad_quant.main(["--small", "--settings", "cnn", "--variants", "int8", "int4", "int4_hypernet",
                     "int4_error_feedback_nearest", "--out", str(out)])
    payload = json.loads(out.read_text())
    result = payload["accuracy"]["cnn"]
    rows = result["rows"]
    assert result["data"] == "cluttered" and result["optimizer"] == "sgd" and result["setting"]["model_name"] == "stacktrain_vgg"
    assert set(rows) == {"fp32", "int8", "int4", "int4_hypernet", "int4_error_feedback_nearest"}
    assert rows["fp32"]["rel_error_weights"] == 0.0
    assert 0 < rows["int8"]["rel_error_weights"] < rows["int4"]["rel_error_weights"] < 1
    assert "loss_share_of_plain" in rows["int4_hypernet"] and "loss_share_of_plain" not in rows["int4"]
    assert payload["ddp"] == {}  # the DDP part is left out of the small mode
    claims = [row["claim"] for row in grad_quant.verdicts(payload)]
    assert any("compensated int4 (int4_" in claim for claim in claims)
    assert "loss_share_of_plain" in grad_quant.report(payload)


def test_benchmark_variants_pair_each_compensation_with_its_plain_variant():
    from benchmarks import grad_quant

    variants = grad_quant.VARIANTS
    assert variants["int4_hypernet"] == dict(bits=4, compensation="hypernet", hypernet="linear",
                                             hypernet_targets="weights", meta_lr=1e-3)
    assert variants["int3_weights_hypernet"]["targets"] == "weights"
    assert variants["int4_error_feedback_nearest"]["stochastic_rounding"] is False
    assert grad_quant.plain_of("int3_weights_hypernet") == "int3_weights"
    assert grad_quant.plain_of("int4_error_feedback_nearest") == "int4"
    assert sorted(grad_quant.compensated("int4", variants)) == [
        "int4_error_feedback", "int4_error_feedback_nearest", "int4_hypernet", "int4_hypernet_mlp"]
    for options in variants.values():  # every variant is a valid setting
        if options is not None:
            grad_quant.GradientQuantization(**options)
