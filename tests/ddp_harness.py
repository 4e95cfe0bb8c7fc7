"""Run stacktrain as separate processes, the way users do, and compare what each rank ends with.

The 2-process DDP harness every technique's tests use::

    result = run_ddp(["fit", "--config", cfg, *overrides], workdir=tmp_path, dump_dir=tmp_path / "ranks")
    states = load_rank_states(tmp_path / "ranks", 2)
    assert_states_equal(states[0], states[1])

`run_ddp` starts ``python train.py ...`` with ``--trainer.accelerator cpu --trainer.devices 2
--trainer.strategy ddp`` (gloo); Lightning starts the second rank itself. With ``dump_dir``, the
`DumpState` callback is appended to the run and writes ``rank<k>.pt`` at the end of fit: the model's
weights and the ``state_dict`` of every stacktrain technique, so tests can check that ranks agree.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TRAIN_PY = REPO / "train.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(extra: Mapping[str, str] | None = None, threads: int = 1) -> dict[str, str]:
    """Environment for a child run: CPU only, W&B offline, quiet and its own, this folder importable (for
    test-only callbacks by class path), a free rendezvous port, ``threads`` BLAS threads per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        WANDB_MODE=env.get("WANDB_MODE", "offline"),
        WANDB_SILENT="true",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )
    env.pop("LOCAL_RANK", None)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    # wandb.init in this process leaves the address of its service process here; a child that
    # inherited it would attach its run to that service (gone or finished) and not write its own
    env.pop("WANDB_SERVICE", None)
    if extra:
        env.update(extra)
    return env


def run_command(
    argv: Sequence[str], *, workdir: Path, env: Mapping[str, str] | None = None, timeout: float = 300, threads: int = 2
) -> subprocess.CompletedProcess:
    """Run ``argv`` (a python command line) in ``workdir``; output captured as text."""
    return subprocess.run(
        [str(a) for a in argv], cwd=workdir, env=subprocess_env(env, threads=threads), capture_output=True,
        text=True, timeout=timeout,
    )


def run_cli(args: Sequence[str], *, workdir: Path, env: Mapping[str, str] | None = None, timeout: float = 300,
            threads: int = 2) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in ``workdir`` (so ``runs/`` lands there)."""
    return run_command([sys.executable, TRAIN_PY, *args], workdir=workdir, env=env, timeout=timeout, threads=threads)


def run_ddp(
    args: Sequence[str],
    *,
    workdir: Path,
    nprocs: int = 2,
    dump_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 420,
) -> subprocess.CompletedProcess:
    """``python train.py <args>`` as ``nprocs`` CPU processes under DDP (gloo), one thread each."""
    extra = ["--trainer.accelerator", "cpu", "--trainer.devices", str(nprocs), "--trainer.strategy", "ddp"]
    if dump_dir is not None:
        extra += ["--trainer.callbacks+=ddp_harness.DumpState", f"--trainer.callbacks.dirpath={dump_dir}"]
    return run_cli([*args, *extra], workdir=workdir, env=env, timeout=timeout, threads=1)


def launch_driver(script: str, workdir: Path, *args: Any, nprocs: int = 2, timeout: float = 400) -> list[dict[str, Any]]:
    """Run ``tests/<script>`` as ``nprocs`` processes under ``torch.distributed.run`` (one thread each)
    with ``--out <workdir>/out`` and ``args``; returns each rank's ``rank<k>.json`` (see `drive`)."""
    import json

    port = free_port()
    check(run_command(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nprocs),
         "--master-addr", "127.0.0.1", "--master-port", str(port), TESTS / script, "--out", workdir / "out", *args],
        workdir=workdir, env={"MASTER_PORT": str(port)}, threads=1, timeout=timeout,
    ))
    return [json.loads((workdir / "out" / f"rank{rank}.json").read_text()) for rank in range(nprocs)]


def drive(description: str, names: Sequence[str], run_one: Callable[[str, str, Path], dict[str, Any]]) -> None:
    """The main loop of a driver of `launch_driver`, in each of its processes. Command line:
    ``--out DIR --clip WEIGHTS [--only NAME ...]``. Calls ``run_one(name, clip weights, DIR / "runs")``
    for every name, one after the other in the same process group; ``DIR/rank<k>.json`` holds per name
    its status (``ok`` with what ``run_one`` returned, or ``error`` with the traceback), rewritten after
    each, so a failure is reported and the next run goes on."""
    import argparse
    import json
    import traceback

    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for rank<k>.json")
    parser.add_argument("--clip", required=True, help="open_clip weights of stacktrain-micro-clip")
    parser.add_argument("--only", nargs="*", default=list(names), help="which runs (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in args.only:
        try:
            results[name] = {"status": "ok", **run_one(name, args.clip, out / "runs")}
        except Exception:  # recorded, and the next run goes on in the same process group
            results[name] = {"status": "error", "error": traceback.format_exc()}
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    # Leave the process group before the interpreter does: a gloo group torn down at exit has aborted
    # a rank now and then ("terminate called without an active exception") after a run that passed.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the child's output when it did not exit 0."""
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    return result


def offline_wandb_records(root: Path, keys: Sequence[bytes], wait_s: float = 20.0) -> bytes:
    """The bytes of the one offline W&B run file anywhere under ``root``, once every key is in it
    (W&B's service process may still be writing it when ``finish`` or the run's process returns) or
    after ``wait_s``."""
    runs = list(Path(root).glob("**/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    deadline = time.monotonic() + wait_s
    while True:
        records = Path(runs[0]).read_bytes()
        if all(key in records for key in keys) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def technique_states(trainer: Trainer) -> dict[str, Any]:
    """``state_dict`` of every stacktrain technique attached to ``trainer``, by class name."""
    from stacktrain.stack import techniques_of

    return {type(t).__name__: t.state_dict() for t in techniques_of(trainer)}


class DumpState(Callback):
    """Test-only: at the end of fit, each rank writes ``rank<k>.pt`` with its weights, its trainable
    weights at fit start (``initial``) and the state of every technique, for cross-rank and resume
    comparisons (and `assert_trained`: identical ranks are only a check when training moved them)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.initial: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.initial = {k: p.detach().cpu().clone() for k, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        os.makedirs(self.dirpath, exist_ok=True)
        state = {
            "global_step": trainer.global_step,
            "model": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "techniques": technique_states(trainer),
            "initial": self.initial,
        }
        torch.save(state, os.path.join(self.dirpath, f"rank{trainer.global_rank}.pt"))


def load_rank_states(dirpath: Path, nprocs: int) -> list[dict[str, Any]]:
    return [torch.load(Path(dirpath) / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


def assert_trained(state: dict[str, Any], at_least: float = 0.5) -> None:
    """Training moved the weights of a rank (`DumpState`): at least ``at_least`` of the parameters
    trainable at fit start (of unchanged shape) differ at the end, and all of them are finite. Without
    it, ranks that end identical may only mean that nothing was trained."""
    initial, final = state["initial"], state["model"]
    comparable = [k for k, v in initial.items() if k in final and final[k].shape == v.shape]
    assert comparable, "no trainable parameter to compare"
    moved = [k for k in comparable if not torch.equal(initial[k], final[k])]
    assert len(moved) >= at_least * len(comparable), (
        f"training moved {len(moved)} of {len(comparable)} trainable parameters; unchanged: "
        f"{[k for k in comparable if k not in moved][:8]}")
    assert all(torch.isfinite(final[k]).all() for k in comparable), "a trained weight is not finite"


def assert_states_equal(a: Any, b: Any, path: str = "state") -> None:
    """Recursive exact equality of nested dicts/lists/tensors/numbers, naming the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        same = torch.equal(a, b)
        if not same and a.is_floating_point():  # NaN marks "not yet set" in some states: NaN == NaN here
            same = torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
        assert same, f"{path}: tensors differ (max abs diff {(a.float() - b.float()).abs().nan_to_num(0).max().item():.3g})"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{path}: keys differ: {sorted(set(a) ^ set(b))[:10]}"
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"
