"""`CLIPPretraining`: contrastive image-text pretraining of any open_clip model, offline.

Batches are ``(images, captions)`` (`stacktrain.datamodules.ShapesTextDataModule`, the embedded
procedural set, or `ImageTextWebDataModule` shards). The loss is open_clip's own ``ClipLoss``; under
DDP it gathers the features of all ranks (``local_loss`` + ``gather_with_grad``, as open_clip trains).
At the end of ``fit`` the model's ``state_dict`` is written as a plain open_clip weights file, which
``open_clip.create_model(name, pretrained=path)`` and `PromptTunedCLIP(pretrained=path)` load.

Offline weights by name: ``pretrained="stacktrain-tiny-clip"`` (`STACKTRAIN_PRETRAINED`) names the tiny
CLIP pretrained on the embedded shapes by a fixed recipe. `resolve_pretrained` turns the name into the
cached weights file, pretraining it first (with progress output) when this machine has none yet;
`PromptTunedCLIP` and `CLIPPretraining` call it, so configs need no path. The cache folder is
``$STACKTRAIN_CACHE`` (default ``~/.cache/stacktrain``); files are keyed by the recipe, the model
config and the data version, and never overwritten.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from open_clip.loss import ClipLoss

from stacktrain.errors import StackError
from stacktrain.functional.clip import check_image_shape, clip_tokenizer, create_clip_model
from stacktrain.optim import configure_optimization, weight_decay_groups
from stacktrain.stack import run_dir, unique_path

__all__ = [
    "CLIPPretraining", "pretrain_clip", "MAX_LOGIT_SCALE", "STACKTRAIN_PRETRAINED", "resolve_pretrained",
    "cached_clip", "cache_dir", "cache_key",
]

#: open_clip clamps the learned temperature at 100 (log space: ln 100).
MAX_LOGIT_SCALE = math.log(100.0)


class CLIPPretraining(LightningModule):
    """Trains both towers of an open_clip model with the contrastive (InfoNCE) loss.

    ``self.model`` is the open_clip model (visual tower at ``self.model.visual``), so techniques
    that act on a ViT (token dropout on open_clip's ``VisionTransformer.patch_dropout``) or on
    gradients find it. The temperature is learned and clamped at 100 after every step, as in
    open_clip.

    Args:
        model_name: an open_clip model config name (default: stacktrain's tiny CLIP, 8M
            parameters, 32 px images), e.g. ``"ViT-B-32"``.
        pretrained: weights to start from (a released tag or a local file); None trains from scratch.
        model_kwargs: extra keyword arguments for ``open_clip.create_model``.
        optimizer: optimizer factory (default AdamW).
        lr_scheduler: optional scheduler factory (its length comes from the trainer).
        scheduler_interval: step the scheduler every optimizer "step" or every "epoch".
        export_weights: file name (in the run directory) or path of the open_clip weights written
            at the end of ``fit``; None writes nothing. An existing file is never overwritten
            (a numbered name is used).
    """

    def __init__(
        self,
        model_name: str = "stacktrain-tiny-clip",
        pretrained: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        export_weights: str | None = "open_clip_weights.pt",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        weights = resolve_pretrained(model_name, pretrained, source=type(self).__name__)
        self.model = create_clip_model(model_name, weights, model_kwargs, source=type(self).__name__)
        self.tokenizer = clip_tokenizer(model_name)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.loss = ClipLoss()
        self.exported_weights: str | None = None

    # ------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        self.loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                             rank=trainer.global_rank, world_size=trainer.world_size)
        datamodule = getattr(trainer, "datamodule", None)
        check_image_shape(self.model, getattr(datamodule, "image_shape", None), source=type(self).__name__)

    # ------------------------------------------------------------------------------ steps
    def _features(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(captions)).to(images.device)
        image_features, text_features, _ = self.model(images, tokens)
        return image_features, text_features

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, captions = batch
        image_features, text_features = self._features(images, captions)
        logit_scale = self.model.logit_scale.exp()
        loss = self.loss(image_features, text_features, logit_scale)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/logit_scale", logit_scale.detach(), on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def _evaluate(self, batch: Any, prefix: str) -> None:
        images, captions = batch
        image_features, text_features = self._features(images, captions)
        logits = self.model.logit_scale.exp() * image_features @ text_features.T
        target = torch.arange(len(images), device=images.device)
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        size = len(images)
        self.log(f"{prefix}/loss", loss, on_epoch=True, sync_dist=True, batch_size=size)
        self.log(f"{prefix}/image_to_text_r1", (logits.argmax(1) == target).float().mean(), on_epoch=True,
                 sync_dist=True, batch_size=size, prog_bar=True)
        self.log(f"{prefix}/text_to_image_r1", (logits.argmax(0) == target).float().mean(), on_epoch=True,
                 sync_dist=True, batch_size=size)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.optimizer_factory, self.scheduler_factory, self.scheduler_interval,
                                      params=weight_decay_groups(self.model))

    # ------------------------------------------------------------------------------ export
    def save_open_clip_weights(self, path: str) -> str:
        """Write the open_clip ``state_dict`` to ``path`` (a numbered name if it exists); returns the path."""
        path = unique_path(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, path)
        return path

    def on_fit_end(self) -> None:
        name = self.hparams.export_weights
        if not name or not self.trainer.is_global_zero:
            return
        path = name if os.path.isabs(name) or os.path.dirname(name) else os.path.join(run_dir(self.trainer), name)
        self.exported_weights = self.save_open_clip_weights(path)
        rank_zero_info(
            f"stacktrain: open_clip weights written to {self.exported_weights} "
            f"(load with --model.init_args.pretrained {self.exported_weights})"
        )


class _PrintLoss(Callback):
    """Progress lines every ``every`` steps: step / total, loss, temperature, elapsed and remaining time."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if step % self.every == 0 or step == total:
            loss = float((outputs["loss"] if isinstance(outputs, dict) else outputs).detach())
            scale = float(pl_module.model.logit_scale.exp())
            elapsed = time.perf_counter() - self.start
            left = f", about {elapsed / step * (total - step) / 60:.1f} min left" if 0 < step < total else ""
            print(f"pretrain_clip: step {step}/{total} loss {loss:.4f} logit scale {scale:.1f} "
                  f"({elapsed:.0f} s{left})", flush=True)


def pretrain_clip(
    out_path: str,
    *,
    model_name: str = "stacktrain-tiny-clip",
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    root_dir: str | None = None,
    log_every: int = 0,
) -> str:
    """Pretrain ``model_name`` on the embedded procedural shapes for ``steps`` steps in this process
    (AdamW, linear warm-up then cosine decay) and write its open_clip weights to ``out_path``.

    The offline way to get a CLIP for `PromptTunedCLIP`; tests and benchmarks call it with small
    models and few steps. ``log_every`` > 0 prints the loss every that many steps. An existing
    ``out_path`` is refused. Returns ``out_path``."""
    from functools import partial

    from lightning.pytorch import seed_everything

    from stacktrain.datamodules.shapes import ShapesTextDataModule

    if os.path.exists(out_path):
        raise StackError("already exists", source="pretrain_clip", key="out_path", value=out_path,
                         fix="choose a new path or move the existing file away")
    seed_everything(seed, workers=True, verbose=False)
    module = CLIPPretraining(
        model_name=model_name,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98), eps=1e-6,
                          fused=True),
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=lr, pct_start=warmup_fraction,
                             anneal_strategy="cos", div_factor=25.0, final_div_factor=100.0),
        export_weights=None,
    )
    size = image_size or int(module.model.visual.image_size[0])
    data = ShapesTextDataModule(image_size=size, train_size=steps * batch_size, val_size=0, batch_size=batch_size,
                                seed=seed)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=root_dir or os.path.dirname(os.path.abspath(out_path)),
        callbacks=[_PrintLoss(log_every)] if log_every > 0 else None,
    )
    trainer.fit(module, data)
    torch.save({k: v.detach().cpu() for k, v in module.model.state_dict().items()}, out_path)
    return out_path


# ---------------------------------------------------------------------------------- weights by name
#: Offline CLIP weights stacktrain makes itself, by name: the `pretrain_clip` recipe of each. The tiny
#: CLIP is papers.md's (section 5) trained 2.5x longer than its borderline 600 steps (about 17 min on
#: one CPU thread); the micro CLIP is a seconds-long smoke model for tests and ``--small`` runs.
STACKTRAIN_PRETRAINED: dict[str, dict[str, Any]] = {
    "stacktrain-tiny-clip": dict(model_name="stacktrain-tiny-clip", steps=1500, batch_size=256, lr=2e-3,
                                 weight_decay=0.1, warmup_fraction=0.1, seed=0),
    "stacktrain-micro-clip": dict(model_name="stacktrain-micro-clip", steps=10, batch_size=32, lr=2e-3,
                                  weight_decay=0.1, warmup_fraction=0.1, seed=0),
}


def cache_dir() -> Path:
    """``$STACKTRAIN_CACHE``, default ``~/.cache/stacktrain``."""
    return Path(os.environ.get("STACKTRAIN_CACHE") or Path.home() / ".cache" / "stacktrain")


def cache_key(config: dict[str, Any]) -> str:
    """A hash of the recipe, the open_clip model config and the shapes' data version."""
    import open_clip

    from stacktrain.datamodules.shapes import DATA_VERSION
    from stacktrain.functional.clip import register_model_configs

    register_model_configs()
    payload = {"config": config, "model": open_clip.get_model_config(config["model_name"]), "data": DATA_VERSION}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX ``flock``): one process pretrains, the others wait for it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, the atomic rename still keeps the file whole
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"stacktrain: waiting for another process that is pretraining into {path.parent} ...", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_clip(config: dict[str, Any], *, directory: Path | None = None, log_every: int = 50) -> Path:
    """The weights file of the `pretrain_clip` recipe ``config``, pretrained now (printing progress
    every ``log_every`` steps) if the cache has none. A JSON beside it records the recipe and the
    pretraining time. Concurrent callers (DDP ranks, parallel runs) wait for one pretraining."""
    import torch as _torch

    from stacktrain.datamodules.shapes import DATA_VERSION

    config = dict(config)
    folder = Path(directory) if directory is not None else cache_dir()
    name = f"{config['model_name']}-seed{config['seed']}-{cache_key(config)}"
    path = folder / f"{name}.pt"
    if path.exists():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StackError(f"cannot be created ({error})", source="stacktrain cache", key="STACKTRAIN_CACHE",
                         value=str(folder), fix="point STACKTRAIN_CACHE at a writable folder") from error
    with _locked(folder / f"{name}.lock"):
        if path.exists():  # another process finished it while this one waited
            return path
        partial = folder / f"{name}.partial-{os.getpid()}.pt"
        print(f"stacktrain: {config['model_name']} is not in the cache yet: pretraining it once on the embedded "
              f"shapes ({config['steps']} steps of {config['batch_size']}) -> {path}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            # a fresh context: inside LightningCLI's instantiation of another module (prompt tuning),
            # Lightning's context variable of "given hyperparameters" would otherwise become the
            # pretraining module's hyperparameters
            contextvars.Context().run(pretrain_clip, str(partial), log_every=log_every, **config)
            info = {"config": config, "data_version": DATA_VERSION, "pretrain_wall_s": time.perf_counter() - wall,
                    "pretrain_cpu_s": time.process_time() - cpu, "torch_threads": _torch.get_num_threads()}
            os.replace(partial, path)
        finally:
            if partial.exists():
                partial.unlink()
        (folder / f"{name}.json").write_text(json.dumps(info, indent=2))
        print(f"stacktrain: {path} written after {info['pretrain_wall_s']:.0f} s", flush=True)
    return path


def resolve_pretrained(model_name: str, pretrained: str | None, *, source: str = "model",
                       key_prefix: str = "model.init_args") -> str | None:
    """``pretrained`` as open_clip takes it: a name of `STACKTRAIN_PRETRAINED` becomes its cached weights
    file (pretrained now if missing); anything else (a released tag, a file, None) is returned as is."""
    if not pretrained or pretrained not in STACKTRAIN_PRETRAINED or os.path.isfile(pretrained):
        return pretrained
    config = STACKTRAIN_PRETRAINED[pretrained]
    if model_name != config["model_name"]:
        raise StackError(
            f"are weights of model {config['model_name']!r}, not of {model_name!r}", source=source,
            key=f"{key_prefix}.pretrained", value=pretrained,
            fix=f"set {key_prefix}.model_name: {config['model_name']}, or pass weights made for {model_name}",
        )
    return str(cached_clip(config))
