"""`ExactResume`: the random-number-generator states in the checkpoint, so a resumed run draws the
same random numbers (augmentations, dropout) as the run that was never stopped.

Lightning saves the model, the optimizers, the loops and the data-loader position (stacktrain's data
modules use torchdata's ``StatefulDataLoader``), but not the global RNG states of torch, numpy and
Python. Techniques keep their own generators in their own state; this callback covers everything
else that draws from the global generators.

It also gives the training loader its saved position when Lightning would drop it: a run whose length
is counted in batches before the checkpoint is restored (``trainer.estimated_stepping_batches`` with
``max_epochs`` set, as OneCycleLR's ``total_steps`` or a technique's schedule needs) builds the loader
early, and Lightning then never loads the loader state (Lightning-AI/pytorch-lightning#20550): the
resumed run would start again from the epoch's first batch.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from stacktrain.stack import gather_per_rank

__all__ = ["ExactResume", "collect_rng_state", "restore_loader_position", "restore_rng_state"]


def collect_rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and lists only (loads with ``torch.load(weights_only=True)``)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [list(item) if isinstance(item, tuple) else item for item in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_loader_position(trainer: Trainer) -> bool:
    """Load the checkpoint's training-loader states that Lightning left pending (#20550); True if it did.

    Lightning's own order on resume is: load the loader states, then create the loader's iterator. When
    the loader was built before the restore, its iterator exists already (no batch drawn yet): load the
    states and create the iterator again, before the first batch (``on_train_start``). A no-op when
    Lightning has loaded the states itself (it empties the pending list) or when not resuming."""
    fit_loop = trainer.fit_loop
    pending = getattr(fit_loop, "_combined_loader_states_to_load", None)
    if not pending or not fit_loop.restarting or fit_loop._combined_loader is None:
        return False
    fit_loop._load_combined_loader_states()
    if fit_loop._data_fetcher is not None:
        iter(fit_loop._data_fetcher)  # the iterator starts where the loaded states say
    return True


class ExactResume(Callback):
    """Saves the global RNG states with every checkpoint and restores them on resume.

    Under DDP a checkpoint is written by rank 0 only, so the states of every rank are gathered into it
    (``rng_by_rank``); each rank restores its own. A run resumed on another number of processes (or
    from a checkpoint that holds one rank's states) restores rank 0's states, offset by the rank on
    the other ranks: each rank still draws differently, but not what the uninterrupted run drew.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng_by_rank": gather_per_rank(collect_rng_state())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restore_loader_position(trainer)
        # Restore as late as possible, after set-up code that draws random numbers on resume only.
        if self._loaded is None:
            return
        per_rank = self._loaded.get("rng_by_rank") or [self._loaded["rng"]]  # "rng": checkpoints before 2026-11-24
        self._loaded = None
        rank = trainer.global_rank
        if len(per_rank) == trainer.world_size:
            restore_rng_state(per_rank[rank])
            return
        if len(per_rank) > 1:
            rank_zero_warn(f"stacktrain: ExactResume: the checkpoint holds the random-number states of "
                           f"{len(per_rank)} processes and this run has {trainer.world_size}: every rank "
                           f"continues from rank 0's, offset by its rank (not the draws of an uninterrupted run)")
        restore_rng_state(per_rank[0])
        if rank:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,))) + rank)
