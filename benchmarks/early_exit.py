"""BoostNet vs independent exit heads, in one process, on ``--data`` (the digits by default; the cluttered
digits, or a local CIFAR-100 / ImageFolder root).

For every seed, both training modes train the same backbone for the same epochs; then:
  * anytime accuracy of every exit on the test set,
  * budgeted-batch accuracy against the mean FLOPs per sample actually spent, for every budget
    (exit policies fitted on validation data, applied to the test set),
  * the wall time of real early-exit inference at a 50% FLOPs budget against the full network
    (every stage and the last head), whole passes over the test set, alternating, median of repeats.

    python benchmarks/early_exit.py [--backbone resnet18|vit|<timm name>] [--seeds 0 1 2] [--epochs 8] [--data D] [--small]
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    add_data_argument, classification_data, compare, data_name, interval_text, meets_goal, paired, parser, publish,
    table, task_headroom, verdict,
)
from stacktrain.lightning_modules import BoostedEarlyExit  # noqa: E402

BUDGETS = (0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
#: ``--backbone vit``: a small timm ViT whose blocks cost the same, so wall time follows FLOPs on a CPU
#: (a ResNet's stem at 32 px takes a larger share of the time than of the FLOPs).
SMALL_VIT = ("vit_tiny_patch16_224", dict(patch_size=4, embed_dim=96, depth=8, num_heads=4, mlp_ratio=2.0))


def make_data(args):
    """``--data``; a local data set (CIFAR-100, an ImageFolder) is RGB at ``--image-size``."""
    local = args.data not in ("digits", "cluttered")
    return classification_data(args.data, batch_size=64, image_size=args.image_size, channels=3 if local else 1,
                               small=args.small, num_workers=2 if local else 0)


def train(args, mode: str, seed: int):
    seed_everything(seed)
    data = make_data(args)
    data.setup("fit")
    backbone, backbone_kwargs = args.backbone, None
    if backbone == "vit":
        backbone, backbone_kwargs = SMALL_VIT[0], dict(SMALL_VIT[1], img_size=args.image_size)
    module = BoostedEarlyExit(
        backbone, in_chans=data.channels, backbone_kwargs=backbone_kwargs, num_classes=data.num_classes, training=mode,
        budgets=BUDGETS, predict_budget=0.5,
        optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05),
        # the trainer fills in total_steps (stacktrain.optim.build_scheduler)
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=2e-3, pct_start=0.15),
    )
    trainer = Trainer(
        accelerator="cpu", max_epochs=args.epochs, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.root,
        limit_train_batches=args.limit_batches,
    )
    trainer.fit(module, data)
    results = trainer.test(module, data, verbose=False)[0]
    return module, data, results


def time_inference(module: BoostedEarlyExit, data, repeats: int) -> dict:
    """Whole passes over the test set in batches of 256: full network vs real early exit at 50%."""
    data.setup("test")
    loader = torch.utils.data.DataLoader(data.test_set, batch_size=256)
    batches = [images for images, _ in loader]
    module.eval()
    thresholds = module.policy(0.5)
    exits_seen = []

    def full():
        for images in batches:
            module.network.full_forward(images)

    def early():
        for images in batches:
            _, exits, _ = module.network.early_exit(images, thresholds, module.mode, module.weights, module.form)
            exits_seen.append(exits)

    with torch.no_grad():
        full(), early()  # warm-up
        times = {"full": [], "early_exit": []}
        cpu = {"full": [], "early_exit": []}
        for _ in range(repeats):
            for name, run in (("full", full), ("early_exit", early)):
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    exits = torch.cat(exits_seen[-len(batches):])
    flops_ratio = float(module.exit_costs[exits].mean()) / module.full_flops
    full_s, early_s = statistics.median(times["full"]), statistics.median(times["early_exit"])
    return {
        "full_ms": 1000 * full_s, "early_exit_ms": 1000 * early_s, "wall_ratio": early_s / full_s,
        "cpu_ratio": statistics.median(cpu["early_exit"]) / statistics.median(cpu["full"]),
        "flops_ratio": flops_ratio, "exit_shares": torch.bincount(exits, minlength=module.num_exits).tolist(),
    }


def report(payload: dict) -> str:
    """The Markdown report of a payload of ``main`` (also a JSON it wrote): anytime accuracy per exit,
    budgeted accuracy, boost minus independent, and the real early-exit inference time. (JSONs written
    before ``data`` and ``repeats`` were stored name the digits without their size, and no repeat count.)"""
    anytime, curve, deltas = payload["anytime"], payload["budgeted"], payload["boost_minus_independent"]
    rows = {mode: {k: f"{v['acc']:.4f} ({v['flops']:.2f})" for k, v in curve[mode].items()} for mode in curve}
    repeats = f"median of {payload['repeats']} alternating passes" if "repeats" in payload else \
        "median of alternating passes"
    timing = table({"early exit": payload["inference_at_50pct"]},
                   ["flops_ratio", "wall_ratio", "cpu_ratio", "full_ms", "early_exit_ms"])
    return "\n".join([
        f"{payload['backbone']} on {payload.get('data', 'the digits')}, {payload['epochs']} epochs, "
        f"seeds {payload['seeds']}; test set, means over seeds.",
        "", "Anytime accuracy per exit:", "", table(anytime, list(anytime["boost"])),
        "", "Budgeted accuracy (mean FLOPs per sample / full network in brackets; policies fitted on validation):",
        "", table(rows, list(rows["boost"])),
        "", f"Boost - independent: last exit {deltas['last_exit']:+.4f}; over the budgets mean "
        f"{deltas['mean_over_budgets']:+.4f}, worst {deltas['min_over_budgets']:+.4f}.",
        "", "Real early-exit inference at a 50% FLOPs budget against the full network (test set, batches of 256, "
        f"{repeats}):",
        "", timing,
    ])


def verdicts(payload: dict[str, Any]) -> list[dict[str, str]]:
    """Issue 20's claims: boost beats independent exits over the budgets (paired seeds, a task with
    headroom), and real early exit at 50% of the FLOPs saves wall time."""
    per_seed = payload["per_seed"]
    data = payload.get("data_spec", "digits")  # JSONs before --data: the digits
    last = max(int(key.rsplit("exit", 1)[1]) for key in per_seed["boost"][0] if key.startswith("test/acc_exit"))
    room = task_headroom([r[f"test/acc_exit{last}"] for r in per_seed["independent"]], data)
    budget_keys = [key for key in per_seed["boost"][0] if key.startswith("test/acc_budget_")]

    def over_budgets(mode: str) -> list[float]:
        return [statistics.fmean(run[key] for key in budget_keys) for run in per_seed[mode]]

    stats = paired(over_budgets("independent"), over_budgets("boost"))
    kind = "ViT" if payload["backbone"] == "vit" or "vit" in payload["backbone"] else "CNN"
    rows = [verdict(f"{kind}: boosted exits beat independent exits on the mean over budgets",
                    compare(stats, "beats", 0.0, room["ok"]), "boost - independent: " + interval_text(stats),
                    reason=room["reason"], paper="MSDNet CIFAR-100: budgeted plateau 75.8 against 74.9")]
    timing = payload.get("inference_at_50pct")
    if timing:
        goal = 0.55 if kind == "ViT" else 0.65
        rows.append(verdict(f"{kind}: real early exit at 50% FLOPs takes at most {goal}x the full network's wall time",
                            meets_goal(timing["wall_ratio"], goal), f"{timing['wall_ratio']:.3f}x (FLOPs "
                            f"{timing['flops_ratio']:.3f}x, CPU)"))
    return rows


def main(argv=None) -> dict:
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--backbone", default="resnet18",
                           help="a timm model name, or 'vit' (a small ViT: patch 4, width 96, depth 8)")
    arguments.add_argument("--image-size", type=int, default=32)
    arguments.add_argument("--epochs", type=int, default=8)
    arguments.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    arguments.add_argument("--repeats", type=int, default=15)
    add_data_argument(arguments, default="digits")
    arguments.add_argument("--root", default="runs/bench_early_exit")
    arguments.add_argument("--threads", type=int, default=1,
                           help="torch threads (default 1: steadier ratios on a machine shared with other jobs)")
    args = arguments.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.steps, args.limit_batches = -1, 1.0
    if args.small:
        args.backbone, args.seeds, args.epochs, args.repeats = "resnet10t", [0], 1, 2
        args.steps, args.limit_batches = 6, 6
    per_seed: dict[str, list[dict]] = {"boost": [], "independent": []}
    timing = None
    for seed in args.seeds:
        for mode in ("boost", "independent"):
            module, data, results = train(args, mode, seed)
            per_seed[mode].append(results)
            if mode == "boost" and timing is None:
                timing = time_inference(module, data, args.repeats)
            print(f"seed {seed} {mode}: last exit {results['test/acc']:.4f}", flush=True)
    num_exits = module.num_exits

    def mean(mode: str, key: str) -> float:
        return statistics.mean(r[key] for r in per_seed[mode])

    anytime = {
        mode: {f"exit{i}": mean(mode, f"test/acc_exit{i}") for i in range(num_exits)} for mode in per_seed
    }
    curve = {
        mode: {
            f"budget {round(b * 100)}%": {"acc": mean(mode, f"test/acc_budget_{round(b * 100)}"),
                                          "flops": mean(mode, f"test/flops_budget_{round(b * 100)}")}
            for b in BUDGETS
        }
        for mode in per_seed
    }
    deltas = {
        "last_exit": anytime["boost"][f"exit{num_exits - 1}"] - anytime["independent"][f"exit{num_exits - 1}"],
        "mean_over_budgets": statistics.mean(curve["boost"][k]["acc"] - curve["independent"][k]["acc"] for k in curve["boost"]),
        "min_over_budgets": min(curve["boost"][k]["acc"] - curve["independent"][k]["acc"] for k in curve["boost"]),
    }
    payload = {"backbone": args.backbone, "data": f"{data_name(args.data)} ({args.image_size} px)", "data_spec": args.data,
               "seeds": args.seeds, "epochs": args.epochs, "repeats": args.repeats, "anytime": anytime,
               "budgeted": curve, "boost_minus_independent": deltas, "inference_at_50pct": timing,
               "per_seed": per_seed}
    publish("early_exit", payload, args.out, report)
    return payload


if __name__ == "__main__":
    main()
