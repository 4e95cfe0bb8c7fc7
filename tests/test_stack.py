"""The stack contract, tested with small test-only techniques (DESIGN.md, "The stack contract")."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import conftest
from stacktrain.callbacks import EfficiencyReport
from stacktrain.errors import StackError, require_choice, require_number
from stacktrain.functional.seeding import mix_seed
from stacktrain.stack import (
    BYTES_PER_STEP,
    FLOPS_PER_STEP,
    ModuleTechnique,
    Technique,
    arrange_stack,
    flops_outside_vit,
    is_logging_step,
    notify_parameters_replaced,
    step_generator,
    techniques_of,
    unique_path,
)


class TinyModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 2)
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        return F.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 4, generator=generator), torch.randint(0, 2, (32,), generator=generator))
        return DataLoader(data, batch_size=4)


CALLS: list[str] = []


class Halve(Technique):
    name = "halve"
    stack_order = 1

    def on_after_optimizer_step(self, trainer, pl_module, optimizer):
        CALLS.append(self.name)
        with torch.no_grad():
            for p in pl_module.parameters():
                p.mul_(0.5)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.log_metric(pl_module, "value", 1.5)
        self.report_cost(trainer, FLOPS_PER_STEP, baseline=100.0, actual=50.0, unit="FLOP")


class Shift(Technique):
    name = "shift"
    stack_order = 2

    def on_after_optimizer_step(self, trainer, pl_module, optimizer):
        CALLS.append(self.name)
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(0.1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.report_cost(trainer, FLOPS_PER_STEP, baseline=50.0, actual=25.0, unit="FLOP")
        self.report_cost(trainer, BYTES_PER_STEP, baseline=4000.0, actual=1000.0, unit="B")


class Rival(Technique):
    name = "rival"
    conflicts: ClassVar = {"Halve": "both rescale the weights after the optimizer step"}


class DDPOnly(Technique):
    name = "ddp_only"
    supported_strategies = (DDPStrategy,)


def make_trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    return conftest.make_trainer(tmp_path, callbacks, **{"max_steps": 4, **kwargs})


def test_stack_error_names_key_value_and_fix():
    error = StackError("is out of range (0, 1]", source="TokenDropout", key="keep_ratio", value=1.5, fix="use 0.5")
    assert str(error) == "TokenDropout: keep_ratio=1.5 is out of range (0, 1]. Fix: use 0.5."
    with pytest.raises(StackError, match=r"keep_ratio=0 is out of range \(0, 1\]"):
        require_number(0, "keep_ratio", source="T", low=0, high=1, low_inclusive=False)
    with pytest.raises(StackError, match="must be a number, got str"):
        require_number("a", "keep_ratio", source="T", low=0)
    with pytest.raises(StackError, match="must be an integer"):
        require_number(2.5, "bits", source="T", integer=True)
    with pytest.raises(StackError, match="did you mean 'weights'"):
        require_choice("weigths", "targets", ["weights", "activations", "both"], source="T")


@pytest.mark.parametrize("order", [("halve", "shift"), ("shift", "halve")])
def test_user_order_does_not_change_the_run(tmp_path, order):
    """[A, B] and [B, A] run the after-step rewrites in stack order and end with the same weights."""
    CALLS.clear()
    made = {"halve": Halve(), "shift": Shift()}
    module = TinyModule()
    trainer = make_trainer(tmp_path, [made[name] for name in order])
    trainer.fit(module)
    assert [type(t).__name__ for t in techniques_of(trainer)] == ["Halve", "Shift"]
    assert CALLS == ["halve", "shift"] * 4
    reference = TinyModule()
    reference_trainer = make_trainer(tmp_path, [Halve(), Shift()])
    CALLS.clear()
    reference_trainer.fit(reference)
    for a, b in zip(module.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_arrange_stack_keeps_other_callbacks_in_place(tmp_path):
    report = EfficiencyReport()
    trainer = make_trainer(tmp_path, [Shift(), report, Halve()])
    arrange_stack(trainer)
    names = [type(c).__name__ for c in trainer.callbacks]
    assert names.index("Halve") < names.index("EfficiencyReport") < names.index("Shift")


def test_after_step_hook_runs_only_on_real_optimizer_steps(tmp_path):
    CALLS.clear()
    trainer = make_trainer(tmp_path, [Halve()], max_steps=-1, max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(TinyModule())
    assert trainer.global_step == 4  # 8 batches, 2 per step
    assert CALLS == ["halve"] * 4


def test_declared_conflict_fails_before_the_first_batch(tmp_path):
    module = TinyModule()
    with pytest.raises(StackError, match="Rival: trainer.callbacks=.* cannot share a run with Halve"):
        make_trainer(tmp_path, [Rival(), Halve()]).fit(module)
    assert module.training_steps == 0


def test_duplicate_technique_is_rejected(tmp_path):
    module = TinyModule()
    with pytest.raises(StackError, match="attached more than once"):
        make_trainer(tmp_path, [Halve(), Halve()]).fit(module)
    assert module.training_steps == 0


def test_unsupported_strategy_is_rejected(tmp_path):
    module = TinyModule()
    with pytest.raises(StackError, match="trainer.strategy='SingleDeviceStrategy' is not supported"):
        make_trainer(tmp_path, [DDPOnly()]).fit(module)
    assert module.training_steps == 0


def test_module_can_refuse_a_technique(tmp_path):
    class NoHalving(ModuleTechnique, TinyModule):
        conflicts: ClassVar = {"Halve": "its weights are frozen"}

    module = NoHalving()
    with pytest.raises(StackError, match="Halve: model='NoHalving' cannot be attached to NoHalving: its weights are frozen"):
        make_trainer(tmp_path, [Halve()]).fit(module)
    assert module.training_steps == 0


def test_technique_logs_under_its_own_name(tmp_path):
    trainer = make_trainer(tmp_path, [Halve()])
    trainer.fit(TinyModule())
    assert float(trainer.callback_metrics["halve/value"]) == 1.5


def test_unique_path_never_overwrites(tmp_path):
    target = tmp_path / "report.md"
    assert unique_path(str(target)) == str(target)
    target.write_text("x")
    assert unique_path(str(target)) == str(tmp_path / "report-2.md")
    (tmp_path / "report-2.md").write_text("y")
    assert unique_path(str(target)) == str(tmp_path / "report-3.md")


def test_step_generator_is_the_same_for_the_same_step():
    a = torch.rand(5, generator=step_generator(7, 100))
    b = torch.rand(5, generator=step_generator(7, 100))
    c = torch.rand(5, generator=step_generator(7, 101))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seeds_are_mixed_by_the_one_mixer_with_the_published_values():
    # the values the stack, token dropout and the data modules drew from before they shared a mixer
    assert mix_seed(7, 100) == (7 * 1_000_003 + 100) % (2**63 - 1)
    assert mix_seed(7, 1, 100, 3) == ((((7 * 1_000_003) + 1) * 1_000_033 + 100) * 1_000_037 + 3) % (2**63 - 1)
    assert torch.equal(torch.rand(5, generator=step_generator(7, 100)),
                       torch.rand(5, generator=torch.Generator().manual_seed(mix_seed(7, 100))))
    keys = {mix_seed(0, rank, step, batch) for rank in range(2) for step in range(50) for batch in range(4)}
    assert len(keys) == 400


class LoggingProbe(Callback):
    """Records, per batch, the stack's logging-step rule and Lightning's own (private) one."""

    def __init__(self) -> None:
        self.pairs: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.pairs.append((is_logging_step(trainer), trainer._logger_connector.should_update_logs))


def test_is_logging_step_matches_lightnings_rule(tmp_path):
    probe = LoggingProbe()
    make_trainer(tmp_path, [probe], max_steps=7, log_every_n_steps=3, accumulate_grad_batches=2).fit(TinyModule())
    assert len(probe.pairs) == 14
    assert [ours for ours, _ in probe.pairs] == [theirs for _, theirs in probe.pairs]
    assert any(ours for ours, _ in probe.pairs) and not all(ours for ours, _ in probe.pairs)


class Compactor(Technique):
    """Replaces the model's parameters at its first step and tells the stack."""

    name = "compactor"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            notify_parameters_replaced(trainer, pl_module, {"layer.weight": {0: torch.tensor([0])}}, source=self)


class Listener(Technique):
    name = "listener"

    def __init__(self) -> None:
        self.told: list[Any] = []

    def on_parameters_replaced(self, trainer, pl_module, keep):
        self.told.append(dict(keep))


def test_parameters_replaced_reaches_the_other_techniques_and_a_module_technique(tmp_path):
    class Watching(ModuleTechnique, TinyModule):
        name = "watching"

        def __init__(self) -> None:
            super().__init__()
            self.told: list[Any] = []

        def on_parameters_replaced(self, keep):
            self.told.append(dict(keep))

    compactor, listener, module = Compactor(), Listener(), Watching()
    make_trainer(tmp_path, [compactor, listener], max_steps=2).fit(module)
    assert list(listener.told[0]) == ["layer.weight"] and len(listener.told) == 1
    assert list(module.told[0]) == ["layer.weight"] and len(module.told) == 1
    # a plain module is not a module technique: nothing is called on it
    make_trainer(tmp_path, [Compactor()], max_steps=2).fit(TinyModule())


def test_flops_outside_vit_is_declared_by_module_techniques_only():
    class Plain(TinyModule):
        step_flops_outside_vit = 123.0  # an attribute of the same name is not the contract

    class Declared(ModuleTechnique, TinyModule):
        step_flops_outside_vit = 456.0

    assert flops_outside_vit(Plain()) == 0.0
    assert flops_outside_vit(Declared()) == 456.0


# ------------------------------------------------------------------------------ one name per technique
TECHNIQUE_NAMES = {
    "token_dropout": ("stacktrain.callbacks", "TokenDropout", "callbacks"),
    "prune_regrow": ("stacktrain.callbacks", "PruneRegrow", "callbacks"),
    "grad_quant": ("stacktrain.callbacks", "GradientQuantization", "callbacks"),
    "early_exit": ("stacktrain.lightning_modules", "BoostedEarlyExit", "lightning_modules"),
    "prompt_tuning": ("stacktrain.lightning_modules", "PromptTunedCLIP", "lightning_modules"),
}


@pytest.mark.parametrize("name", sorted(TECHNIQUE_NAMES))
def test_every_technique_has_one_name(name):
    """One name ``N`` per technique (Composer's scheme): the public class logs and reports as ``N``, its
    Lightning file is ``N.py``, its functional core ``stacktrain.functional.N`` installs it with
    ``apply_N``, and its tests and benchmark are ``tests/test_N*.py`` and ``benchmarks/N.py``."""
    import importlib
    import inspect
    from pathlib import Path

    package, class_name, folder = TECHNIQUE_NAMES[name]
    cls = getattr(importlib.import_module(package), class_name)
    assert cls.name == name
    assert Path(inspect.getfile(cls)).name == f"{name}.py" and Path(inspect.getfile(cls)).parent.name == folder
    functional = importlib.import_module(f"stacktrain.functional.{name}")
    assert callable(getattr(functional, f"apply_{name}", None)) and f"apply_{name}" in functional.__all__
    root = Path(__file__).resolve().parents[1]
    assert (root / "tests" / f"test_{name}.py").is_file() and (root / "tests" / f"test_{name}_functional.py").is_file()
    assert (root / "benchmarks" / f"{name}.py").is_file()
