"""Two-node DDP training over a rate-limited link: step time and bytes per step of the fp32 all-reduce,
stacktrain's INT8 and INT4 all-gather (`GradientQuantization(communication_bits=...)`) and torch's fp16
compression and PowerSGD DDP hooks as anchors.

Two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2, nothing else), a token-bucket
rate limit on both ends (``tc qdisc ... tbf``; settings: unlimited, 1 Gbit/s, 100 Mbit/s), and one
training process per namespace, launched as two nodes::

    ip netns exec NS torchrun --nnodes 2 --node_rank R --nproc_per_node 1 --master_addr 10.77.0.1 \\
        train.py fit --config ... --trainer.num_nodes 2 --trainer.devices 1 --trainer.strategy ddp \\
        --trainer.accelerator cpu

The model is the quickstart ViT (configs/quickstart.yaml) with a full-precision backward, so only the
communication differs. Reported per link and method: the median step time after ``--warmup`` steps
(rank 0, wall clock), and the bytes each rank hands to the collective per step (counted by
`GradientQuantization` for its own path; 4 bytes per value for fp32, 2 for fp16, and PowerSGD's
factors computed from the model's shapes the way torch's hook decides what to compress).

Needs root and ``ip``/``tc`` (iproute2); without them it says why and skips. It removes the namespaces
(and so the veth pair and its qdiscs) at the end, also after a failure. Not in run_all: each 2-node
launch costs ~20 s of start-up, so even ``--small`` takes about a minute.

    sudo python benchmarks/two_nodes.py [--links unlimited 1gbit 100mbit] [--methods ...] [--steps 30] [--repeats 3] [--small]
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import meets_goal, parser, publish, t_interval, table, verdict  # noqa: E402

SCOPE = [
    "benchmarks/two_nodes.py",
    "benchmarks/common.py",
    "callbacks/grad_quant.py",
    "stacktrain/functional/quantize.py",
    "stacktrain/functional/grad_quant.py",
    "stacktrain/stack.py",
    "configs/quickstart.yaml",
    "lightning_modules/classifier.py",
]

#: Link settings: the tbf rate (None: no qdisc).
LINKS: dict[str, str | None] = {"unlimited": None, "1gbit": "1gbit", "100mbit": "100mbit"}
#: Communication methods: stacktrain's communication_bits, or a torch DDP hook registered by `TorchCommHook`.
METHODS: dict[str, dict[str, Any]] = {
    "fp32_allreduce": {},
    "int8_allgather": {"communication_bits": 8},
    "int4_allgather": {"communication_bits": 4},
    "fp16_hook": {"torch_hook": "fp16"},
    "powersgd_hook": {"torch_hook": "powersgd"},
}
ADDRESSES = ("10.77.0.1", "10.77.0.2")
#: PowerSGD's settings here: rank 1, compressed from the 2nd step on (the warm-up steps are not timed).
POWERSGD_RANK, POWERSGD_START = 1, 2


class Skip(RuntimeError):
    """This machine cannot make the namespaces (not root, no iproute2): the benchmark skips."""


def can_make_namespaces() -> str | None:
    """None if this process can make network namespaces, else why not."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root to make network namespaces (ip netns add)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2) on PATH"
    return None


def _sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result


@contextmanager
def two_namespaces() -> Iterator[list[tuple[str, str]]]:
    """Two namespaces joined by a veth pair, 10.77.0.1/24 and 10.77.0.2/24: yields [(namespace, device)]
    per node; removes both namespaces (which removes the pair and its qdiscs) on the way out."""
    why = can_make_namespaces()
    if why is not None:
        raise Skip(why)
    tag = f"st{os.getpid() % 100000}"
    nodes = [(f"{tag}n0", f"{tag}a"), (f"{tag}n1", f"{tag}b")]
    made: list[str] = []
    try:
        for namespace, _ in nodes:
            _sh("ip", "netns", "add", namespace)
            made.append(namespace)
        _sh("ip", "link", "add", nodes[0][1], "netns", nodes[0][0], "type", "veth", "peer", "name", nodes[1][1],
            "netns", nodes[1][0])
        for (namespace, device), address in zip(nodes, ADDRESSES):
            _sh("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            _sh("ip", "-n", namespace, "link", "set", device, "up")
            _sh("ip", "-n", namespace, "link", "set", "lo", "up")
        yield nodes
    except (RuntimeError, OSError) as error:
        if not made:
            raise Skip(f"cannot make network namespaces here: {error}") from error
        raise
    finally:
        for namespace in made:
            _sh("ip", "netns", "del", namespace, check=False)


def set_link(nodes: list[tuple[str, str]], rate: str | None) -> None:
    """A token-bucket limit of ``rate`` on both ends of the pair (both directions); None removes it."""
    for namespace, device in nodes:
        _sh("ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", device, "root", check=False)
        if rate is not None:
            _sh("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", rate,
                "burst", "256kb", "latency", "100ms")


# ------------------------------------------------------------------------------------------ callbacks
class TorchCommHook(Callback):
    """Registers torch's fp16 compression or PowerSGD DDP hook on the DDP model at fit start, on CPU/gloo
    too (Lightning's DDPStrategy registers ``ddp_comm_hook`` only on CUDA)."""

    def __init__(self, kind: str) -> None:
        if kind not in ("fp16", "powersgd"):
            raise ValueError(f"TorchCommHook: kind={kind!r} is not one of fp16, powersgd")
        self.kind = kind

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        model = trainer.strategy.model
        if self.kind == "fp16":
            model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        else:
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=POWERSGD_RANK,
                                                start_powerSGD_iter=POWERSGD_START)
            model.register_comm_hook(state, _one_bucket_at_a_time(powerSGD_hook.powerSGD_hook))


def _one_bucket_at_a_time(hook: Any) -> Any:
    """PowerSGD issues its second and third all-reduce from callbacks of the first; with several buckets
    on gloo those of two buckets can run in a different order on each rank (a collective mismatch that
    aborts the run). Waiting for each bucket's result inside the hook keeps the order (and costs PowerSGD
    its overlap between buckets)."""

    def serialized(state: Any, bucket: Any) -> torch.futures.Future:
        result = hook(state, bucket).wait()
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(result)
        return future

    serialized.__annotations__.update(state=object, bucket=torch.distributed.GradBucket,
                                      **{"return": torch.futures.Future[torch.Tensor]})
    return serialized


class StepTimes(Callback):
    """Each step's wall time; at fit end rank 0 writes them (and what GradientQuantization counted) as JSON,
    and with ``weights_dir`` every rank saves its weights there (``rank<k>.pt``)."""

    def __init__(self, path: str, weights_dir: str | None = None) -> None:
        self.path, self.weights_dir = path, weights_dir
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._start)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.weights_dir is not None:
            Path(self.weights_dir).mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                       Path(self.weights_dir) / f"rank{trainer.global_rank}.pt")
        if not trainer.is_global_zero:
            return
        quant = [c for c in trainer.callbacks if type(c).__name__ == "GradientQuantization"]
        Path(self.path).write_text(json.dumps({
            "step_s": self.times, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "bytes_history": quant[0].bytes_history if quant else [],
            "shapes": [list(p.shape) for p in pl_module.parameters() if p.requires_grad],
        }))


# ------------------------------------------------------------------------------------------ bytes
def powersgd_bytes(shapes: list[list[int]], rank: int = POWERSGD_RANK, min_compression_rate: float = 2.0) -> int:
    """Bytes per step each rank hands to PowerSGD's all-reduces: the P and Q factors of every matrix it
    compresses, the rest in fp32 (torch's rule: compress a rows x cols view when rows * cols >=
    (rows + cols) * rank * min_compression_rate)."""
    total = 0
    for shape in shapes:
        numel = 1
        for size in shape:
            numel *= size
        if len(shape) > 1:
            rows, cols = shape[0], numel // shape[0]
            if rows * cols >= (rows + cols) * rank * min_compression_rate:
                total += 4 * (rows + cols) * rank
                continue
        total += 4 * numel
    return total


def bytes_per_step(method: str, payload: dict[str, Any]) -> tuple[float, int]:
    """(bytes each rank sends per step, bytes of the fp32 all-reduce)."""
    numel = sum(int(torch.Size(shape).numel()) for shape in payload["shapes"])
    fp32 = 4 * numel
    if METHODS[method].get("communication_bits"):
        history = payload["bytes_history"]
        return (statistics.fmean(row[1] for row in history) if history else float("nan")), fp32
    if METHODS[method].get("torch_hook") == "fp16":
        return float(2 * numel), fp32
    if METHODS[method].get("torch_hook") == "powersgd":
        return float(powersgd_bytes(payload["shapes"])), fp32
    return float(fp32), fp32


# ------------------------------------------------------------------------------------------ launch
def method_config(method: str, workdir: Path, config: Path) -> Path:
    """The quickstart config with a full-precision backward and the method's communication."""
    settings = yaml.safe_load(config.read_text())
    callbacks = [c for c in settings["trainer"].get("callbacks", []) if "ProgressBar" not in c["class_path"]]
    options = METHODS[method]
    if options.get("communication_bits"):
        callbacks.append({"class_path": "stacktrain.callbacks.GradientQuantization",
                          "init_args": {"bits": None, "communication_bits": options["communication_bits"]}})
    if options.get("torch_hook"):
        callbacks.append({"class_path": "benchmarks.two_nodes.TorchCommHook", "init_args": {"kind": options["torch_hook"]}})
    settings["trainer"]["callbacks"] = callbacks
    settings["trainer"]["logger"] = False
    path = workdir / f"{method}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


#: Rendezvous ports, one per launch (inside the namespaces, so nothing else uses them).
_PORTS = itertools.count(29500 + os.getpid() % 1000 * 20)


def launch(nodes: list[tuple[str, str]], config: Path, steps: int, workdir: Path, name: str,
           weights_dir: Path | None = None, timeout: float = 300) -> dict[str, Any]:
    """One 2-node run: a torchrun per namespace; returns rank 0's JSON."""
    out = workdir / f"{name}.json"
    port = str(next(_PORTS))  # a fresh port per launch: the last launch's store socket may linger (TIME_WAIT)
    processes = []
    for node_rank, (namespace, device) in enumerate(nodes):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                  "MASTER_PORT", "WANDB_SERVICE")}
        env.update(CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   GLOO_SOCKET_IFNAME=device, TP_SOCKET_IFNAME=device,
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
                   "--master_addr", ADDRESSES[0], "--master_port", port,
                   str(REPO / "train.py"), "fit", "--config", str(config),
                   "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
                   "--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1",
                   "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                   "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                   "--trainer.enable_model_summary", "false",
                   "--trainer.default_root_dir", str(workdir / f"{name}-node{node_rank}"),
                   "--trainer.callbacks+=benchmarks.two_nodes.StepTimes", f"--trainer.callbacks.path={out}"]
        if weights_dir is not None:
            command.append(f"--trainer.callbacks.weights_dir={weights_dir}")
        log = open(workdir / f"{name}-node{node_rank}.log", "w")
        processes.append((subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    try:
        codes = [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process, _ in processes]
    except subprocess.TimeoutExpired:
        codes = [f"still running after {timeout:.0f} s"]
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    if any(codes):
        tails = "\n".join((workdir / f"{name}-node{r}.log").read_text()[-2000:] for r in range(2))
        raise RuntimeError(f"2-node run {name} failed (exit codes {codes}):\n{tails}")
    return json.loads(out.read_text())


def measure(nodes: list[tuple[str, str]], link: str, method: str, steps: int, warmup: int, workdir: Path,
            config: Path, repeats: int = 1) -> dict[str, Any]:
    """``repeats`` whole 2-node runs of one method on one link: the median of their median steps (each run
    also listed), and the bytes per step (the same in every run)."""
    runs_ms = []
    for repeat in range(repeats):
        payload = launch(nodes, method_config(method, workdir, config), steps, workdir, f"{link}-{method}-{repeat}")
        runs_ms.append(1000 * statistics.median(payload["step_s"][warmup:]))
    sent, fp32 = bytes_per_step(method, payload)
    return {"step_ms": statistics.median(runs_ms), "step_ms_runs": runs_ms, "steps_timed": steps - warmup,
            "bytes_per_step": sent, "fp32_bytes_per_step": fp32, "bytes_ratio": sent / fp32,
            "world_size": payload["world_size"]}


def _with_runs(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: dict(row, step_ms_runs=" ".join(f"{ms:.1f}" for ms in row.get("step_ms_runs", [row["step_ms"]])))
            for name, row in rows.items()}


def report(payload: dict[str, Any]) -> str:
    if payload.get("skipped"):
        return f"Two nodes: skipped ({payload['skipped']})."
    lines = [f"Two nodes (two network namespaces, veth pair, `tc tbf` on both ends), torchrun --nnodes 2, "
             f"{payload['config']}, full-precision backward; median step after {payload['warmup']} warm-up steps "
             f"(rank 0; median over {payload.get('repeats', 1)} whole runs, each run's median in step_ms_runs), "
             "bytes each rank sends per step; step_ratio against the fp32 all-reduce on the same link.", ""]
    for link, rows in payload["links"].items():
        columns = ["step_ms", "step_ms_runs", "step_ratio", "bytes_per_step", "bytes_ratio"]
        lines += [f"Link: {link}", "", table(_with_runs(rows), columns), ""]
    return "\n".join(lines).rstrip()


#: Issue 19's goals for stacktrain's INT4 all-gather: (link, at most this fraction of the fp32 step).
STEP_GOALS = (("100mbit", 0.5), ("unlimited", 1.1))


def _runs_against(rows: dict[str, dict[str, Any]], method: str, baseline: str) -> list[float]:
    """Each whole run's median step of ``method`` against the median of ``baseline``'s runs (the methods run
    one after another, so runs are not paired; a goal is met when the t interval of these ratios is)."""
    return [ms / rows[baseline]["step_ms"] for ms in rows[method].get("step_ms_runs", [rows[method]["step_ms"]])]


def _ratio_text(ratios: list[float]) -> str:
    if len(ratios) < 2:
        return f"{ratios[0]:.2f}x (one run)"
    mean, low, high = t_interval(ratios)
    return f"{mean:.3f}x [{low:.3f}, {high:.3f}] over {len(ratios)} runs"


def verdicts(payload: dict[str, Any]) -> list[dict[str, str]]:
    """Issue 19's two-node claims: the INT4 step against the fp32 all-reduce's on the slow and the unlimited
    link, and against PowerSGD's on the slow link (step time only: the runs are too short to compare accuracy)."""
    if payload.get("skipped"):
        return []
    rows = []
    for link, goal in STEP_GOALS:
        measured = payload["links"].get(link, {})
        if "int4_allgather" in measured and "fp32_allreduce" in measured:
            ratios = _runs_against(measured, "int4_allgather", "fp32_allreduce")
            rows.append(verdict(f"Two nodes, {link} link: INT4 communication step at most {goal}x the fp32 all-reduce's",
                                meets_goal(ratios, goal),
                                f"{_ratio_text(ratios)} (median steps {measured['int4_allgather']['step_ms']:.0f} "
                                f"against {measured['fp32_allreduce']['step_ms']:.0f} ms)",
                                paper="QSGD: 1.8x faster on ResNet-152 (slow network)"))
    slow = payload["links"].get("100mbit", {})
    if "int4_allgather" in slow and "powersgd_hook" in slow:
        ratios = _runs_against(slow, "int4_allgather", "powersgd_hook")
        rows.append(verdict("Two nodes, 100mbit link: INT4 communication step no slower than PowerSGD's (rank 1)",
                            meets_goal(ratios, 1.0), f"INT4 / PowerSGD: {_ratio_text(ratios)}",
                            reason="step time only: accuracy after the same steps is not compared (30-step runs)"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--links", nargs="+", choices=list(LINKS), default=list(LINKS))
    arguments.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    arguments.add_argument("--steps", type=int, default=30)
    arguments.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    arguments.add_argument("--repeats", type=int, default=3, help="whole runs per link and method (median taken)")
    arguments.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    args = arguments.parse_args(argv)
    links = ["unlimited"] if args.small else args.links
    methods = ["fp32_allreduce", "int4_allgather"] if args.small else args.methods
    steps, warmup = (6, 2) if args.small else (args.steps, args.warmup)
    repeats = 1 if args.small else args.repeats
    config = Path(args.config).resolve()
    payload: dict[str, Any] = {"config": config.name, "steps": steps, "warmup": warmup, "repeats": repeats,
                               "links": {}}
    workdir = Path(tempfile.mkdtemp(prefix="stacktrain-two-nodes-"))
    try:
        with two_namespaces() as nodes:
            for link in links:
                set_link(nodes, LINKS[link])
                rows = {}
                for method in methods:
                    rows[method] = measure(nodes, link, method, steps, warmup, workdir, config, repeats)
                    print(f"  {link} {method}: {rows[method]['step_ms']:.1f} ms/step, "
                          f"{rows[method]['bytes_per_step']:.0f} B/step", flush=True)
                base = rows.get("fp32_allreduce")
                for row in rows.values():
                    row["step_ratio"] = row["step_ms"] / base["step_ms"] if base else float("nan")
                payload["links"][link] = rows
    except Skip as why:
        print(f"two_nodes: skipped: {why}", flush=True)
        payload["skipped"] = str(why)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    publish("two_nodes", payload, args.out, report)
    return payload


if __name__ == "__main__":
    main()
