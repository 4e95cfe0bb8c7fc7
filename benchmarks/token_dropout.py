"""Token dropout and patch scaling: what they save, measured on whole training runs in one process.

(a) Training-step time of a ViT classifier on ``--data`` (the digits by default; 16 px / patch 2: 64 patch tokens) at keep
    ratio 0.75 / 0.5 / 0.25 and at patch scale 2 (flexi and lower-resolution), against the full
    sequence, with timm's own ``patch_drop_rate`` at the same rates beside `TokenDropout`. Each
    variant is a whole training run timed over ``--steps`` steps after 3 untimed warm-up steps; the
    variants take turns over ``--repeats`` rounds and the median is kept.
(b) Time to accuracy of SimCLR (and MoCo v3, DINO) on ``--data`` (the configs' digits by default; the
    wrapped data module is swapped for another), configs/<method>_token_dropout.yaml:
    the full-sequence baseline for ``--seeds`` seeds sets the target (the mean over seeds of the mean
    of each run's last 3 k-NN evaluations); the schedule search (``--budget``) runs once; the
    accelerated runs (same seeds, the searched schedule) stop as soon as their k-NN accuracy reaches the
    target. Cost is the process CPU time of the training steps (EfficiencyReport; evaluation excluded),
    wall time beside it. Ratios: accelerated time-to-target over the baseline's whole training time
    (the acceptance figure) and over the baseline's own time to that target.

    python benchmarks/token_dropout.py [--small] [--methods simclr,mocov3,dino] [--seeds 3] [--epochs 16] [--data D]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    HOLDS, NO_HEADROOM, WITHIN_NOISE, LoopTimer, add_data_argument, add_ratios, classification_data, data_config,
    meets_goal, parser, publish, table, task_headroom, time_variants, verdict,
)
from stacktrain.callbacks import EfficiencyReport, TokenDropout  # noqa: E402
from stacktrain.lightning_modules import ImageClassifier  # noqa: E402

#: The code this benchmark's figures depend on (`benchmarks.common.provenance`: a change here marks its
#: JSON stale in RESULTS.md; a change to another technique does not).
SCOPE = [
    "benchmarks/token_dropout.py",
    "benchmarks/common.py",
    "datamodules/",
    "stacktrain/stack.py",
    "callbacks/efficiency.py",
    "callbacks/token_dropout.py",
    "stacktrain/functional/token_drop.py",
    "stacktrain/functional/acceleration_schedule.py",
    "stacktrain/functional/contrastive.py",
    "stacktrain/functional/flops.py",
    "stacktrain/search_schedule.py",
    "lightning_modules/contrastive.py",
    "lightning_modules/classifier.py",
    "stacktrain/models.py",
    "stacktrain/optim.py",
]

REPO = Path(__file__).resolve().parents[1]
#: Search budgets: MoCo v3's momentum encoder and DINO's teacher see full sequences, so no schedule
#: of the student costs less than about 0.31 of their full step.
BUDGETS = {"simclr": 0.3, "mocov3": 0.4, "dino": 0.4}
CONFIGS = {"simclr": "simclr_token_dropout.yaml", "mocov3": "mocov3_token_dropout.yaml", "dino": "dino_token_dropout.yaml"}
#: (a) untimed steps before the clock starts (one-time kernel setup of each new sequence length)
WARMUP_STEPS = 3
STEP_VIT = dict(img_size=16, patch_size=2, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0)


# ------------------------------------------------------------------------------ (a) step time
def classifier_run(steps: int, batch_size: int, vit: dict, patch_drop_rate: float = 0.0, technique: dict | None = None,
                   data: str = "digits", accelerator: str = "cpu"):
    def run() -> dict[str, float]:
        torch.manual_seed(0)
        datamodule = classification_data(data, batch_size=batch_size, image_size=vit["img_size"],
                                         channels=1 if data in ("digits", "cluttered") else 3)
        model = ImageClassifier("vit_tiny_patch16_224", in_chans=datamodule.channels,
                                model_kwargs=dict(vit, patch_drop_rate=patch_drop_rate))
        timer = LoopTimer(warmup_steps=WARMUP_STEPS)
        callbacks: list[Callback] = [timer]
        if technique is not None:
            callbacks.append(TokenDropout(**technique))
        trainer = Trainer(accelerator=accelerator, devices=1, max_steps=steps + WARMUP_STEPS, limit_val_batches=0, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          callbacks=callbacks)
        trainer.fit(model, datamodule)
        return {"wall_s": timer.wall, "cpu_s": timer.cpu}
    return run


def step_times(steps: int, repeats: int, batch_size: int, vit: dict, data: str = "digits",
               accelerator: str = "cpu") -> dict[str, dict[str, float]]:
    run = partial(classifier_run, steps, batch_size, vit, data=data, accelerator=accelerator)
    variants = {"full sequence": run()}
    for keep in (0.75, 0.5, 0.25):
        variants[f"TokenDropout keep {keep}"] = run(technique=dict(keep_ratio=keep))
        variants[f"timm patch_drop_rate {1 - keep:g}"] = run(patch_drop_rate=1 - keep)
    variants["TokenDropout patch scale 2 (flexi)"] = run(technique=dict(keep_ratio=1.0, patch_scale=2, patch_mode="flexi"))
    variants["TokenDropout patch scale 2 (resolution)"] = run(
        technique=dict(keep_ratio=1.0, patch_scale=2, patch_mode="resolution"))
    timings = add_ratios(time_variants(variants, repeats), "full sequence")
    for row in timings.values():
        row["step_ms"] = 1000 * row["wall_s"] / steps
        row["step_cpu_ms"] = 1000 * row["cpu_s"] / steps
    return timings


# ------------------------------------------------------------------------------ (b) time to accuracy
class KnnCurve(Callback):
    """After every validation: (epoch, step, k-NN accuracy, cumulative training-step CPU and wall time);
    stops the run once the accuracy reaches ``target``."""

    def __init__(self, report: EfficiencyReport, target: float | None = None) -> None:
        self.report = report
        self.target = target
        self.points: list[dict[str, float]] = []

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or "val/knn_acc" not in trainer.callback_metrics:
            return
        accuracy = float(trainer.callback_metrics["val/knn_acc"])
        self.points.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "knn_acc": accuracy,
                            "cpu_s": self.report.step_cpu_s, "wall_s": self.report.step_wall_s})
        if self.target is not None and accuracy >= self.target:
            trainer.should_stop = True


def overrides_for(config: str, args: Any) -> list[str]:
    """Command-line overrides of the config: the number of epochs and, if asked, the ViT's width/depth."""
    import yaml

    extra = ["--trainer.max_epochs", str(args.epochs)]
    if args.data != "digits":  # the configs' data is the digits: swap the wrapped data module for --data's
        base = yaml.safe_load(Path(config).read_text())["data"]["init_args"]["base"]["init_args"]
        local = args.data != "cluttered"
        extra += ["--data.init_args.base", json.dumps(data_config(
            args.data, batch_size=base.get("batch_size", 64), image_size=base.get("image_size"),
            channels=3 if local else base.get("channels", 1), small=args.small))]
    if args.small:  # a smoke test: a few batches per epoch
        extra += ["--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2"]
    if args.width or args.depth:
        kwargs = dict(yaml.safe_load(Path(config).read_text())["model"]["init_args"]["model_kwargs"])
        kwargs.update({k: v for k, v in (("embed_dim", args.width), ("depth", args.depth)) if v})
        extra += ["--model.init_args.model_kwargs", json.dumps(kwargs)]
    return extra


def ssl_run(config: str, seed: int, overrides: list[str], scratch: str, schedule_file: str | None = None,
            target: float | None = None) -> dict[str, Any]:
    from stacktrain.search_schedule import _load

    model, datamodule, settings = _load(config, [*overrides, "--seed_everything", str(seed)])
    seed_everything(seed)
    report = EfficiencyReport(dirpath=scratch)
    curve = KnnCurve(report, target)
    callbacks: list[Callback] = [report, curve]
    if schedule_file is not None:
        callbacks.insert(0, TokenDropout(schedule_file=schedule_file))
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=settings["max_epochs"], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=callbacks, limit_train_batches=settings["limit_train_batches"],
                      limit_val_batches=settings["limit_val_batches"])
    trainer.fit(model, datamodule)
    flops = report.lines.get(("token_dropout", "train FLOPs/step"))
    return {"seed": seed, "curve": curve.points, "steps": trainer.global_step, "cpu_s": report.step_cpu_s,
            "wall_s": report.step_wall_s, "vit_flops_ratio": flops.ratio if flops else 1.0}


def first_reaching(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    return next((point for point in curve if point["knn_acc"] >= target - 1e-9), None)


def time_to_accuracy(method: str, args: Any, scratch: str) -> dict[str, Any]:
    from stacktrain.search_schedule import search_schedule

    config = str(REPO / "configs" / CONFIGS[method])
    overrides = overrides_for(config, args)
    seeds = list(range(args.seeds if method == "simclr" else args.seeds_other))
    baselines = [ssl_run(config, seed, overrides, scratch) for seed in seeds]
    finals = [statistics.mean(p["knn_acc"] for p in run["curve"][-3:]) for run in baselines]
    target = statistics.mean(finals)
    schedule_path = str(Path(scratch) / f"{method}_schedule.yaml")
    search_start = time.process_time()
    budget = args.budget if args.budget is not None else BUDGETS[method]
    searched = search_schedule(config, budget, schedule_path, calibration_fraction=args.calibration_fraction,
                               batches=args.batches, points=args.points, overrides=overrides, plot=True)
    search_cpu = time.process_time() - search_start
    phases = TokenDropout(schedule_file=schedule_path).schedule.as_dict()["phases"]
    accelerated = [ssl_run(config, seed, overrides, scratch, schedule_path, target) for seed in seeds]

    baseline_cpu = statistics.mean(run["cpu_s"] for run in baselines)
    baseline_wall = statistics.mean(run["wall_s"] for run in baselines)
    own = [first_reaching(run["curve"], target) for run in baselines]
    reached = [first_reaching(run["curve"], target) for run in accelerated]
    row: dict[str, Any] = {
        "target_knn_acc": target, "baseline_final_knn_acc": finals, "baseline_cpu_s": baseline_cpu,
        "baseline_wall_s": baseline_wall, "schedule": phases, "budget": budget, "schedule_expected_cost": searched["expected_cost"],
        "search_cpu_s": search_cpu, "reached": sum(r is not None for r in reached), "seeds": len(seeds),
        "accelerated_final_knn_acc": [run["curve"][-1]["knn_acc"] for run in accelerated],
        "accelerated_vit_flops_ratio": [run["vit_flops_ratio"] for run in accelerated],
    }
    if all(r is not None for r in reached):
        accel_cpu = statistics.mean(r["cpu_s"] for r in reached)  # type: ignore[index]
        accel_wall = statistics.mean(r["wall_s"] for r in reached)  # type: ignore[index]
        row.update(accelerated_cpu_s_to_target=accel_cpu, accelerated_wall_s_to_target=accel_wall,
                   cpu_ratio=accel_cpu / baseline_cpu, wall_ratio=accel_wall / baseline_wall,
                   per_seed_cpu_ratio=[r["cpu_s"] / b["cpu_s"] for r, b in zip(reached, baselines)])  # type: ignore[index]
        if all(o is not None for o in own):
            own_cpu = statistics.mean(o["cpu_s"] for o in own)  # type: ignore[index]
            row.update(baseline_cpu_s_to_target=own_cpu, cpu_ratio_vs_baseline_time_to_target=accel_cpu / own_cpu)
    row["runs"] = {"baseline": baselines, "accelerated": accelerated}
    return row


def report(payload: dict[str, Any]) -> str:
    """The Markdown report of a payload of ``main`` (also a JSON it wrote): (a) the step-time table and
    the gap to timm's PatchDropout at keep 0.5, (b) time to accuracy per method, with its schedule.
    A payload whose step times come from a separate run carries that run's settings in
    ``settings_step_time``."""
    lines: list[str] = []
    steps = payload.get("step_time") or {}
    if steps:
        settings = payload.get("settings_step_time") or payload["settings"]
        vit = payload.get("step_vit")
        shape = f", {vit['embed_dim']} wide, depth {vit['depth']}" if vit else ""
        lines += [
            f"(a) Classifier training loops of {settings['steps']} steps (batch {settings['batch_size']}, "
            f"ViT 16 px / patch 2{shape}), median of {settings['repeats']} runs, variants taking turns.",
            "", table(steps, ["step_cpu_ms", "cpu_ratio", "step_ms", "wall_ratio"]), "",
        ]
        gap = payload.get("keep_0.5_gap_to_timm")
        if gap:
            lines += [f"Keep 0.5: TokenDropout ratio - timm PatchDropout ratio = {gap['cpu']:+.3f} (CPU), "
                      f"{gap['wall']:+.3f} (wall).", ""]
    accuracy = payload.get("time_to_accuracy") or {}
    if accuracy:
        settings = payload["settings"]
        columns = ["target_knn_acc", "reached", "budget", "schedule_expected_cost", "cpu_ratio", "wall_ratio",
                   "cpu_ratio_vs_baseline_time_to_target", "baseline_cpu_s", "search_cpu_s"]
        rows = {method: {**{k: row.get(k, "not reached") for k in columns},
                         "reached": f"{row['reached']}/{row['seeds']}"} for method, row in accuracy.items()}
        lines += [
            f"(b) Time to the baseline's k-NN accuracy, {settings['epochs']} epochs (ViT width "
            f"{settings['width'] or 'of the config'}, depth {settings['depth'] or 'of the config'}); ratios: accelerated "
            "CPU/wall time to the target over the baseline's whole training (cpu_ratio, wall_ratio) and over the "
            "baseline's own time to it.",
            "", table(rows, columns), "",
            "Searched schedules (phase end as a fraction of training: keep ratio, patch scale):", "",
        ]
        for method, row in accuracy.items():
            phases = ", ".join(f"{p['end']:g}: {p['keep_ratio']:g}/{p['patch_scale']}" for p in row["schedule"])
            lines.append(f"- {method}: {phases}")
    return "\n".join(lines).rstrip()


#: Issue 17's goals for the time to the baseline's plateau (search excluded) and the paper's ImageNet figures.
TIME_GOALS = {"simclr": (0.30, "1/3.3"), "mocov3": (0.25, "1/4"), "dino": (0.40, "1/2.5")}


def verdicts(payload: dict[str, Any]) -> list[dict[str, str]]:
    """(a) the step-time ratios against their goals; (b) each method's time to the baseline's plateau,
    not shown unless the plateau lies above the floors (raw-pixel and random-init ViT k-NN)."""
    rows = []
    steps = payload.get("step_time") or {}
    if steps:
        keep = steps["TokenDropout keep 0.5"]["cpu_ratio"]
        rows.append(verdict("Token dropout at keep 0.5 cuts the ViT training step to at most 0.6x",
                            meets_goal(keep, 0.6), f"{keep:.3f}x (CPU time, median of whole runs)",
                            paper="PatchDropout: at least 50% FLOPs saved"))
        gap = payload.get("keep_0.5_gap_to_timm", {}).get("cpu", 0.0)
        rows.append(verdict("TokenDropout at keep 0.5 is as fast as timm's PatchDropout (ratio within 0.05)",
                            meets_goal(abs(gap), 0.05), f"{gap:+.3f} in step-time ratio"))
    data = (payload.get("settings") or {}).get("data", "digits")
    for method, row in (payload.get("time_to_accuracy") or {}).items():
        goal, paper = TIME_GOALS.get(method, (0.5, ""))
        room = task_headroom(row["target_knn_acc"], data, floors=("raw-pixel k-NN", "random-init ViT k-NN"))
        first_eval = any(run["curve"] and run["curve"][0]["knn_acc"] >= row["target_knn_acc"] - 1e-9
                         for run in row.get("runs", {}).get("accelerated", []))
        reason = room["reason"] + ("; target reached at the first evaluation (an artefact)" if first_eval else "")
        ratios = row.get("per_seed_cpu_ratio") or []
        outcome = meets_goal(ratios, goal, headroom_ok=room["ok"] and not first_eval) if ratios else NO_HEADROOM
        if outcome == HOLDS and len(ratios) < 3:
            outcome, reason = WITHIN_NOISE, f"{len(ratios)} seed(s): the protocol asks for at least 3"
        figure = (f"{statistics.fmean(ratios):.3f}x of the baseline's CPU time (target k-NN "
                  f"{row['target_knn_acc']:.3f}, {len(ratios)} seed(s))") if ratios else "target never reached"
        rows.append(verdict(f"{method}: time to the baseline's k-NN plateau at most {goal}x with token dropout",
                            outcome, figure, reason=reason, paper=paper))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--parts", default="a,b", help="which parts to run: a (step time), b (time to accuracy)")
    arguments.add_argument("--steps", type=int, default=20, help="(a) training steps per run")
    arguments.add_argument("--repeats", type=int, default=3, help="(a) rounds of whole runs")
    arguments.add_argument("--batch-size", type=int, default=64, help="(a) batch size")
    arguments.add_argument("--accelerator", default="cpu", help="(a) Lightning accelerator (gpu: scripts/gpu_check.sh)")
    arguments.add_argument("--methods", default="simclr,mocov3,dino", help="(b) comma-separated; '' to skip (b)")
    arguments.add_argument("--seeds", type=int, default=3, help="(b) seeds of SimCLR")
    arguments.add_argument("--seeds-other", type=int, default=1, help="(b) seeds of MoCo v3 and DINO")
    arguments.add_argument("--epochs", type=int, default=16, help="(b) training epochs of the baseline")
    arguments.add_argument("--width", type=int, default=64, help="(b) ViT width (0: the config's)")
    arguments.add_argument("--depth", type=int, default=4, help="(b) ViT depth (0: the config's)")
    arguments.add_argument("--budget", type=float, default=None,
                           help="(b) schedule search budget for every method (default: 0.3 SimCLR, 0.4 MoCo v3 and DINO)")
    arguments.add_argument("--calibration-fraction", type=float, default=0.25)
    arguments.add_argument("--batches", type=int, default=4, help="(b) measurement batches of the search")
    arguments.add_argument("--points", type=lambda t: [float(v) for v in t.split(",")],
                           default=[0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0], help="(b) search checkpoints")
    add_data_argument(arguments, default="digits")
    args = arguments.parse_args(argv)
    vit = dict(STEP_VIT)
    if args.small:
        args.steps, args.repeats, args.seeds, args.seeds_other, args.epochs = 2, 1, 1, 1, 2
        args.width, args.depth, args.batches, args.points = 32, 2, 2, [0.0, 0.5, 1.0]
        args.methods = args.methods if args.methods != "simclr,mocov3,dino" else "simclr"
        vit.update(embed_dim=32, depth=2)
    scratch = tempfile.mkdtemp(prefix="stacktrain-token-dropout-")

    parts = set(args.parts.split(","))
    steps: dict[str, Any] = {}
    gap: dict[str, float] = {}
    if "a" in parts:
        steps = step_times(args.steps, args.repeats, args.batch_size, vit, args.data, args.accelerator)
        ours, theirs = steps["TokenDropout keep 0.5"], steps["timm patch_drop_rate 0.5"]
        gap = {"cpu": ours["cpu_ratio"] - theirs["cpu_ratio"], "wall": ours["wall_ratio"] - theirs["wall_ratio"]}

    accuracy: dict[str, Any] = {}
    methods = [m for m in args.methods.split(",") if m] if "b" in parts else []
    for method in methods:
        accuracy[method] = time_to_accuracy(method, args, scratch)
        row = accuracy[method]
        print(f"(b) {method}: target k-NN {row['target_knn_acc']:.4f}; reached by {row['reached']}/{row['seeds']} seeds",
              flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    payload = {"settings": settings, "step_vit": vit, "step_time": steps, "keep_0.5_gap_to_timm": gap,
               "time_to_accuracy": accuracy}
    publish("token_dropout", payload, args.out, report)
    return {"step_time": steps, "gap": gap, "time_to_accuracy": accuracy}


if __name__ == "__main__":
    main()
