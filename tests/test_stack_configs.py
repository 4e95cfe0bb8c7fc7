"""The three stack configs (configs/stack_*.yaml) as 2 CPU processes under DDP, and the fixes stacking
needed: techniques follow PruneRegrow's compaction, early exits re-measure their FLOPs on the pruned
network, token dropout works in PromptTunedCLIP's frozen visual tower and reports over the whole step."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from conftest import CONFIGS, make_trainer
from ddp_harness import assert_states_equal, check, load_rank_states, run_ddp
from stacktrain.callbacks import EfficiencyReport, GradientQuantization, PruneRegrow, TokenDropout
from stacktrain.datamodules import DigitsDataModule, ShapesDataModule
from stacktrain.lightning_modules import BoostedEarlyExit, PromptTunedCLIP
from stacktrain.stack import FLOPS_PER_STEP, INFERENCE_FLOPS

#: BatchNorm running statistics are per rank between DDP's buffer broadcasts (as in any DDP run).
STATS = ("running_mean", "running_var", "num_batches_tracked")
QUICK = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
         "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "1"]


def report_rows(path) -> dict[tuple[str, str], list[str]]:
    """``(technique, quantity) -> cells`` of an efficiency.md table."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("technique", "measured"):
            rows[(cells[0], cells[1])] = cells
    return rows


def weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(STATS)}


def run_stack(name: str, tmp_path, *overrides: str) -> tuple[dict, dict, dict]:
    """Run configs/<name>.yaml on 2 processes; returns both ranks' dumps and the report's rows."""
    check(run_ddp(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *QUICK, *overrides], workdir=tmp_path,
                  dump_dir=tmp_path / "ranks"))
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    return rank0, rank1, report_rows(tmp_path / "efficiency.md")


# ------------------------------------------------------------------------------- 2-process DDP runs
@pytest.mark.ddp
def test_stack_vit_on_two_processes(tmp_path):
    rank0, rank1, rows = run_stack("stack_vit", tmp_path, "--trainer.max_epochs", "1",
                                   "--trainer.limit_train_batches", "4")
    assert rank0["global_step"] == rank1["global_step"] == 4
    assert_states_equal(weights(rank0["model"]), weights(rank1["model"]), "weights")
    # Token masks are drawn per rank by design (each rank drops its own tokens), from a generator
    # reseeded every batch from (seed, rank, step): its state is the one thing that differs.
    first, second = rank0["techniques"], rank1["techniques"]
    assert not torch.equal(first["TokenDropout"].pop("generator"), second["TokenDropout"].pop("generator"))
    assert_states_equal(first, second, "techniques")
    assert [row[0] for row in first["GradientQuantization"]["bytes_history"]] == [0, 1, 2, 3]
    assert {technique for technique, _ in rows} >= {"token_dropout", "grad_quant"}
    assert float(rows[("token_dropout", FLOPS_PER_STEP)][4]) < 1.0
    assert float(rows[("grad_quant", "communicated bytes/step")][4]) == pytest.approx(0.125, abs=0.01)


@pytest.mark.ddp
def test_stack_cnn_on_two_processes_keeps_quantized_communication_after_compaction(tmp_path):
    rank0, rank1, rows = run_stack("stack_cnn", tmp_path, "--trainer.max_epochs", "2",
                                   "--trainer.limit_train_batches", "3")
    assert rank0["global_step"] == rank1["global_step"] == 6
    assert_states_equal(weights(rank0["model"]), weights(rank1["model"]), "weights")
    assert_states_equal(rank0["techniques"], rank1["techniques"], "techniques")
    prune = rank0["techniques"]["PruneRegrow"]
    assert prune["compacted"] and prune["compacted_at"] == 3
    # the 4-bit all-gather ran at every step, also on the re-wrapped (smaller) DDP model
    history = rank0["techniques"]["GradientQuantization"]["bytes_history"]
    assert [row[0] for row in history] == list(range(6))
    assert history[-1][2] < 0.8 * history[0][2] and all(sent * 7 < fp32 for _, sent, fp32 in history)
    # the hypernetwork's last gradients follow the compacted parameters
    previous = rank0["techniques"]["GradientQuantization"]["hypernet"]["previous"]
    assert previous and all(previous[name]["grad"].shape == rank0["model"][name].shape for name in previous)
    assert {technique for technique, _ in rows} >= {"prune_regrow", "early_exit", "grad_quant", "all techniques"}
    # early exits measured on the pruned network: their baseline is below the dense network's
    dense = rows[("prune_regrow", INFERENCE_FLOPS)][2]
    assert rows[("early_exit", INFERENCE_FLOPS)][2] != dense and rows[("all techniques", INFERENCE_FLOPS)][2] == dense


@pytest.mark.ddp
def test_stack_clip_on_two_processes(tmp_path, micro_clip):
    rank0, rank1, rows = run_stack(
        "stack_clip", tmp_path, "--model.init_args.model_name", "stacktrain-micro-clip",
        "--model.init_args.pretrained", micro_clip, "--model.init_args.n_ctx", "4", "--model.init_args.shots", "4",
        "--trainer.max_steps", "4", "--trainer.check_val_every_n_epoch", "1", "--data.init_args.train_size", "120",
        "--data.init_args.val_size", "40", "--data.init_args.test_size", "40", "--data.init_args.batch_size", "8",
    )
    assert rank0["global_step"] == rank1["global_step"] == 4
    assert_states_equal(rank0["model"], rank1["model"], "weights")
    first, second = rank0["techniques"], rank1["techniques"]
    first["TokenDropout"].pop("generator"), second["TokenDropout"].pop("generator")  # per rank by design
    assert_states_equal(first, second, "techniques")
    assert {technique for technique, _ in rows} >= {"prompt_tuning", "token_dropout", "all techniques"}
    assert rows[("token_dropout", "tokens/sample")][2:4] == ["17", "9"]  # class token + 8 of 16 patches
    # token dropout's line is over the whole step as prompt tuning leaves it, so the two compound
    assert rows[("token_dropout", FLOPS_PER_STEP)][2] == rows[("prompt_tuning", FLOPS_PER_STEP)][3]


# ------------------------------------------------------------------------------- the fixes, in-process
def test_quantization_follows_compaction_of_the_parameters(tmp_path):
    """PruneRegrow replaces the parameters when it compacts: GradientQuantization hooks the new ones
    (their gradients stay 4-bit) and cuts its error-feedback residuals to the kept channels; early
    exits re-measure their FLOPs on the smaller network."""
    seed_everything(0)
    model = BoostedEarlyExit(backbone="test_resnet", exits=["layer1", "layer2", "layer3", "layer4"], in_chans=1,
                             head_hidden=16, budgets=[0.6, 1.0])
    quant = GradientQuantization(bits=4, targets="weights", compensation="error_feedback")
    prune = PruneRegrow(target_flops_ratio=0.5, update_unit="step", update_every=2, explore_until=0.5,
                        compact_after_explore=True)
    class Inspect(Callback):
        def on_train_start(self, trainer, pl_module):
            self.dense_costs = pl_module.exit_costs.clone()
            self.dense_shapes = {n: p.shape for n, p in pl_module.named_parameters()}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = dict(pl_module.named_parameters())
            self.hooked = all(quant.quantizer.parameters[n] is p for n, p in params.items())
            self.residual_shapes = all(r.shape == params[n].shape for n, r in quant.quantizer.residuals.items())
            self.shrunk = [n for n, p in params.items() if p.ndim == 4 and p.shape != self.dense_shapes[n]]
            # a 4-bit gradient of one tensor: at most 2^3 distinct magnitudes (codes 0..7 times one scale)
            self.levels = max((params[n].grad.abs().unique().numel() for n in self.shrunk), default=0)

    inspect = Inspect()
    trainer = make_trainer(tmp_path, [prune, quant, inspect, EfficiencyReport(dirpath=str(tmp_path))], max_steps=6, limit_val_batches=1, val_check_interval=6, num_sanity_val_steps=0)
    trainer.fit(model, DigitsDataModule(image_size=16, channels=1, batch_size=32))
    assert prune.compacted and prune.compacted_at == 3
    assert len(inspect.shrunk) > 5  # the last step ran on compacted layers...
    assert inspect.hooked and inspect.residual_shapes and 1 < inspect.levels <= 8  # ...with 4-bit gradients
    assert quant.quantizer.residuals
    assert float(model.exit_costs[-1]) < 0.8 * float(inspect.dense_costs[-1])


def test_token_dropout_in_prompt_tuning_reports_over_the_whole_step(tmp_path, micro_clip):
    seed_everything(0)
    model = PromptTunedCLIP("stacktrain-micro-clip", pretrained=micro_clip, n_ctx=4, shots=4)
    report = EfficiencyReport(dirpath=str(tmp_path))
    trainer = make_trainer(tmp_path, [TokenDropout(keep_ratio=0.5), report], max_steps=3, limit_val_batches=0)
    trainer.fit(model, ShapesDataModule(train_size=120, val_size=40, test_size=40, batch_size=8))
    lines = {(line.technique, line.quantity): line for line in report.rows()}
    tuning, dropout = lines[("prompt_tuning", FLOPS_PER_STEP)], lines[("token_dropout", FLOPS_PER_STEP)]
    assert dropout.baseline / dropout.count == pytest.approx(tuning.actual / tuning.count, rel=1e-9)
    assert model.step_flops_outside_vit > 0 and dropout.ratio < 1.0
    combined = lines[("all techniques", FLOPS_PER_STEP)]
    assert combined.ratio == pytest.approx(tuning.ratio * dropout.ratio)
    assert re.search(r"\| token_dropout \| tokens/sample \| 17 \| 9 \|", (tmp_path / "efficiency.md").read_text())
