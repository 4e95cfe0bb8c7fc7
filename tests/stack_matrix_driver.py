"""The stacking matrix's DDP half: every pair of techniques that can share a model, trained together for
a few steps on 2 CPU processes, one ``Trainer.fit`` after the other in the same two processes.

Launched once by tests/test_stack_matrix.py::

    python -m torch.distributed.run --nnodes 1 --nproc-per-node 2 ... tests/stack_matrix_driver.py \
        --out <dir> --clip <micro CLIP weights file>

Importing torch, Lightning, timm and open_clip costs seconds per process; paying it once for all the
pairs (rather than once per pair) is what keeps the matrix cheap. Several DDP fits in one process group
work in Lightning: the first fit initialises the (gloo) process group, later fits find it initialised
and reuse it (``_init_dist_connection`` returns early), and no fit destroys it (only an ``atexit`` for
NCCL does). Each fit wraps its model in a new ``DistributedDataParallel``.

Each rank writes ``rank<k>.json``: per run, its status (``ok``/``error`` with the traceback), the
global step, SHA-256 digests of the weights (per tensor and overall; BatchNorm running statistics are
per rank between DDP's buffer broadcasts, so they are digested apart), of the techniques' states, the
efficiency report's ratios, and what the run's probes saw (e.g. the token count at each exit head).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TINY_VIT, make_trainer  # noqa: E402
from ddp_harness import drive, technique_states  # noqa: E402
from stacktrain.callbacks import EfficiencyReport, GradientQuantization, PruneRegrow, TokenDropout  # noqa: E402
from stacktrain.datamodules import DigitsDataModule, ShapesDataModule  # noqa: E402
from stacktrain.lightning_modules import BoostedEarlyExit, ImageClassifier, PromptTunedCLIP  # noqa: E402
from stacktrain.stack import techniques_of  # noqa: E402

STEPS = 3
#: BatchNorm running statistics: per rank between DDP's buffer broadcasts (as in any DDP run).
STATS = ("running_mean", "running_var", "num_batches_tracked")
#: TokenDropout draws its masks per rank by design (from (seed, rank, step)): its generator differs.
PER_RANK_STATE = {("TokenDropout", "generator")}


# ------------------------------------------------------------------------------------------ digests
def _update(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            hasher.update(f"<{key}>".encode())
            _update(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"[{len(value)}".encode())
        for item in value:
            _update(hasher, item)
    else:
        hasher.update(repr(value).encode())


def digest(value: Any) -> str:
    hasher = hashlib.sha256()
    _update(hasher, value)
    return hasher.hexdigest()


def state_digests(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    state = pl_module.state_dict()
    weights = {k: v for k, v in state.items() if not k.endswith(STATS)}
    stats = {k: v for k, v in state.items() if k.endswith(STATS)}
    techniques = technique_states(trainer)
    shared = {
        name: {k: v for k, v in tech.items() if (name, k) not in PER_RANK_STATE} for name, tech in techniques.items()
    }
    return {
        "weights": digest(weights),
        "tensors": {k: digest(v)[:16] for k, v in weights.items()},
        "bn_stats": digest(stats),
        "techniques": digest(shared),
        "technique_parts": {name: {k: digest(v)[:16] for k, v in tech.items()} for name, tech in shared.items()},
        # everything, for comparing two runs on the same rank (the list-order check)
        "everything": digest({"state": state, "techniques": techniques}),
    }


# ------------------------------------------------------------------------------------------ probes
class Record(Callback):
    """Counts training batches; at the end of fit, digests the state and reads the efficiency report."""

    def __init__(self, report: EfficiencyReport) -> None:
        self.report = report
        self.batches = 0
        self.result: dict[str, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.result = {
            "global_step": trainer.global_step,
            "batches": self.batches,
            "stack": [type(t).__name__ for t in techniques_of(trainer)],  # the order they ran in
            "report": {f"{line.technique} | {line.quantity}": line.ratio for line in self.report.rows()},
            **state_digests(trainer, pl_module),
        }


class ExitTokenCounts(Callback):
    """Sequence lengths reaching each exit head of a ViT `BoostedEarlyExit`, in training and in evaluation."""

    def __init__(self) -> None:
        self.lengths: dict[str, list[int]] = {"train": [], "eval": []}
        self.handles: list[Any] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for head in pl_module.network.heads:
            self.handles.append(head.register_forward_pre_hook(self._seen))

    def _seen(self, module, args) -> None:
        self.lengths["train" if module.training else "eval"].append(int(args[0].shape[1]))

    def on_fit_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------------------------------ the runs
def digits() -> DigitsDataModule:
    return DigitsDataModule(image_size=16, channels=1, batch_size=16)


def shapes() -> ShapesDataModule:
    return ShapesDataModule(train_size=120, val_size=40, test_size=40, batch_size=8)


def vit_classifier() -> ImageClassifier:
    return ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=TINY_VIT)


def cnn_classifier() -> ImageClassifier:
    return ImageClassifier("test_resnet", in_chans=1)


def vit_early_exit() -> BoostedEarlyExit:
    return BoostedEarlyExit("vit_tiny_patch16_224", in_chans=1, backbone_kwargs=TINY_VIT, budgets=[0.6, 1.0],
                            predict_budget=0.6)


def cnn_early_exit() -> BoostedEarlyExit:
    return BoostedEarlyExit("test_resnet", exits=["layer1", "layer2", "layer3", "layer4"], in_chans=1,
                            head_hidden=16, budgets=[0.6, 1.0], predict_budget=0.6)


def prompt_tuned(clip: str, **kwargs: Any) -> PromptTunedCLIP:
    return PromptTunedCLIP("stacktrain-micro-clip", pretrained=clip, n_ctx=4, shots=4, **kwargs)


def token_dropout() -> TokenDropout:
    return TokenDropout(keep_ratio=0.5)


def grad_quant(**kwargs: Any) -> GradientQuantization:
    return GradientQuantization(**{"bits": 4, "targets": "both", "communication_bits": 4, **kwargs})


def prune_regrow() -> PruneRegrow:
    # prune and regrow at steps 0 and 1, then remove the pruned channels (DDP re-wrapped) for the last step
    return PruneRegrow(target_flops_ratio=0.5, update_every=1, update_unit="step", explore_until=0.5,
                       compact_after_explore=True)


#: run name -> (model, data, techniques in the user's list order, probes); names are "A+B" pairs.
RUNS: dict[str, Callable[[str], tuple[LightningModule, Any, list[Callback], list[Callback]]]] = {
    "TD+GQ": lambda clip: (vit_classifier(), digits(), [token_dropout(), grad_quant()], []),
    "TD+EE": lambda clip: (vit_early_exit(), digits(), [TokenDropout(keep_ratio=0.5, patch_scale=2)],
                           [ExitTokenCounts()]),
    "TD+PT": lambda clip: (prompt_tuned(clip), shapes(), [token_dropout()], []),
    "PR+GQ": lambda clip: (cnn_classifier(), digits(), [prune_regrow(), grad_quant(compensation="hypernet")], []),
    # the same run with the techniques listed the other way round (DESIGN.md contract 7)
    "PR+GQ reversed": lambda clip: (cnn_classifier(), digits(),
                                    [grad_quant(compensation="hypernet"), prune_regrow()], []),
    "PR+EE": lambda clip: (cnn_early_exit(), digits(), [prune_regrow()], []),
    "GQ+EE": lambda clip: (cnn_early_exit(), digits(), [grad_quant(compensation="error_feedback")], []),
    "GQ+PT": lambda clip: (prompt_tuned(clip), shapes(), [grad_quant()], []),
}


def run(name: str, clip: str, workdir: Path) -> dict[str, Any]:
    seed_everything(0, verbose=False)
    model, data, techniques, probes = RUNS[name](clip)
    report = EfficiencyReport(dirpath=str(workdir / name.replace(" ", "_").replace("+", "_")))
    record = Record(report)
    trainer = make_trainer(workdir, [*techniques, report, record, *probes], processes=2, max_steps=STEPS,
                           val_check_interval=STEPS, check_val_every_n_epoch=None, limit_val_batches=1,
                           num_sanity_val_steps=0)
    trainer.fit(model, data)
    result = dict(record.result)
    result["order"] = [type(t).__name__ for t in techniques]
    for probe in probes:
        if isinstance(probe, ExitTokenCounts):
            result["exit_tokens"] = probe.lengths
    return result


if __name__ == "__main__":
    drive(__doc__, list(RUNS), run)
