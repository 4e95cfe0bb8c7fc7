"""CHEX prune-and-regrow against dense training and prune-only, same epochs, one process.

Variants (each trained from scratch with the same optimizer, schedule and epochs):
  dense                the full network
  prune_only@R         PruneRegrow(target_flops_ratio=R, regrow_fraction=0): pruned channels never
                       come back; compacted at T_max
  chex@R               PruneRegrow(target_flops_ratio=R): prune and regrow until T_max; compacted
  chex@R_masked        the same without compaction (masks to the end): the training-time reference
for R in 0.5 and 0.25. Accuracy is the mean over ``--seeds`` seeds (the masked CHEX run, which
trains like the compacted one, on the first seed only).

Measured: final validation accuracy; forward FLOPs of the final network with the shared flop counter
(relative to dense; a masked network keeps its dense shape, its masked FLOPs are ``mask_flops_ratio``,
counted from the masks); whole-training wall and process-CPU time; mean step time after exploration
(compacted vs masked, inside this process); inference time of the compacted vs the dense network
(eval, no grad, batch ``--infer-batch``, the networks timed in turns, in the default contiguous
layout and in channels-last).

    python benchmarks/prune_regrow.py                      # digits (embedded), ResNet-18 at 16 px
    python benchmarks/prune_regrow.py --data cluttered --image-size 32   # the harder embedded task
    python benchmarks/prune_regrow.py --data /data/cifar10 --image-size 32 --epochs 30
    python benchmarks/prune_regrow.py --small              # seconds: a smoke test
"""

from __future__ import annotations

import copy
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
    add_data_argument, classification_data, compare, data_name, interval_text, meets_goal, paired, parser, publish,
    table, task_headroom, verdict,
)
from stacktrain.callbacks import PruneRegrow  # noqa: E402
from stacktrain.functional.flops import forward_flops  # noqa: E402
from stacktrain.lightning_modules import ImageClassifier  # noqa: E402

#: The code this benchmark's figures depend on (`benchmarks.common.provenance`: a change here marks its
#: JSON stale in RESULTS.md; a change to another technique does not).
SCOPE = [
    "benchmarks/prune_regrow.py",
    "benchmarks/common.py",
    "datamodules/",
    "stacktrain/stack.py",
    "callbacks/prune_regrow.py",
    "stacktrain/functional/channel_selection.py",
    "stacktrain/functional/compaction.py",
    "stacktrain/functional/compact_loader.py",
    "stacktrain/functional/flops.py",
    "lightning_modules/classifier.py",
    "stacktrain/models.py",
    "stacktrain/vgg.py",
    "stacktrain/optim.py",
]

TARGETS = (0.5, 0.25)


class StepTimer(Callback):
    """Wall and process-CPU time of every training step (hooks of the techniques included), split at
    the end of exploration: steps after T_max are the ones compaction can speed up."""

    def __init__(self, t_max: int) -> None:
        self.t_max = t_max
        self.after = [0, 0.0, 0.0]  # steps, wall, cpu
        self.fit = [0.0, 0.0]

    def on_fit_start(self, trainer, pl_module):
        self._fit = (time.perf_counter(), time.process_time())

    def on_fit_end(self, trainer, pl_module):
        self.fit = [time.perf_counter() - self._fit[0], time.process_time() - self._fit[1]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = (time.perf_counter(), time.process_time(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        wall, cpu, step = time.perf_counter() - self._start[0], time.process_time() - self._start[1], self._start[2]
        if step > self.t_max:  # the compaction itself happens at the start of step T_max
            self.after[0] += 1
            self.after[1] += wall
            self.after[2] += cpu


def make_data(args: Any, seed: int):
    """``--data``: the embedded tasks keep one training order for every seed (seed 0), as before;
    a local data set (CIFAR-10, an ImageFolder) is RGB and shuffled by the run's seed."""
    local = args.data not in ("digits", "cluttered")
    return classification_data(args.data, batch_size=args.batch_size, image_size=args.image_size,
                               channels=3 if local else 1, seed=seed if local else 0, small=args.small,
                               num_workers=2 if local else 0)


def train(args: Any, seed: int, prune: dict[str, Any] | None) -> dict[str, Any]:
    seed_everything(seed)
    data = make_data(args, seed)
    channels = data.channels
    module = ImageClassifier(
        args.model, num_classes=10, in_chans=channels,
        optimizer=partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.05),
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=args.lr, pct_start=0.15),
    )
    data.setup("fit")
    steps_per_epoch = len(data.train_dataloader())
    if args.limit_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_batches)
    total = steps_per_epoch * args.epochs
    t_max = round(args.explore_until * total)
    timer = StepTimer(t_max)
    callbacks: list[Callback] = [timer]
    explorer = None
    if prune is not None:
        explorer = PruneRegrow(explore_until=args.explore_until, update_every=args.update_every,
                               channel_multiple=args.channel_multiple, **prune)
        callbacks.append(explorer)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                      default_root_dir=args.scratch, num_sanity_val_steps=0,
                      limit_train_batches=args.limit_batches or 1.0, limit_val_batches=args.limit_batches or 1.0)
    trainer.fit(module, data)
    example = torch.zeros(1, channels, args.image_size, args.image_size)
    network = module.model.eval()
    return {
        "acc": float(trainer.callback_metrics["val/acc"]),
        "flops": forward_flops(network, example),
        "fit_wall_s": timer.fit[0], "fit_cpu_s": timer.fit[1],
        "after_steps": timer.after[0],
        "after_step_ms": 1000 * timer.after[1] / max(timer.after[0], 1),
        "after_step_cpu_ms": 1000 * timer.after[2] / max(timer.after[0], 1),
        "compacted": bool(explorer and explorer.compacted),
        "network": network,
        "widths": explorer.history[-1]["widths"] if explorer and explorer.history else None,
        "mask_flops_ratio": explorer.history[-1]["flops_ratio"] if explorer and explorer.history else 1.0,
    }


def inference_ms(networks: dict[str, torch.nn.Module], example: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds of one batch through each network, the networks taking turns."""
    samples: dict[str, list[float]] = {name: [] for name in networks}
    with torch.no_grad():
        for net in networks.values():
            net(example)  # warm-up
        for _ in range(repeats):
            for name, net in networks.items():
                start = time.perf_counter()
                net(example)
                samples[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def report(payload: dict[str, Any]) -> str:
    """The Markdown report of a payload of ``main`` (also a JSON it wrote): the setting and one table
    (accuracy, FLOPs, training and inference time of every variant)."""
    settings = payload["settings"]
    data = (f"CIFAR-10 at {settings['cifar10']}" if settings.get("cifar10")  # JSONs written before --data
            else data_name(settings.get("data", "digits")))
    columns = ["acc_mean", "acc_min", "acc_delta", "flops_ratio", "mask_flops_ratio", "fit_wall_s", "fit_cpu_s",
               "after_step_ms", "after_step_ratio_vs_masked", "infer_ms", "infer_ratio", "infer_cl_ratio"]
    return "\n".join([
        f"{settings['model']} on {data} at {settings['image_size']} px, {settings['epochs']} epochs, "
        f"{settings['seeds']} seed(s); exploration until {settings['explore_until']} of training. Accuracy: mean "
        "and minimum over seeds (the masked runs: first seed only), acc_delta against dense; flops_ratio: the final "
        "network against dense; after_step: mean step time after exploration; infer: one batch of "
        f"{settings['infer_batch']}, infer_cl_ratio in channels-last.",
        "", table(payload["results"], columns),
    ])


def verdicts(payload: dict[str, Any]) -> list[dict[str, str]]:
    """Issue 18's claims: accuracy at equal FLOPs (paired seeds, on a task with headroom), the compact
    network's inference time and the cost of the whole fit."""
    settings, results = payload["settings"], payload["results"]
    data = "cifar10" if settings.get("cifar10") else settings.get("data", "digits")
    dense = results["dense"]["accs"]
    room = task_headroom(dense, data)
    rows = []
    for ratio, tolerance in ((0.5, 0.005), (0.25, 0.015)):
        chex = results.get(f"chex@{ratio}")
        if chex is None or len(chex["accs"]) != len(dense):
            continue
        stats = paired(dense, chex["accs"])
        rows.append(verdict(f"CHEX at {ratio} FLOPs within {100 * tolerance:g} points of dense",
                            compare(stats, "not_worse", tolerance, room["ok"]), "CHEX - dense: " + interval_text(stats),
                            reason=room["reason"], paper="ResNet-50 ImageNet: 78.0 at 3G, 76.0 at 1G FLOPs"))
        prune = results.get(f"prune_only@{ratio}")
        if prune is not None and len(prune["accs"]) == len(chex["accs"]):
            stats = paired(prune["accs"], chex["accs"])
            uniform = payload.get("prune_only") != "gradual"  # JSONs before issue 18: a uniform thin network
            reason = room["reason"] + ("; this prune_only is a uniform thin network, not the paper's gradual "
                                       "prune-only ablation" if uniform else "")
            rows.append(verdict(f"CHEX beats pruning-only at {ratio} FLOPs", compare(stats, "beats", 0.0, room["ok"]),
                                "CHEX - prune-only: " + interval_text(stats), reason=reason.strip("; "),
                                paper="CHEX ablation: regrowing beats prune-only"))
    half = results.get("chex@0.5")
    if half is not None and "infer_ratio" in half:
        rows.append(verdict("The compact network at 0.5 FLOPs infers in at most 0.6x dense time (channels-last)",
                            meets_goal(half["infer_cl_ratio"], 0.6), f"{half['infer_cl_ratio']:.3f}x (contiguous "
                            f"{half['infer_ratio']:.3f}x), batch {settings['infer_batch']}"))
        fit = half["fit_cpu_s"] / results["dense"]["fit_cpu_s"]
        rows.append(verdict("PruneRegrow's whole fit at 0.5 FLOPs costs at most 1.0x dense CPU time",
                            meets_goal(fit, 1.0), f"{fit:.2f}x ({half['fit_cpu_s']:.0f} s against "
                            f"{results['dense']['fit_cpu_s']:.0f} s)", paper="CHEX: cheaper than dense pretrain + prune"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--model", default="resnet18")
    arguments.add_argument("--epochs", type=int, default=6)
    arguments.add_argument("--seeds", type=int, default=3)
    arguments.add_argument("--image-size", type=int, default=16)
    arguments.add_argument("--batch-size", type=int, default=64)
    arguments.add_argument("--lr", type=float, default=3e-3)
    arguments.add_argument("--explore-until", type=float, default=0.5)
    arguments.add_argument("--update-every", type=int, default=1, help="epochs between prune/regrow updates")
    arguments.add_argument("--channel-multiple", type=int, default=8,
                           help="round the allocated widths to a multiple of this (PruneRegrow channel_multiple; 1: off)")
    arguments.add_argument("--infer-batch", type=int, default=256)
    arguments.add_argument("--infer-repeats", type=int, default=30)
    add_data_argument(arguments, default="digits")
    arguments.add_argument("--limit-batches", type=int, default=0, help="batches per epoch (0: all)")
    args = arguments.parse_args(argv)
    if args.small:
        args.model, args.epochs, args.seeds, args.limit_batches = "test_resnet", 2, 1, 2
        args.infer_repeats, args.infer_batch = 3, 32
        args.channel_multiple = 1  # test_resnet's layers are 8 to 64 wide: multiples of 8 are too coarse
    args.scratch = tempfile.mkdtemp(prefix="stacktrain-prune-")
    variants: dict[str, dict[str, Any] | None] = {"dense": None}
    for ratio in TARGETS:
        variants[f"prune_only@{ratio}"] = dict(target_flops_ratio=ratio, regrow_fraction=0.0, compact_after_explore=True)
        variants[f"chex@{ratio}"] = dict(target_flops_ratio=ratio, compact_after_explore=True)
        variants[f"chex@{ratio}_masked"] = dict(target_flops_ratio=ratio, compact_after_explore=False)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for seed in range(args.seeds):
        for name, prune in variants.items():
            if name.endswith("_masked") and seed > 0:
                continue
            run = train(args, seed, prune)
            print(f"seed {seed} {name}: val/acc {run['acc']:.4f}, FLOPs {run['flops'] / 1e6:.2f}M, "
                  f"fit {run['fit_wall_s']:.1f}s wall / {run['fit_cpu_s']:.1f}s CPU", flush=True)
            runs[name].append(run)
    dense_flops = runs["dense"][0]["flops"]
    channels = 1 if args.data in ("digits", "cluttered") else 3
    example = torch.randn(args.infer_batch, channels, args.image_size, args.image_size)
    networks = {"dense": runs["dense"][0]["network"]}
    networks.update({f"chex@{r}": runs[f"chex@{r}"][0]["network"] for r in TARGETS})
    networks.update({f"prune_only@{r}": runs[f"prune_only@{r}"][0]["network"] for r in TARGETS})
    infer = inference_ms(networks, example, args.infer_repeats)
    # channels-last is oneDNN's preferred CPU layout; narrow layers gain more from it than wide ones
    channels_last = {name: copy.deepcopy(net).to(memory_format=torch.channels_last) for name, net in networks.items()}
    infer_cl = inference_ms(channels_last, example.to(memory_format=torch.channels_last), args.infer_repeats)
    results: dict[str, dict[str, Any]] = {}
    for name, seeds in runs.items():
        accs = [r["acc"] for r in seeds]
        first = seeds[0]
        row = {
            "acc_mean": statistics.mean(accs), "acc_min": min(accs), "accs": accs, "seeds": len(accs),
            "flops_ratio": first["flops"] / dense_flops,
            "mask_flops_ratio": first["mask_flops_ratio"],
            "fit_wall_s": statistics.median(r["fit_wall_s"] for r in seeds),
            "fit_cpu_s": statistics.median(r["fit_cpu_s"] for r in seeds),
            "after_step_ms": first["after_step_ms"], "after_step_cpu_ms": first["after_step_cpu_ms"],
            "widths": first["widths"],
        }
        if name in infer:
            row["infer_ms"] = infer[name]
            row["infer_ratio"] = infer[name] / infer["dense"]
            row["infer_cl_ms"] = infer_cl[name]
            row["infer_cl_ratio"] = infer_cl[name] / infer_cl["dense"]
        results[name] = row
    results["dense"]["acc_delta"] = 0.0
    for name, row in results.items():
        row["acc_delta"] = row["acc_mean"] - results["dense"]["acc_mean"]
    for ratio in TARGETS:
        compact, masked = results[f"chex@{ratio}"], results[f"chex@{ratio}_masked"]
        compact["after_step_ratio_vs_masked"] = compact["after_step_ms"] / masked["after_step_ms"]
        compact["after_step_cpu_ratio_vs_masked"] = compact["after_step_cpu_ms"] / masked["after_step_cpu_ms"]
        compact["fit_wall_ratio_vs_masked"] = compact["fit_wall_s"] / masked["fit_wall_s"]
    settings = {k: v for k, v in vars(args).items() if k not in ("scratch", "out")}
    payload = {"settings": settings, "results": results}
    publish("prune_regrow", payload, args.out, report)
    return results


if __name__ == "__main__":
    main()
