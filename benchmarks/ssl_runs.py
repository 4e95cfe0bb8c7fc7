"""Whole self-supervised training runs for `benchmarks/token_dropout.py`: one run (`ssl_run`), and a
list of them (`run_specs`) run ``jobs`` at a time in worker processes and kept in a folder, so that a
benchmark of many hours can use every core and continue where an interrupted invocation stopped.

A run is described by a `RunSpec` (config, seed, overrides, epochs, the token dropout it trains
with). Its result is stored as ``<runs_dir>/<key>.json``, where the key digests the spec, the bytes of
the config and of the schedule file it reads, and the code the benchmark measures (its ``SCOPE``):
a stored result is reused only for the same run of the same code. While it trains, a run keeps its
whole state after every epoch in ``<runs_dir>/<key>.ckpt`` (`EpochCheckpoint`): a run killed mid-way
continues from its last finished epoch and ends as the uninterrupted run would. Training-step CPU time is each
process's own, so runs side by side on separate cores keep comparable CPU figures (their wall times
are not compared across runs that shared the machine differently).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import Checkpoint

from benchmarks.common import REPOSITORY, code_digests
from stacktrain.callbacks import EfficiencyReport, TokenDropout
from stacktrain.search_schedule import INDEX, ProgressCheckpoints, load_config

__all__ = ["EpochCheckpoint", "KnnCurve", "RunSpec", "code_state", "run_specs", "scope_files", "ssl_run", "stored_search"]


class KnnCurve(Callback):
    """After every validation: (epoch, step, k-NN accuracy, cumulative training-step CPU and wall time)."""

    def __init__(self, report: EfficiencyReport) -> None:
        self.report = report
        self.points: list[dict[str, float]] = []

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or "val/knn_acc" not in trainer.callback_metrics:
            return
        self.points.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                            "knn_acc": float(trainer.callback_metrics["val/knn_acc"]),
                            "cpu_s": self.report.step_cpu_s, "wall_s": self.report.step_wall_s})

    def state_dict(self) -> dict[str, Any]:
        return {"points": [dict(point) for point in self.points]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [dict(point) for point in state_dict["points"]]


class EpochCheckpoint(Checkpoint):
    """The whole training state after every training epoch, with the process's random number generators,
    written whole or not at all to ``path``. As a `Checkpoint` it runs after the module's own epoch-end
    hook. The data modules and `TokenDropout` seed their draws by (seed, epoch, sample) and (seed, step)
    already; the saved generators cover whatever else draws from the global ones (a model's dropout), so
    a run killed mid-way loses at most one epoch and ends as the uninterrupted run would."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".part")
        os.close(handle)
        trainer.save_checkpoint(temporary)
        os.replace(temporary, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        np.random.set_state(state_dict["numpy"])
        random.setstate(state_dict["python"])


def ssl_run(config: str, seed: int, overrides: Sequence[str], scratch: str, epochs: int, *,
            technique: TokenDropout | None = None, checkpoints: str | None = None,
            checkpoint_points: Sequence[float] = (), resume: str | None = None,
            callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """One whole SSL run of ``config`` for ``epochs`` epochs (its LR schedule over that length), with the
    config's gradient clipping, k-NN after every epoch; ``technique`` compresses it, ``checkpoints``
    keeps `ProgressCheckpoints` at ``checkpoint_points`` for the schedule search; ``resume`` (a file) keeps
    an `EpochCheckpoint` there and continues from it when it exists; ``callbacks`` are added last."""
    model, datamodule, settings = load_config(config, [*overrides, "--trainer.max_epochs", str(epochs),
                                                 "--seed_everything", str(seed)])
    seed_everything(seed)
    report = EfficiencyReport(dirpath=scratch)
    curve = KnnCurve(report)
    kept: list[Callback] = [report, curve]
    if technique is not None:
        kept.insert(0, technique)
    if checkpoints is not None:
        kept.append(ProgressCheckpoints(checkpoint_points, dirpath=checkpoints))
    if resume is not None:
        kept.append(EpochCheckpoint(resume))
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                      enable_checkpointing=resume is not None, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[*kept, *callbacks],
                      limit_train_batches=settings["limit_train_batches"],
                      limit_val_batches=settings["limit_val_batches"], gradient_clip_val=settings["gradient_clip_val"])
    continued = resume is not None and os.path.isfile(resume)
    # our own file, holding numpy's and Python's generator states beside tensors
    trainer.fit(model, datamodule, ckpt_path=resume if continued else None, weights_only=False if continued else None)
    flops = report.lines.get(("token_dropout", "train FLOPs/step"))
    return {"seed": seed, "epochs": epochs, "curve": curve.points, "steps": trainer.global_step,
            "cpu_s": report.step_cpu_s, "wall_s": report.step_wall_s,
            "vit_flops_ratio": flops.ratio if flops else 1.0,
            "final_knn_acc": curve.points[-1]["knn_acc"] if curve.points else float("nan")}


@dataclass(frozen=True)
class RunSpec:
    """One run of `ssl_run`, picklable for a worker process: a constant compression (``keep_ratio``,
    ``patch_scale``; 1 and 1 for none) or a ``schedule_file``, and optionally ``checkpoints`` (a
    folder for `ProgressCheckpoints` at ``checkpoint_points``)."""

    config: str
    seed: int
    overrides: tuple[str, ...]
    epochs: int
    keep_ratio: float = 1.0
    patch_scale: int = 1
    schedule_file: str | None = None
    checkpoints: str | None = None
    checkpoint_points: tuple[float, ...] = ()

    def technique(self) -> TokenDropout | None:
        if self.schedule_file is not None:
            return TokenDropout(schedule_file=self.schedule_file)
        if self.keep_ratio < 1.0 or self.patch_scale > 1:
            return TokenDropout(keep_ratio=self.keep_ratio, patch_scale=self.patch_scale)
        return None

    def key(self, code: dict[str, str]) -> str:
        """Digest of what decides the run's result: the spec, the config's and schedule file's bytes
        and the measured code (``code``: `code_state` of the benchmark's scope)."""
        read = [self.config] + ([self.schedule_file] if self.schedule_file else [])
        return _digest({"spec": asdict(self), "files": {path: hashlib.sha256(Path(path).read_bytes()).hexdigest()
                                                        for path in read}, "code": code})

    def run(self, scratch: str, resume: str | None = None) -> dict[str, Any]:
        """The run, continued from ``resume`` when that file holds an `EpochCheckpoint` of it; started afresh,
        it first clears its ``checkpoints`` folder (left by an unfinished or outdated run of it)."""
        if self.checkpoints is not None and not (resume is not None and os.path.isfile(resume)):
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        return ssl_run(self.config, self.seed, list(self.overrides), scratch, self.epochs, technique=self.technique(),
                       checkpoints=self.checkpoints, checkpoint_points=self.checkpoint_points, resume=resume)


def scope_files(scope: Sequence[str]) -> list[str]:
    """The repository's Python files named by ``scope`` (files, or folders ending in ``/``), sorted."""
    files = set()
    for entry in scope:
        if entry.endswith("/"):
            files |= {p.relative_to(REPOSITORY).as_posix() for p in (REPOSITORY / entry).rglob("*.py")}
        else:
            files.add(entry)
    return sorted(files)


def code_state(scope: Sequence[str]) -> dict[str, str]:
    """The content digest of every file of ``scope``: part of every key, so a stored result is reused
    only for the code it was measured on."""
    return code_digests(scope_files(scope))


def _digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


def _stored(path: Path, spec: RunSpec) -> dict[str, Any] | None:
    """A stored result, if it is there and (for a run that kept checkpoints) its checkpoints are too."""
    if not path.is_file():
        return None
    if spec.checkpoints is not None and not (Path(spec.checkpoints) / INDEX).is_file():
        return None
    return json.loads(path.read_text())


def _store(path: Path, result: dict[str, Any]) -> None:
    """Written whole or not at all (an interrupted write leaves no half file to be reused)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".part")
    with os.fdopen(handle, "w") as file:
        json.dump(result, file)
    os.replace(temporary, path)


def _worker_start(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_worker(spec: RunSpec, scratch: str, resume: str) -> dict[str, Any]:
    return spec.run(scratch, resume)


def run_specs(specs: Sequence[RunSpec], *, runs_dir: str, scope: Sequence[str], jobs: int = 1,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The results of ``specs`` in their order: stored ones read from ``runs_dir``, the others run
    (``jobs`` at a time in spawned worker processes with this process's torch thread count; one job
    runs them here) and stored as each finishes; a run left unfinished by an earlier invocation continues
    from its last epoch."""
    folder = Path(runs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    code = code_state(scope)
    paths = [folder / f"{spec.key(code)}.json" for spec in specs]
    results: list[dict[str, Any] | None] = [_stored(path, spec) for path, spec in zip(paths, specs)]
    todo = [index for index, result in enumerate(results) if result is None]
    if len(specs) > len(todo):
        log(f"ssl_runs: {len(specs) - len(todo)} of {len(specs)} runs reused from {runs_dir}")
    scratch = str(folder / "scratch")

    resumes = [str(path.with_suffix(".ckpt")) for path in paths]
    continued = sum(os.path.isfile(resumes[index]) for index in todo)
    if continued:
        log(f"ssl_runs: {continued} unfinished runs continue from their last epoch")

    def done(index: int, result: dict[str, Any]) -> None:
        results[index] = result
        _store(paths[index], result)
        Path(resumes[index]).unlink(missing_ok=True)
        spec = specs[index]
        log(f"ssl_runs: seed {spec.seed}, {spec.epochs} epochs, keep {spec.keep_ratio:g} / scale {spec.patch_scale}"
            f"{', schedule' if spec.schedule_file else ''}: final k-NN {result['final_knn_acc']:.4f}")

    if jobs <= 1 or len(todo) <= 1:
        for index in todo:
            done(index, specs[index].run(scratch, resumes[index]))
    else:
        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=get_context("spawn"), initializer=_worker_start,
                                 initargs=(torch.get_num_threads(),)) as pool:
            futures = {pool.submit(_run_in_worker, specs[index], scratch, resumes[index]): index for index in todo}
            for future in as_completed(futures):
                done(futures[future], future.result())
    return [result for result in results if result is not None]


def stored_search(config: str, budget: float | None, path: str, checkpoints: str, batches: int,
                  overrides: Sequence[str], scope: Sequence[str]) -> dict[str, Any]:
    """`search_schedule` on ``checkpoints``, writing ``path``; its result is kept beside it (``.json``) and
    reused while the config, the checkpoints, the arguments and the measured code (``scope``) are the same."""
    from stacktrain.search_schedule import search_schedule

    stored = Path(path).with_suffix(".json")
    key = _digest({"config": Path(config).read_text(), "index": (Path(checkpoints) / INDEX).read_text(),
                   "budget": budget, "batches": batches, "overrides": list(overrides), "code": code_state(scope)})
    if stored.is_file() and Path(path).is_file():
        kept = json.loads(stored.read_text())
        if kept.get("key") == key:
            return kept["search"]
    search = {"path": path, **search_schedule(config, budget, path, checkpoints=checkpoints, batches=batches,
                                              overrides=list(overrides), plot=False)}
    _store(stored, {"key": key, "search": search})
    return search
