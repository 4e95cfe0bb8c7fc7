"""scripts/gpu_check.sh, the one command for a lent GPU machine, in its dry run on the CPU: every part
runs (one config, the token-dropout step-time benchmark in --small mode, the early-exit timing) and
writes the one JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_dry_run_on_the_cpu_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["passed"] is True and report["machine"]["cuda"] is False
    assert report["precision"] == "bf16-mixed"
    assert list(report["configs"]) == ["quickstart.yaml"]
    assert "fit finished after 1 steps" in report["configs"]["quickstart.yaml"]["line"]
    step_time = report["token_dropout_step_time"]["step_time"]
    assert step_time["full sequence"]["wall_ratio"] == 1.0 and 0 < step_time["TokenDropout keep 0.5"]["step_ms"]
    early = report["early_exit_inference"]
    assert early["passed"] is True
    assert sum(early["exit_shares"]) == early["images"] > 0
    assert 0 < early["flops_ratio"] <= 1 and early["full_ms"] > 0 and early["early_exit_ms"] > 0
