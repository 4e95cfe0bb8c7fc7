"""One check of stacktrain on a GPU machine, written as one JSON (run it through scripts/gpu_check.sh).

1. every config of configs/ for a few steps on CUDA in bf16-mixed (the CLIP configs with a randomly
   initialised tiny CLIP saved as their ``pretrained`` file): passed or the error's last line, seconds;
2. the token-dropout step-time benchmark, part (a) (benchmarks/token_dropout.py with its CLI arguments);
3. the early-exit inference timing: a BoostedEarlyExit trained a few steps, its exit policies fitted on
   the validation set, then whole passes over the test set, full network against real early exit at a
   50% FLOPs budget, timed with the GPU synchronised.

``--dry-run`` (also taken when no GPU is visible, e.g. ``CUDA_VISIBLE_DEVICES=``) runs the same code on
the CPU at the smallest sizes: one config, part (a) in ``--small`` mode, a one-step early-exit timing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NEEDS_CLIP_WEIGHTS = {"prompt_tuning_noisy.yaml", "prompt_tuning_unsupervised.yaml", "stack_clip.yaml"}


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the JSON (default $OUT/gpu_check.json, else runs/gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU at the smallest sizes (also without a GPU)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per config")
    parser.add_argument("--configs", default="", help="comma-separated config names (default: all)")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per config run")
    return parser.parse_args(argv)


def device_info() -> dict[str, Any]:
    import lightning
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "lightning": lightning.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info.update(gpu=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda,
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def clip_weights(folder: str) -> str:
    """A randomly initialised tiny CLIP as a plain weights file: the prompt-tuning configs need one, and
    the machine has no network to fetch released weights (this checks that they run, not accuracy)."""
    import torch

    from stacktrain.functional.clip import create_clip_model

    torch.manual_seed(0)
    path = os.path.join(folder, "tiny_clip.pt")
    torch.save(create_clip_model("stacktrain-tiny-clip").state_dict(), path)
    return path


def config_command(config: str, args: argparse.Namespace, root: str, clip: str) -> list[str]:
    accelerator = "cpu" if args.dry_run else "gpu"
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", config, "--trainer.logger", "false",
               "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.strategy", "auto",
               "--trainer.precision", args.precision, "--trainer.max_steps", str(args.steps),
               "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
               "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", root]
    if os.path.basename(config) in NEEDS_CLIP_WEIGHTS:
        command += ["--model.init_args.pretrained", clip]
    return command


def run_configs(args: argparse.Namespace, scratch: str) -> dict[str, dict[str, Any]]:
    configs = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))
    if args.configs:
        wanted = {name if name.endswith(".yaml") else f"{name}.yaml" for name in args.configs.split(",")}
        configs = [c for c in configs if os.path.basename(c) in wanted]
    clip = clip_weights(scratch) if any(os.path.basename(c) in NEEDS_CLIP_WEIGHTS for c in configs) else ""
    results: dict[str, dict[str, Any]] = {}
    for config in configs:
        name = os.path.basename(config)
        root = tempfile.mkdtemp(prefix=name.removesuffix(".yaml") + "-", dir=scratch)
        start = time.perf_counter()
        try:
            done = subprocess.run(config_command(config, args, root, clip), cwd=REPO, capture_output=True, text=True,
                                  timeout=args.timeout, env={**os.environ, "WANDB_MODE": "disabled"})
            lines = (done.stdout + done.stderr).strip().splitlines()
            finished = [line for line in lines if "fit finished after" in line]
            results[name] = {"passed": done.returncode == 0, "seconds": round(time.perf_counter() - start, 1),
                             "line": (finished or lines or [""])[-1][-300:]}
        except subprocess.TimeoutExpired:
            results[name] = {"passed": False, "seconds": args.timeout, "line": f"timed out after {args.timeout} s"}
        print(f"gpu_check: {name}: {'passed' if results[name]['passed'] else 'FAILED'} "
              f"({results[name]['seconds']} s) {results[name]['line']}", flush=True)
    return results


def token_dropout_step_time(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    """benchmarks/token_dropout.py part (a), with its command-line arguments (in this process: its
    ``main(argv)``), on the machine's accelerator."""
    sys.path.insert(0, str(REPO))
    from benchmarks import token_dropout

    out = os.path.join(scratch, "token_dropout.json")
    argv = ["--parts", "a", "--methods", "", "--accelerator", "cpu" if args.dry_run else "gpu", "--out", out]
    if args.dry_run:
        argv.append("--small")
    start = time.perf_counter()
    result: dict[str, Any] = {"command": "python benchmarks/token_dropout.py " + " ".join(argv)}
    try:
        token_dropout.main(argv)
    except Exception as error:  # noqa: BLE001 - the JSON says what failed; the other parts still run
        return {**result, "passed": False, "line": f"{type(error).__name__}: {error}"[-300:]}
    payload = json.loads(Path(out).read_text())
    return {**result, "passed": True, "seconds": round(time.perf_counter() - start, 1),
            "step_time": payload["step_time"], "keep_05_gap_to_timm": payload["keep_0.5_gap_to_timm"]}


def early_exit_inference(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    """Full network against real early exit at a 50% FLOPs budget, on the test set in batches of 256."""
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from stacktrain.datamodules import DigitsDataModule
    from stacktrain.lightning_modules import BoostedEarlyExit

    seed_everything(0)
    device = torch.device("cpu" if args.dry_run else "cuda")
    module = BoostedEarlyExit("resnet10t" if args.dry_run else "resnet18", in_chans=1, predict_budget=0.5)
    data = DigitsDataModule(image_size=32, channels=1, batch_size=64)
    trainer = Trainer(accelerator=device.type if device.type == "cpu" else "gpu", devices=1,
                      max_steps=1 if args.dry_run else 60, precision=args.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=2 if args.dry_run else 1.0, default_root_dir=scratch)
    trainer.fit(module, data)
    trainer.validate(module, data, verbose=False)  # fits the exit policies
    data.setup("test")
    batches = [images.to(device) for images, _ in torch.utils.data.DataLoader(data.test_set, batch_size=256)]
    if args.dry_run:
        batches = batches[:1]
    module.to(device).eval()
    return time_exits(module, batches, device, repeats=1 if args.dry_run else 10)


def time_exits(module: Any, batches: list[Any], device: Any, repeats: int) -> dict[str, Any]:
    import torch

    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def timed(run) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    exits: list[Any] = []
    full = lambda: [module.network.full_forward(b) for b in batches]  # noqa: E731
    early = lambda: exits.extend(module.early_exit(b, 0.5)[1] for b in batches)  # noqa: E731
    with torch.no_grad(), autocast:
        full(), early()  # warm-up (cuDNN algorithm choice, allocator)
        times = {"full": [timed(full) for _ in range(repeats)], "early_exit": [timed(early) for _ in range(repeats)]}
    seen = torch.cat([e.cpu() for e in exits[-len(batches):]])
    full_s, early_s = statistics.median(times["full"]), statistics.median(times["early_exit"])
    return {"full_ms": 1000 * full_s, "early_exit_ms": 1000 * early_s, "wall_ratio": early_s / full_s,
            "flops_ratio": float(module.exit_costs.cpu()[seen].mean()) / module.full_flops,
            "exit_shares": torch.bincount(seen, minlength=module.num_exits).tolist(), "images": int(seen.numel())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = arguments(argv)
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_check: no GPU visible: a dry run on the CPU", flush=True)
        args.dry_run = True
    if args.dry_run:
        args.steps, args.configs = 1, args.configs or "quickstart"
    out = Path(args.out or os.path.join(os.environ.get("OUT") or str(REPO / "runs"), "gpu_check.json"))
    report: dict[str, Any] = {"dry_run": args.dry_run, "precision": args.precision, "steps": args.steps,
                              "machine": device_info()}
    with tempfile.TemporaryDirectory(prefix="stacktrain-gpu-check-") as scratch:
        report["configs"] = run_configs(args, scratch)
        report["token_dropout_step_time"] = token_dropout_step_time(args, scratch)
        try:
            report["early_exit_inference"] = {"passed": True, **early_exit_inference(args, scratch)}
        except Exception as error:  # noqa: BLE001 - the JSON still gets written, saying what failed
            report["early_exit_inference"] = {"passed": False, "line": f"{type(error).__name__}: {error}"[-300:]}
    report["passed"] = all(r["passed"] for r in report["configs"].values()) and all(
        report[part]["passed"] for part in ("token_dropout_step_time", "early_exit_inference"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: wrote {out}; {'passed' if report['passed'] else 'FAILED'}", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
