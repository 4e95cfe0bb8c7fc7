"""Shared benchmark plumbing: time whole runs (wall and process CPU time), print ratio tables,
write JSON. Ratios are always measured inside one process on one machine: technique vs baseline."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One sentence naming the machine and date of a ``machine()`` record (keys it lacks are left out)."""
    parts = [f"{info['cpu_count']} CPU cores" if info.get("cpu_count") else None,
             f"{info['torch_threads']} torch threads" if info.get("torch_threads") else None,
             f"torch {info['torch']}" if info.get("torch") else None,
             info.get("cuda") or "no GPU"]
    where = f" on {info['platform']}" if info.get("platform") else ""
    return f"Measured {info.get('date', 'at an unrecorded date')}{where}, " + ", ".join(p for p in parts if p) + "."


def time_run(run: Callable[[], Any]) -> dict[str, float]:
    """Wall and process CPU seconds of one whole ``run()`` (CUDA synchronised if used). A run that
    times its own core part returns ``{"wall_s": ..., "cpu_s": ...}``, which is used instead."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    measured = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if isinstance(measured, dict) and "wall_s" in measured:
        return {"wall_s": float(measured["wall_s"]), "cpu_s": float(measured["cpu_s"])}
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def time_variants(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall/CPU time of each variant over ``repeats`` whole runs, the variants taking turns
    (A B C A B C ...) so that drifting machine load hits all of them alike."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            samples[name].append(time_run(run))
    return {
        name: {
            "wall_s": statistics.median(s["wall_s"] for s in runs),
            "cpu_s": statistics.median(s["cpu_s"] for s in runs),
            "runs": len(runs),
        }
        for name, runs in samples.items()
    }


def add_ratios(timings: dict[str, dict[str, float]], baseline: str) -> dict[str, dict[str, float]]:
    base = timings[baseline]
    for row in timings.values():
        row["wall_ratio"] = row["wall_s"] / base["wall_s"]
        row["cpu_ratio"] = row["cpu_s"] / base["cpu_s"]
    return timings


def table(rows: dict[str, dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table with one row per variant."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any], out: str | None = None, markdown: str | None = None) -> Path:
    """Write ``payload`` with the machine it ran on; ``markdown`` is the human report (tables and
    verdicts) that ``run_all.py`` copies into RESULTS.md."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "machine": machine(), **payload}
    if markdown:
        record["markdown"] = markdown
    path.write_text(json.dumps(record, indent=2))
    return path


def publish(name: str, payload: dict[str, Any], out: str | None, report: Callable[[dict[str, Any]], str]) -> Path:
    """The end of every benchmark: print ``report(payload)`` (its tables and verdicts) and write the JSON
    with that report stored beside the numbers (`write_json`); returns the JSON's path."""
    markdown = report(payload)
    print("\n" + markdown)
    path = write_json(name, payload, out, markdown=markdown)
    print(f"written {path}")
    return path


def parser(description: str) -> argparse.ArgumentParser:
    arguments = argparse.ArgumentParser(description=description)
    arguments.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/<name>.json)")
    arguments.add_argument("--small", action="store_true", help="a quick run (for run_all and smoke tests)")
    return arguments


class LoopTimer(Callback):
    """Wall and process CPU time of the training loop only (first to last step); with
    ``warmup_steps`` the clock starts at that step, leaving out the first steps' one-time kernel setup."""

    def __init__(self, warmup_steps: int = 0) -> None:
        self.warmup_steps = warmup_steps
        self.start: tuple[float, float] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        if self.warmup_steps == 0:
            self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.start is None and trainer.global_step == self.warmup_steps:
            self.start = (time.perf_counter(), time.process_time())

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.wall = time.perf_counter() - self.start[0]
        self.cpu = time.process_time() - self.start[1]
