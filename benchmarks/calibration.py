"""Calibration of a benchmark task: can it separate methods? (BENCHMARKS.md, sections 1 and 2)

Before any technique is compared on a task, this measures where the task's floor and ceiling are:

  * floors: chance, a raw-pixel k-NN, k-NN on the features of a randomly initialised CNN and ViT
    (the same models as below, untrained; 3 seeds);
  * dense training: the BN VGG-style CNN (timm ``stacktrain_vgg``) at full width and at a quarter
    of it, paired seeds (capacity must matter for pruning to show anything), and a small ViT.

CNN recipe (BENCHMARKS.md, section 2): SGD momentum 0.9, weight decay 5e-4, OneCycle max lr 0.1,
batch 128, 8 epochs. ViT recipe: AdamW lr 1e-3, weight decay 0.05, OneCycle, batch 128, 15 epochs.
k-NN: the project's weighted k-NN (k 20, cosine), training split as the bank, the test split queried.

    python benchmarks/calibration.py [--data cluttered|digits|PATH] [--seeds 0 1 2] [--small]
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    HOLDS, add_data_argument, classification_data, compare, data_name, interval_text, meets_goal, paired, parser,
    publish, table, verdict,
)
from stacktrain.functional.contrastive import knn_predict  # noqa: E402
from stacktrain.lightning_modules import ImageClassifier  # noqa: E402

#: The code this benchmark's figures depend on (`benchmarks.common.provenance`: a change here marks its
#: JSON stale in RESULTS.md; a change to another technique does not).
SCOPE = [
    "benchmarks/calibration.py",
    "benchmarks/common.py",
    "datamodules/",
    "stacktrain/vgg.py",
    "stacktrain/models.py",
    "stacktrain/optim.py",
    "lightning_modules/classifier.py",
    "stacktrain/functional/contrastive.py",
]

#: Done-when bounds of the task (issue 16): what makes a task fit for the benchmarks.
GOALS = {"raw_knn_at_most": 0.6, "random_vit_knn_at_most": 0.6, "dense_cnn_range": (0.85, 0.93),
         "quarter_width_points_below": 2.0}


def vit_kwargs(image_size: int) -> dict[str, Any]:
    """The benchmarks' small ViT: 64 tokens at any image size (patch = size / 8), width 96, depth 6."""
    return dict(img_size=image_size, patch_size=max(1, image_size // 8), embed_dim=96, depth=6, num_heads=4,
                mlp_ratio=2.0)


def model_settings(width: int, image_size: int) -> dict[str, dict[str, Any]]:
    cnn = dict(model_name="stacktrain_vgg", lr=0.1, epochs=8,
               optimizer=lambda lr: functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4))
    return {
        f"cnn_w{width}": dict(cnn, model_kwargs={"width": width}),
        f"cnn_w{max(1, width // 4)}": dict(cnn, model_kwargs={"width": max(1, width // 4)}),
        "vit": dict(model_name="vit_tiny_patch16_224", model_kwargs=vit_kwargs(image_size), lr=1e-3, epochs=15,
                    optimizer=lambda lr: functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.05)),
    }


def build(setting: dict[str, Any], channels: int) -> ImageClassifier:
    scheduler = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=setting["lr"], pct_start=0.15)
    return ImageClassifier(setting["model_name"], num_classes=10, in_chans=channels,
                           model_kwargs=setting["model_kwargs"], optimizer=setting["optimizer"](setting["lr"]),
                           lr_scheduler=scheduler)


def split_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=512)
    images, labels = zip(*[(x, y) for x, y in loader])
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x in images.split(256)])


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor) -> float:
    votes = knn_predict(queries.flatten(1), bank.flatten(1), bank_labels, int(labels.max()) + 1, k=20)
    return float((votes.argmax(1) == labels).float().mean())


def train(setting: dict[str, Any], data, seed: int, epochs: int, limit_batches: int | None) -> dict[str, float]:
    seed_everything(seed)
    model = build(setting, data.channels)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=limit_batches,
                      limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
                      default_root_dir=tempfile.mkdtemp(prefix="stacktrain-calibration-"))
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, data)
    row = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    images, labels = data.test_tensors
    with torch.no_grad():
        model.eval()
        predictions = torch.cat([model(x).argmax(1) for x in images.split(256)])
    row["acc"] = float((predictions == labels).float().mean())
    return row


def floors(data, settings: dict[str, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    train_images, train_labels = data.train_tensors
    test_images, test_labels = data.test_tensors
    result: dict[str, Any] = {"chance": 1.0 / data.num_classes,
                              "raw_knn": knn_accuracy(train_images, train_labels, test_images, test_labels)}
    for name, setting in settings.items():
        if name.startswith("cnn") and name != next(iter(settings)):
            continue  # the full-width CNN stands for the CNN floor
        kind = "cnn" if name.startswith("cnn") else "vit"
        values = []
        for seed in seeds:
            seed_everything(seed)
            model = build(setting, data.channels).model
            values.append(knn_accuracy(features(model, train_images), train_labels,
                                       features(model, test_images), test_labels))
        result[f"random_{kind}_knn"] = values
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments = parser(__doc__.split("\n\n")[0])
    add_data_argument(arguments)
    arguments.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    arguments.add_argument("--width", type=int, default=32, help="full width of the CNN (quarter width beside it)")
    arguments.add_argument("--channels", type=int, default=1, choices=(1, 3))
    arguments.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = arguments.parse_args(argv)
    torch.set_num_threads(args.threads)
    limit_batches = None
    data = classification_data(args.data, batch_size=128, channels=args.channels, small=args.small)
    data.setup("fit")
    data.train_tensors, data.test_tensors = split_tensors(data.train_set), split_tensors(data.test_set)
    image_size = int(data.image_shape[-1]) if data.image_shape else int(data.test_tensors[0].shape[-1])
    settings = model_settings(args.width, image_size)
    if args.small:
        args.seeds, limit_batches = args.seeds[:2], 2
        for setting in settings.values():
            setting["epochs"] = 1
    payload: dict[str, Any] = {"data": args.data, "data_name": data_name(args.data), "seeds": args.seeds,
                               "width": args.width, "channels": args.channels, "image_size": image_size,
                               "train_size": len(data.train_set), "test_size": len(data.test_set),
                               "recipes": {name: {k: v for k, v in s.items() if k != "optimizer"}
                                           for name, s in settings.items()}}
    payload["floors"] = floors(data, settings, args.seeds)
    print(f"floors: {payload['floors']}", flush=True)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for seed in args.seeds:  # models take turns within a seed
        for name, setting in settings.items():
            runs[name].append(train(setting, data, seed, setting["epochs"], limit_batches))
            print(f"seed {seed} {name}: test acc {runs[name][-1]['acc']:.4f} ({runs[name][-1]['cpu_s']:.0f} s CPU)",
                  flush=True)
    payload["runs"] = runs
    publish("calibration", payload, args.out, report)
    return payload


def _accs(payload: dict[str, Any], name: str) -> list[float]:
    return [run["acc"] for run in payload["runs"][name]]


def checks(payload: dict[str, Any]) -> list[dict[str, str]]:
    """The task's fitness as verdict rows: raw-pixel and random-init ViT k-NN low, dense CNN in range,
    the quarter-width CNN below the full width (paired)."""
    full, quarter = list(payload["runs"])[:2]
    floors_ = payload["floors"]
    low, high = GOALS["dense_cnn_range"]
    dense = _accs(payload, full)
    width_gap = paired(_accs(payload, quarter), dense)
    below = GOALS["quarter_width_points_below"]
    vit_floor = statistics.fmean(floors_["random_vit_knn"])
    in_range = HOLDS if low <= statistics.fmean(dense) <= high else "fails"
    name = payload.get("data_name", payload["data"])
    return [
        verdict(f"{name}: raw-pixel k-NN at most {GOALS['raw_knn_at_most']}",
                meets_goal(floors_["raw_knn"], GOALS["raw_knn_at_most"]), f"{floors_['raw_knn']:.3f}"),
        verdict(f"{name}: random-init ViT k-NN at most {GOALS['random_vit_knn_at_most']}",
                meets_goal(floors_["random_vit_knn"], GOALS["random_vit_knn_at_most"]), f"{vit_floor:.3f}"),
        verdict(f"{name}: dense CNN ({full}) between {low} and {high}", in_range,
                f"{statistics.fmean(dense):.3f} (seeds {', '.join(f'{a:.3f}' for a in dense)})"),
        verdict(f"{name}: quarter width ({quarter}) at least {below:g} points below full width",
                compare(width_gap, "beats", tolerance=below / 100), "full - quarter: " + interval_text(width_gap)),
    ]


def verdicts(payload: dict[str, Any]) -> list[dict[str, str]]:
    return checks(payload)


def report(payload: dict[str, Any]) -> str:
    floors_ = payload["floors"]
    rows: dict[str, dict[str, Any]] = {
        "chance": {"test_acc": floors_["chance"]},
        "raw-pixel k-NN": {"test_acc": floors_["raw_knn"]},
    }
    for kind in ("cnn", "vit"):
        values = floors_[f"random_{kind}_knn"]
        rows[f"random-init {kind.upper()} k-NN"] = {"test_acc": statistics.fmean(values),
                                                    "per_seed": " ".join(f"{v:.3f}" for v in values)}
    for name, runs in payload["runs"].items():
        accs = [r["acc"] for r in runs]
        recipe = payload["recipes"][name]
        rows[f"{name} trained ({recipe['epochs']} epochs)"] = {
            "test_acc": statistics.fmean(accs), "per_seed": " ".join(f"{a:.3f}" for a in accs),
            "cpu_s": statistics.fmean(r["cpu_s"] for r in runs)}
    lines = [
        f"Task calibration on {payload.get('data_name', payload['data'])} ({payload['image_size']} px, "
        f"{payload['channels']} channel(s), {payload['train_size']} train / {payload['test_size']} test images), "
        f"seeds {payload['seeds']}; test accuracy, cpu_s per training run.",
        "", table(rows, ["test_acc", "per_seed", "cpu_s"]), "",
        "| check | verdict | figure |", "|---|---|---|",
    ]
    lines += [f"| {row['claim']} | {row['verdict']} | {row['figure']} |" for row in checks(payload)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
