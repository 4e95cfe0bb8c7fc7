"""Shared benchmark plumbing: time whole runs (wall and process CPU time), print ratio tables,
write JSON. Ratios are always measured inside one process on one machine: technique vs baseline.

The measurement protocol of ../shared/BENCHMARKS.md is here too: paired-seed statistics
(`paired`), headroom checks (`headroom`), one verdict vocabulary (`VERDICTS`, `compare`,
`meets_goal`), the ``--data`` choice every benchmark takes (`add_data_argument`, `classification_data`)
and the provenance of every JSON (commit, code it imported: `provenance`, `staleness`)."""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
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
    """Write ``payload`` with the machine it ran on and its provenance (the code in the benchmark's
    ``SCOPE``, see `provenance`); ``markdown`` is the human report (tables and verdicts) that
    ``run_all.py`` copies into RESULTS.md."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "machine": machine(), "provenance": provenance(benchmark_scope(name)), **payload}
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


# ------------------------------------------------------------------------ the measurement protocol
#: The one verdict vocabulary of every benchmark and of RESULTS.md (BENCHMARKS.md, section 4).
HOLDS = "holds"
FAILS = "fails"
NO_HEADROOM = "not shown (no headroom)"
WITHIN_NOISE = "not shown (within noise)"
VERDICTS = (HOLDS, FAILS, NO_HEADROOM, WITHIN_NOISE)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its two-sided Student-t interval (``nan`` bounds with fewer than 2 values)."""
    from scipy import stats

    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired(baseline: Sequence[float], variant: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Paired-seed comparison: ``variant[i]`` and ``baseline[i]`` ran with the same seed (same
    initialisation and data order). The difference is variant - baseline, with its Student-t
    interval over the pairs."""
    if len(baseline) != len(variant) or not baseline:
        raise ValueError(f"paired() needs the same seeds on both sides, got {len(baseline)} and {len(variant)} values")
    diffs = [float(v) - float(b) for b, v in zip(baseline, variant)]
    diff_mean, low, high = t_interval(diffs, confidence)
    return {"n": len(diffs), "baseline": [float(b) for b in baseline], "variant": [float(v) for v in variant],
            "baseline_mean": statistics.fmean(baseline), "variant_mean": statistics.fmean(variant),
            "diffs": diffs, "diff_mean": diff_mean, "diff_low": low, "diff_high": high, "confidence": confidence}


def compare(stats: dict[str, Any], claim: str = "beats", tolerance: float = 0.0, headroom_ok: bool = True) -> str:
    """The verdict of a paired comparison (`paired`) for a claim about variant - baseline:

    * ``beats``: holds when the interval lies above ``tolerance`` (0: above zero), fails when it lies
      below it, otherwise within noise;
    * ``matches``: holds when the interval lies within +-``tolerance``, fails when it lies wholly
      outside, otherwise within noise;
    * ``not_worse``: holds when the interval's lower bound is above -``tolerance``, fails when its upper
      bound is below it.

    A comparison on a task without headroom (`headroom`) is not shown whatever its numbers."""
    if not headroom_ok:
        return NO_HEADROOM
    low, high = stats["diff_low"], stats["diff_high"]
    if math.isnan(low) or math.isnan(high):
        return WITHIN_NOISE  # one seed has no interval: nothing is shown
    if claim == "beats":
        return HOLDS if low > tolerance else FAILS if high < tolerance else WITHIN_NOISE
    if claim == "matches":
        if -tolerance <= low and high <= tolerance:
            return HOLDS
        return FAILS if high < -tolerance or low > tolerance else WITHIN_NOISE
    if claim == "not_worse":
        return HOLDS if low >= -tolerance else FAILS if high < -tolerance else WITHIN_NOISE
    raise ValueError(f"unknown claim {claim!r}: use 'beats', 'matches' or 'not_worse'")


def meets_goal(values: Sequence[float] | float, goal: float, *, at_most: bool = True,
               headroom_ok: bool = True) -> str:
    """Verdict of a figure against a goal (a ratio at most 0.6x, an accuracy at least 0.85...). With
    several values (seeds, repeats) the t interval must lie on the right side of the goal; one value
    is compared as it is (a deterministic count such as bytes, or a median of timed runs)."""
    if not headroom_ok:
        return NO_HEADROOM
    values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) == 1:
        low = high = values[0]
    else:
        _, low, high = t_interval(values)
    good, bad = (high <= goal, low > goal) if at_most else (low >= goal, high < goal)
    return HOLDS if good else FAILS if bad else WITHIN_NOISE


def headroom(baseline: Sequence[float] | float, *, floors: dict[str, float], ceiling: float = 0.93,
             margin: float = 0.05, effects: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """The headroom checks of BENCHMARKS.md, section 1, on the baseline's accuracy (per seed or a mean):

    * below the ceiling (``ceiling``, 0.93 for a 10-class task: one test image must not be a verdict);
    * at least ``margin`` above every floor (chance, raw-pixel k-NN, random-init features...);
    * every effect in ``effects`` (name -> (value, least value)) at least as large as needed, e.g. the
      loss of plain INT4 at least 3 points before a compensation can be shown to recover it.

    Returns ``{"ok", "checks": [{"check", "value", "limit", "ok"}], "reason"}``; ``reason`` names the
    failed checks (empty when ``ok``)."""
    mean = statistics.fmean([baseline] if isinstance(baseline, (int, float)) else baseline)
    checks = [{"check": "baseline below the ceiling", "value": mean, "limit": ceiling, "ok": mean <= ceiling}]
    for name, floor in floors.items():
        checks.append({"check": f"baseline {margin:g} above {name}", "value": mean, "limit": floor + margin,
                       "ok": mean >= floor + margin})
    for name, (value, least) in (effects or {}).items():
        checks.append({"check": name, "value": float(value), "limit": least, "ok": float(value) >= least})
    failed = [f"{c['check']} ({c['value']:.3g} against {c['limit']:.3g})" for c in checks if not c["ok"]]
    return {"ok": not failed, "checks": checks, "reason": "; ".join(failed)}


def headroom_lines(check: dict[str, Any]) -> str:
    """The headroom checks as Markdown lines, printed before any verdict."""
    lines = [f"- {c['check']}: {c['value']:.4g} (limit {c['limit']:.4g}) -> {'ok' if c['ok'] else 'FAILS'}"
             for c in check["checks"]]
    return "Headroom checks (BENCHMARKS.md, section 1):\n\n" + "\n".join(lines)


def verdict(claim: str, outcome: str, figure: str, *, reason: str = "", paper: str = "") -> dict[str, str]:
    """One row of RESULTS.md's verdict table: the claim, its verdict, the figure (with its interval)
    and why it is not shown (when it is not); ``paper`` is the paper's own figure for comparison."""
    if outcome not in VERDICTS:
        raise ValueError(f"unknown verdict {outcome!r}: use one of {VERDICTS}")
    return {"claim": claim, "verdict": outcome, "figure": figure, "reason": reason, "paper": paper}


def interval_text(stats: dict[str, Any], scale: float = 100.0, unit: str = " points") -> str:
    """``+1.23 points [0.40, 2.06]`` for a `paired` result (scaled, e.g. accuracy to points)."""
    mean, low, high = (stats[k] * scale for k in ("diff_mean", "diff_low", "diff_high"))
    bounds = "no interval (one seed)" if math.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"
    return f"{mean:+.2f}{unit} {bounds}, {stats['n']} paired seeds"


# -------------------------------------------------------------------------------- the --data choice
DATA_HELP = ("the data: 'digits' (scikit-learn's 8x8 digits, saturates near 0.98), 'cluttered' (the harder "
             "embedded task: real digits on a cluttered, noisy canvas), or a local path: an ImageFolder root "
             "or a folder holding torchvision's cifar-10-batches-py / cifar-100-python")


def add_data_argument(arguments: argparse.ArgumentParser, default: str = "cluttered") -> None:
    arguments.add_argument("--data", default=default, help=DATA_HELP + f" (default {default})")


def data_config(spec: str, *, batch_size: int, image_size: int | None = None, channels: int = 1, seed: int = 0,
                small: bool = False, num_workers: int = 0) -> dict[str, Any]:
    """The data module ``--data`` names (see `DATA_HELP`) as a LightningCLI ``class_path``/``init_args``
    dict (what a config's ``data:`` holds): ``image_size`` pixels (the data's own size when None),
    ``channels`` channels; ``small`` shrinks the embedded sets for smoke runs."""
    common = dict(channels=channels, batch_size=batch_size, seed=seed, num_workers=num_workers)
    if spec == "digits":
        return {"class_path": "stacktrain.datamodules.DigitsDataModule",
                "init_args": dict(common, image_size=image_size or 16)}
    if spec == "cluttered":
        size = image_size or 32
        scaled = {} if size == 32 else dict(digit_size=[max(4, size * 14 // 32), max(4, size * 21 // 32)],
                                            fragment_size=max(2, size * 6 // 32))
        sizes = dict(train_size=512, val_size=256, test_size=256) if small else {}
        return {"class_path": "stacktrain.datamodules.ClutteredDigitsDataModule",
                "init_args": dict(common, image_size=size, **scaled, **sizes)}
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise SystemExit(f"--data {spec!r}: not 'digits', 'cluttered' or an existing folder ({DATA_HELP})")
    dataset = ("cifar10" if (path / "cifar-10-batches-py").is_dir()
               else "cifar100" if (path / "cifar-100-python").is_dir() else "imagefolder")
    return {"class_path": "stacktrain.datamodules.ImageFolderDataModule",
            "init_args": dict(common, root=str(path), dataset=dataset, image_size=image_size)}


def classification_data(spec: str, **settings: Any) -> Any:
    """The data module of `data_config` (same arguments), built."""
    import stacktrain.datamodules as datamodules

    config = data_config(spec, **settings)
    return getattr(datamodules, config["class_path"].rsplit(".", 1)[1])(**config["init_args"])


def data_name(spec: str) -> str:
    """How a ``--data`` value is named in a report (a path by its folder name)."""
    return spec if spec in ("digits", "cluttered") else f"local data {Path(spec).name!r}"


# ------------------------------------------------------------------------------------- provenance
REPOSITORY = Path(__file__).resolve().parent.parent
#: When this process imported the benchmark plumbing (its start, for every benchmark script): a file
#: modified after it may not be the code that ran.
STARTED = time.time()


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def benchmark_scope(name: str) -> list[str] | None:
    """The ``SCOPE`` a benchmark module declares: the files and folders its figures depend on (its
    own script, the technique's module and functional core, the data...). Importing every technique
    through ``stacktrain.lightning_modules`` must not make a change to another technique mark it stale."""
    import importlib

    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ImportError:
        return None
    scope = getattr(module, "SCOPE", None)
    return list(scope) if scope else None


def imported_code(scope: Sequence[str] | None = None) -> list[str]:
    """Repository-relative paths of the project's Python files this process imported, sorted; with
    ``scope`` (paths of files, or of folders ending in ``/``) only those inside it."""
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or not os.path.isabs(path):
            continue
        try:
            relative = Path(path).resolve().relative_to(REPOSITORY)
        except ValueError:
            continue
        name = relative.as_posix()
        if relative.suffix != ".py" or relative.parts[0].startswith("."):
            continue
        if scope is None or any(name == entry or (entry.endswith("/") and name.startswith(entry)) for entry in scope):
            files.add(name)
    return sorted(files)


def code_digests(files: Sequence[str]) -> dict[str, str]:
    """SHA-256 of each file's content (``missing`` for a file that is gone)."""
    digests = {}
    for name in files:
        path = REPOSITORY / name
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    return digests


def provenance(scope: Sequence[str] | None = None) -> dict[str, Any]:
    """What a JSON's figures were measured with: the commit, whether those files had uncommitted
    changes, and the content digest of every project file the benchmark imported within ``scope``
    (all of them without one); `staleness` compares the digests."""
    files = imported_code(scope)
    changed = [name for name in files if (REPOSITORY / name).stat().st_mtime > STARTED]
    return {"commit": _git("rev-parse", "HEAD") or None,
            "dirty": bool(_git("status", "--porcelain", "--", *files)) if files else None,
            "code": code_digests(files), "changed_during_run": changed}


def staleness(record: dict[str, Any]) -> str:
    """Why a JSON's figures may no longer describe the code ('' when they do): the JSON has no
    provenance, or a file the benchmark imported has changed since it was measured."""
    recorded = record.get("provenance")
    if not recorded or not recorded.get("code"):
        return "measured before provenance was recorded: the code it measured is unknown"
    if recorded.get("changed_during_run"):
        return "code changed while it was measured: " + ", ".join(recorded["changed_during_run"])
    now = code_digests(list(recorded["code"]))
    changed = [name for name, digest in recorded["code"].items() if now[name] != digest]
    if not changed:
        return ""
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    commit = (recorded.get("commit") or "an unknown commit")[:10]
    return f"code changed since it was measured at {commit}: {shown}"


# ------------------------------------------------------------------------------ floors of a task
def calibration_path(data: str) -> Path:
    """Where `benchmarks/calibration.py` writes the floors of ``data`` (the cluttered task's is the default)."""
    return RESULTS / ("calibration.json" if data == "cluttered" else f"calibration_{Path(data).name}.json")


def calibrated_floors(data: str) -> dict[str, float]:
    """The floors `benchmarks/calibration.py` measured on ``data`` (chance, raw-pixel k-NN, k-NN on
    randomly initialised CNN and ViT features), from its JSON; empty when it has not been measured."""
    path = calibration_path(data)
    if not path.is_file():
        return {}
    floors = json.loads(path.read_text())["floors"]
    return {"chance": floors["chance"], "raw-pixel k-NN": floors["raw_knn"],
            "random-init CNN k-NN": statistics.fmean(floors["random_cnn_knn"]),
            "random-init ViT k-NN": statistics.fmean(floors["random_vit_knn"])}


def task_headroom(baseline: Sequence[float] | float, data: str, *, floors: Sequence[str] = ("chance", "raw-pixel k-NN"),
                  effects: dict[str, tuple[float, float]] | None = None, margin: float = 0.05) -> dict[str, Any]:
    """`headroom` of a baseline on ``data`` against the calibrated floors named in ``floors`` (a
    supervised baseline: chance and raw-pixel k-NN; an SSL k-NN target: raw-pixel and random-init
    features). Without a calibration of ``data`` the headroom is not shown."""
    measured = calibrated_floors(data)
    if not measured:
        return {"ok": False, "checks": [], "reason": f"no calibration of {data_name(data)} "
                f"(run python benchmarks/calibration.py --data {data} --out "
                f"{calibration_path(data).relative_to(REPOSITORY)})"}
    return headroom(baseline, floors={name: measured[name] for name in floors}, margin=margin, effects=effects)
