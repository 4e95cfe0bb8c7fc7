"""`EfficiencyReport` (callbacks/efficiency.py): the table, plot and metrics it writes from what the
techniques report, never overwriting an earlier report, and its state in checkpoints."""

from __future__ import annotations

import math
import os

import torch
from lightning.pytorch.loggers import CSVLogger

from stacktrain.callbacks import EfficiencyReport
from stacktrain.stack import BYTES_PER_STEP, FLOPS_PER_STEP, run_dir
from test_stack import Halve, Shift, TinyModule, make_trainer


def test_efficiency_report_writes_table_plot_and_metrics(tmp_path):
    logger = CSVLogger(tmp_path, name="exp", version=0)
    report = EfficiencyReport()
    trainer = make_trainer(tmp_path, [Shift(), report, Halve()], logger=logger)
    trainer.fit(TinyModule())
    directory = run_dir(trainer)
    assert directory == os.path.join(str(tmp_path), "exp", "version_0")
    text = open(os.path.join(directory, "efficiency.md")).read()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 0.500 | 50.0% |" in rows[("halve", FLOPS_PER_STEP)]
    assert "| 0.500 | 50.0% |" in rows[("shift", FLOPS_PER_STEP)]
    assert "| 0.250 | 75.0% |" in rows[("shift", BYTES_PER_STEP)]
    # Both FLOPs savings compound: 0.5 x 0.5.
    assert "| 0.250 | 75.0% |" in rows[("all techniques", FLOPS_PER_STEP)]
    assert "| 100 FLOP | 50 FLOP |" in rows[("halve", FLOPS_PER_STEP)]
    assert "training steps timed | 4 |" in text
    png = os.path.join(directory, "efficiency.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    lines = report.rows()
    assert [r.count for r in lines[:3]] == [4, 4, 4]
    metrics = open(os.path.join(directory, "metrics.csv")).read()
    assert "efficiency/all_techniques/train_flops_step_ratio" in metrics

    # A second run into the same directory never overwrites the first report.
    first = open(os.path.join(directory, "efficiency.md")).read()
    trainer = make_trainer(tmp_path, [EfficiencyReport()], logger=CSVLogger(tmp_path, name="exp", version=0))
    trainer.fit(TinyModule())
    assert open(os.path.join(directory, "efficiency.md")).read() == first
    assert os.path.exists(os.path.join(directory, "efficiency-2.md"))


def test_efficiency_report_state_survives_a_checkpoint():
    report = EfficiencyReport()
    report.record("token_dropout", FLOPS_PER_STEP, baseline=10, actual=4, unit="FLOP", count=2)
    report.steps, report.step_wall_s, report.step_cpu_s = 2, 0.5, 0.9
    report.epochs = [[0.0, 2.0, 0.5, 0.9]]
    state = report.state_dict()
    restored = EfficiencyReport()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert math.isclose(restored.rows()[0].ratio, 0.4)
    # The state is plain data, so checkpoints load with torch.load(weights_only=True).
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"report-state-{os.getpid()}.pt")
    torch.save(state, path)
    assert torch.load(path, weights_only=True) == state
    os.remove(path)
