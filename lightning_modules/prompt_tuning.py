"""`PromptTunedCLIP`: CoOp prompt tuning of a frozen open_clip model, robust to noisy labels (PTNL).

Both towers of any open_clip CLIP stay frozen (and in eval mode); only the context vectors of the
prompt ``[SOS] ctx_1..ctx_M <class name> . [EOT]`` are trained (`stacktrain.functional.prompt_tuning`).
The module follows PTNL's protocol on the training split of the attached data module: k shots per
class, optionally with PTNL's seeded label noise (each class keeps k samples, some of them images of
other classes), or without labels (zero-shot pseudo-labels,
the k most confident per class); loss cross-entropy or generalized cross-entropy. Before training
it logs the zero-shot accuracy of the model's own hand-written prompts as the baseline.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import Dataset
from stacktrain.functional.flops import flop_counter
from torchmetrics.classification import MulticlassAccuracy

from stacktrain.errors import StackError, require_choice, require_number
from stacktrain.functional.clip import (
    check_image_shape,
    clip_logits,
    clip_tokenizer,
    create_clip_model,
    encode_images,
    zero_shot_weights,
)
from stacktrain.functional.prompt_tuning import (
    apply_prompt_tuning,
    generalized_cross_entropy,
    noisy_few_shot,
    sample_few_shot,
    symmetric_label_noise,
    top_confident_per_class,
)
from stacktrain.lightning_modules.clip_pretrain import resolve_pretrained
from stacktrain.optim import configure_optimization
from stacktrain.stack import FLOPS_PER_STEP, EfficiencySink, ModuleTechnique, TrainingSamples, gather_per_rank

__all__ = ["PromptTunedCLIP", "FewShotView", "CachedFeatures", "coop_sgd"]

NAME = "prompt_tuning"
_KEY = "model.init_args"


def coop_sgd(params: Any) -> torch.optim.Optimizer:
    """CoOp's optimizer: SGD, learning rate 0.002, momentum 0.9."""
    return torch.optim.SGD(params, lr=0.002, momentum=0.9)


class FewShotView(Dataset):
    """The training samples ``indices`` of ``base`` with the labels ``labels`` (few-shot, noisy or
    pseudo-labels); items are ``(image, label)`` as in ``base``."""

    def __init__(self, base: Dataset, indices: torch.Tensor, labels: torch.Tensor) -> None:
        self.base = base
        self.indices = indices.tolist()
        self.labels = labels.clone()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base[self.indices[item]][0], self.labels[item]


class CachedFeatures(FewShotView):
    """A `FewShotView` whose items are the frozen visual tower's (normalized) features instead of
    the images, computed once: each training step then runs only the text tower."""

    def __init__(self, base: Dataset, indices: torch.Tensor, labels: torch.Tensor, features: torch.Tensor) -> None:
        super().__init__(base, indices, labels)
        self.features = features

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[item], self.labels[item]


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each back to its own mode after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _is_placeholder(names: Sequence[str]) -> bool:
    """Class names that are only the label indices ("0", "1", ...), as data without names give."""
    return list(names) == [str(i) for i in range(len(names))]


class PromptTunedCLIP(ModuleTechnique):
    """CoOp prompt tuning of a frozen open_clip model on few labelled (possibly noisy) or
    pseudo-labelled images, with a zero-shot baseline.

    Batches are ``(images, labels)`` from any stacktrain image data module with a map-style
    training split (``train_set``) and ``class_names``. In ``setup`` the module picks its training
    samples from that split (k shots per class, label noise, or pseudo-labels) and gives the data
    module a view of just those samples (`FewShotView`), so the usual deterministic, resumable
    loaders serve them. ``self.model`` is the open_clip model (visual tower at
    ``self.model.visual``), frozen and in eval mode, except the visual tower's ``patch_dropout``
    slot, which follows the module's training mode so that token dropout attached to the run
    shortens the frozen tower's sequence during training (it only saves compute there).

    Args:
        model_name: an open_clip model config ("ViT-B-32", or "stacktrain-tiny-clip" offline).
        pretrained: CLIP weights (required): "stacktrain-tiny-clip" (offline: the tiny CLIP pretrained on
            the embedded shapes, pretrained once on first use and cached; `resolve_pretrained`), a
            released tag (e.g. "openai", downloaded by open_clip) or a local weights file (e.g. written
            by `CLIPPretraining`).
        model_kwargs: extra keyword arguments for ``open_clip.create_model`` (``force_image_size``...).
        class_names: names used in the prompts, in label order (default: the data's ``class_names``;
            if given, they must equal the data's names, or name classes the data only numbers).
        n_ctx: number of learned context vectors (CoOp: 16).
        ctx_init: initialise the context from this phrase (e.g. "a photo of a") instead of randomly.
        class_token_position: "end", "middle" or "front".
        class_specific_context: one context per class (needs ``class_names``).
        shots: training samples per class (k); None uses the whole training split.
        label_noise: fraction of each class's shots that are wrong, in [0, 1).
        noise_model: "ptnl" (PTNL's: every class keeps exactly ``shots`` samples, ``round(label_noise *
            shots)`` of them images of other classes; `noisy_few_shot`) or "flip" (each class's shots
            relabelled at random: symmetric noise, which unbalances the classes).
        unsupervised: ignore the labels: label the training split with zero-shot predictions and keep
            the ``shots`` most confident per class (PTNL's unsupervised prompt tuning).
        loss: "ce" (cross-entropy) or "gce" (generalized cross-entropy, robust to label noise).
        gce_q: the q of GCE in (0, 1].
        cache_features: compute the image features of the training samples once (needs training
            data without random augmentation), so each step runs only the text tower.
        zero_shot_templates: hand-written prompts of the zero-shot baseline ("{}" = class name).
        seed: seed of the shot sampling, the label noise and the context initialisation.
        optimizer: optimizer factory (default: CoOp's SGD, lr 0.002, momentum 0.9).
        lr_scheduler: optional scheduler factory (its length comes from the trainer).
        scheduler_interval: step the scheduler every optimizer "step" or every "epoch".
    """

    name = NAME

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: Literal["end", "middle", "front"] = "end",
        class_specific_context: bool = False,
        shots: int | None = 16,
        label_noise: float = 0.0,
        noise_model: Literal["ptnl", "flip"] = "ptnl",
        unsupervised: bool = False,
        loss: Literal["ce", "gce"] = "ce",
        gce_q: float = 0.5,
        cache_features: bool = False,
        zero_shot_templates: list[str] | None = None,
        seed: int = 0,
        optimizer: OptimizerCallable = coop_sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        source = type(self).__name__
        if shots is not None:
            require_number(shots, f"{_KEY}.shots", source=source, low=1, integer=True,
                           fix="use a positive number of shots per class such as 16, or null for all data")
        require_number(label_noise, f"{_KEY}.label_noise", source=source, low=0.0, high=1.0, high_inclusive=False,
                       fix="use a fraction of wrong labels in [0, 1), e.g. 0.25")
        require_choice(loss, f"{_KEY}.loss", ["ce", "gce"], source=source)
        require_choice(noise_model, f"{_KEY}.noise_model", ["ptnl", "flip"], source=source)
        if noise_model == "ptnl" and label_noise > 0 and shots is None:
            raise StackError("needs shots: PTNL's noise keeps exactly `shots` samples per class", source=source,
                             key=f"{_KEY}.noise_model", value=noise_model,
                             fix="set shots (e.g. 16), or noise_model: flip to relabel the whole training split")
        require_number(gce_q, f"{_KEY}.gce_q", source=source, low=0.0, high=1.0, low_inclusive=False)
        if unsupervised and label_noise > 0:
            raise StackError("cannot be combined with unsupervised: true (pseudo-labels replace the labels)",
                             source=source, key=f"{_KEY}.label_noise", value=label_noise,
                             fix="set label_noise: 0 for unsupervised prompt tuning")
        templates = list(zero_shot_templates) if zero_shot_templates else ["a photo of a {}."]
        for template in templates:
            if "{}" not in template:
                raise StackError("has no '{}' where the class name goes", source=source,
                                 key=f"{_KEY}.zero_shot_templates", value=template, fix="write e.g. 'a photo of a {}.'")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.templates = templates
        if not pretrained:
            raise StackError(
                "is needed: prompt tuning adapts a pretrained CLIP", source=source, key=f"{_KEY}.pretrained",
                value=pretrained, fix="pass 'stacktrain-tiny-clip' offline (with model_name stacktrain-tiny-clip: "
                "pretrained once and cached), a released tag such as 'openai' (downloaded by open_clip) or a weights file",
            )
        weights = resolve_pretrained(model_name, pretrained, source=source)
        self.model = create_clip_model(model_name, weights, model_kwargs, source=source)
        self.tokenizer = clip_tokenizer(model_name)
        self.prompt = apply_prompt_tuning(
            self.model, self.tokenizer, class_names, n_ctx=n_ctx, ctx_init=ctx_init,
            class_token_position=class_token_position, class_specific=class_specific_context,
            generator=torch.Generator().manual_seed(seed), source=source, key_prefix=f"{_KEY}.",
        )
        self._freeze_mode()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.register_buffer("zero_shot_text", torch.empty(0), persistent=False)
        self.class_names: list[str] = list(self.prompt.class_names)
        self.selection: dict[str, torch.Tensor] | None = None
        self.zero_shot_accuracy: float | None = None
        self.selection_stats: dict[str, float] = {}
        self.step_costs: dict[str, tuple[float, float, str]] = {}
        #: FLOPs per training step outside the visual tower (the stack contract's
        #: `ModuleTechnique.step_flops_outside_vit`, measured at fit start)
        self.step_flops_outside_vit = 0.0
        self._eval_text: torch.Tensor | None = None
        self._metrics_for(max(2, len(self.class_names)))

    # ------------------------------------------------------------------------------ stacking
    @property
    def conflicts(self) -> dict[str, str]:  # type: ignore[override]
        """Techniques that cannot share a run with this module, and why (the stack contract's
        `ModuleTechnique.conflicts`, checked by `Technique.setup`)."""
        conflicts = {
            "PruneRegrow": "both CLIP towers are frozen: there are no trained channels to prune and regrow "
                           "(only the prompt's context vectors are trained)",
        }
        if self.hparams.cache_features:
            conflicts["TokenDropout"] = (
                "cache_features=True computes the image features once before training, so the visual tower "
                "never runs in a training step and dropping its tokens would change nothing; set "
                "cache_features: false to drop tokens"
            )
        return conflicts

    def _freeze_mode(self) -> None:
        """Frozen towers in eval mode; the visual tower's ``patch_dropout`` slot follows the module."""
        self.model.eval()
        slot = getattr(getattr(self.model, "visual", None), "patch_dropout", None)
        if isinstance(slot, nn.Module):
            slot.train(self.training)

    def train(self, mode: bool = True) -> PromptTunedCLIP:
        super().train(mode)
        self._freeze_mode()
        return self

    def _metrics_for(self, num_classes: int) -> None:
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_zero_shot_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_zero_shot_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    # ------------------------------------------------------------------------------ set-up
    def _resolve_class_names(self, datamodule: Any) -> list[str]:
        source = type(self).__name__
        data_names = list(getattr(datamodule, "class_names", None) or []) if datamodule is not None else []
        given = self.hparams.class_names
        if given:
            if data_names and len(given) != len(data_names):
                raise StackError(
                    f"has {len(given)} names but the data has {len(data_names)} classes ({data_names})",
                    source=source, key=f"{_KEY}.class_names", value=list(given),
                    fix="give one name per class of the data, in label order, or leave class_names unset",
                )
            if data_names and not _is_placeholder(data_names) and list(given) != data_names:
                raise StackError(
                    f"does not match the data's classes {data_names} (same names in the same order are needed, "
                    "or the labels would be permuted)", source=source, key=f"{_KEY}.class_names", value=list(given),
                    fix="leave class_names unset to use the data's names, or list them in the data's order",
                )
            return list(given)
        if not data_names:
            raise StackError(
                "are unknown: neither the model nor the data names the classes", source=source,
                key=f"{_KEY}.class_names", value=None, fix="give model.init_args.class_names, one per label",
            )
        return data_names

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = self._resolve_class_names(datamodule)
        if list(self.prompt.class_names) != [n.replace("_", " ") for n in names]:
            self.prompt.bind_classes(self.model, self.tokenizer, names)
            self.class_names = list(names)
            self._metrics_for(len(names))
        check_image_shape(self.model, getattr(datamodule, "image_shape", None), source=type(self).__name__)
        with _evaluating(self.model):
            self.zero_shot_text = zero_shot_weights(self.model, self.tokenizer, self.prompt.class_names, self.templates)
        if stage == "fit":
            self._select_training_samples(datamodule)

    def _training_pool(self, datamodule: Any) -> Dataset:
        source = type(self).__name__
        pool = getattr(datamodule, "train_set", None) if datamodule is not None else None
        if isinstance(pool, FewShotView):  # a previous fit's view: select again from the whole split
            pool = pool.base
        if (not isinstance(datamodule, TrainingSamples) or pool is None or not hasattr(pool, "__getitem__")
                or not hasattr(pool, "__len__")):
            raise StackError(
                "needs a data module whose training split is a map-style dataset in `train_set` (set up by "
                "its setup()) and that can train on chosen samples (`use_training_samples`)", source=source, key="data", value=type(datamodule).__name__,
                fix="use an image data module such as ShapesDataModule, DigitsDataModule or ImageFolderDataModule",
            )
        return pool

    @torch.no_grad()
    def _encode_pool(self, pool: Dataset, indices: Sequence[int], batch_size: int = 256) -> torch.Tensor:
        """Normalized image features of ``pool[indices]`` through the frozen visual tower (eval mode)."""
        features = []
        device = self.model.logit_scale.device
        with _evaluating(self.model):
            for start in range(0, len(indices), batch_size):
                images = torch.stack([pool[i][0] for i in indices[start : start + batch_size]]).to(device)
                features.append(encode_images(self.model, images).cpu())
        return torch.cat(features) if features else torch.empty(0)

    def _select_training_samples(self, datamodule: Any) -> None:
        source = type(self).__name__
        hp = self.hparams
        pool = self._training_pool(datamodule)
        num_classes = len(self.class_names)
        generator = torch.Generator().manual_seed(int(hp.seed))
        pool_labels = getattr(pool, "labels", None)
        if not isinstance(pool_labels, torch.Tensor):
            pool_labels = torch.tensor([int(pool[i][1]) for i in range(len(pool))])
        pool_labels = pool_labels.long()
        if hp.unsupervised:
            k = hp.shots or len(pool)
            if hp.shots and k * num_classes > len(pool):
                raise StackError(
                    f"is more than the data allows: {k} x {num_classes} classes > {len(pool)} training images",
                    source=source, key=f"{_KEY}.shots", value=hp.shots,
                    fix=f"use at most {len(pool) // num_classes} shots per class, or more data",
                )
            features = self._encode_pool(pool, list(range(len(pool))))
            probs = clip_logits(features, self.zero_shot_text.cpu(), self.model.logit_scale.cpu()).softmax(-1)
            indices, labels = top_confident_per_class(probs, k)
            per_class = torch.bincount(labels, minlength=num_classes)
            if hp.shots and int(per_class.min()) < k:
                short = [self.class_names[c] for c in range(num_classes) if per_class[c] < k]
                rank_zero_warn(f"{source}: zero-shot predicts fewer than {k} training images as {short}; "
                               f"training on {len(indices)} pseudo-labelled images")
            self.selection_stats["pseudo_label_acc"] = float((labels == pool_labels[indices]).float().mean())
        else:
            if hp.shots and hp.label_noise > 0 and hp.get("noise_model", "flip") == "ptnl":
                indices, labels = noisy_few_shot(pool_labels, hp.shots, int(round(hp.label_noise * hp.shots)),
                                                 num_classes, generator, class_names=self.class_names, source=source,
                                                 key=f"{_KEY}.shots")
            else:
                if hp.shots:
                    indices = sample_few_shot(pool_labels, hp.shots, num_classes, generator,
                                              class_names=self.class_names, source=source, key=f"{_KEY}.shots")
                else:
                    indices = torch.arange(len(pool))
                labels = symmetric_label_noise(pool_labels[indices], hp.label_noise, num_classes, generator)
        self.selection_stats["label_noise"] = float((labels != pool_labels[indices]).float().mean())
        self.selection_stats["train_samples"] = float(len(indices))
        self.selection = {"indices": indices, "labels": labels}
        if hp.cache_features:
            if getattr(datamodule, "random_transforms", False):
                raise StackError(
                    "needs training images without random augmentation (features are computed once)",
                    source=source, key=f"{_KEY}.cache_features", value=True,
                    fix="set data.init_args.augment: false, or cache_features: false",
                )
            view: Dataset = CachedFeatures(pool, indices, labels, self._encode_pool(pool, indices.tolist()))
        else:
            view = FewShotView(pool, indices, labels)
        datamodule.use_training_samples(view)

    # ------------------------------------------------------------------------------ baseline and costs
    @torch.no_grad()
    def _zero_shot_baseline(self) -> float | None:
        """Zero-shot accuracy of the hand-written prompts on the validation data, split over ranks."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return None
        loader = datamodule.val_dataloader()
        if not loader:
            return None
        rank, world = self.trainer.global_rank, self.trainer.world_size
        counts = torch.zeros(2, device=self.device)
        with _evaluating(self.model):
            for index, (images, labels) in enumerate(loader):
                if index % world != rank:
                    continue
                features = encode_images(self.model, images.to(self.device))
                predicted = clip_logits(features, self.zero_shot_text, self.model.logit_scale).argmax(-1)
                counts += torch.stack([(predicted.cpu() == labels).sum(), torch.tensor(len(labels))]).to(counts)
        counts = sum(gather_per_rank(counts.cpu()))
        return float(counts[0] / counts[1]) if counts[1] > 0 else None

    def _measure_step_costs(self) -> None:
        """FLOPs of one training step, counted with torch's flop counter on zero inputs (no RNG drawn,
        no gradient left on the parameters), against fine-tuning both towers (3x their forward FLOPs)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        batch = int(getattr(datamodule, "batch_size", 32) or 32)
        shape = getattr(datamodule, "image_shape", None) or (3, *self.model.visual.image_size)
        image = torch.zeros(1, *shape, device=self.device)
        with _evaluating(self.model), torch.random.fork_rng(devices=[]):
            with torch.no_grad(), flop_counter() as visual_counter:
                features = encode_images(self.model, image)
            with torch.no_grad(), flop_counter() as text_counter:
                self.model.encode_text(self.prompt.tokenized_prompts)
            # a detached copy of the context: no gradient hook of the parameter (DDP, other techniques) fires
            ctx = self.prompt.ctx.detach().clone().requires_grad_(True)
            with flop_counter() as step_counter:
                text = self.prompt.encode(self.model, ctx=ctx)
                logits = clip_logits(features.expand(batch, -1), text, self.model.logit_scale)
                self._loss(logits, torch.zeros(batch, dtype=torch.long, device=self.device)).backward()
        visual = visual_counter.get_total_flops() * batch
        actual = step_counter.get_total_flops() + (0 if self.hparams.cache_features else visual)
        # what a step spends besides the visual tower (text tower forward and backward, logits, loss):
        # TokenDropout, shortening the visual tower's sequence, reports its ratio over the whole step
        self.step_flops_outside_vit = float(step_counter.get_total_flops())
        baseline = 3 * (visual + text_counter.get_total_flops())
        total = sum(p.numel() for p in self.model.parameters()) + self.prompt.ctx.numel()
        self.step_costs = {
            FLOPS_PER_STEP: (float(baseline), float(actual), "FLOP"),
            "trainable parameters": (float(total), float(self.prompt.ctx.numel()), ""),
        }

    def on_fit_start(self) -> None:
        if self.zero_shot_accuracy is None:
            self.zero_shot_accuracy = self._zero_shot_baseline()
        if self.zero_shot_accuracy is not None:
            rank_zero_info(f"{type(self).__name__}: zero-shot accuracy (the baseline) = {self.zero_shot_accuracy:.4f}")
        metrics = {f"{NAME}/{k}": v for k, v in self.selection_stats.items()}
        if self.zero_shot_accuracy is not None:
            metrics[f"{NAME}/zero_shot_acc"] = self.zero_shot_accuracy
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.trainer.global_step)
        if any(isinstance(c, EfficiencySink) for c in self.trainer.callbacks):
            self._measure_step_costs()

    # ------------------------------------------------------------------------------ steps
    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "gce":
            return generalized_cross_entropy(logits, labels, self.hparams.gce_q)
        return F.cross_entropy(logits, labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of ``images`` against the learned prompts."""
        with torch.no_grad():
            features = encode_images(self.model, images)
        return clip_logits(features, self.prompt.encode(self.model), self.model.logit_scale)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        if self.hparams.cache_features:
            features = inputs
        else:
            with torch.no_grad():
                features = encode_images(self.model, inputs)
        logits = clip_logits(features, self.prompt.encode(self.model), self.model.logit_scale)
        loss = self._loss(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for quantity, (baseline, actual, unit) in self.step_costs.items():
            self.report_cost(quantity, baseline=baseline, actual=actual, unit=unit)

    def _refresh_eval_text(self) -> None:
        with torch.no_grad():
            self._eval_text = self.prompt.encode(self.model)

    def on_validation_epoch_start(self) -> None:
        self._refresh_eval_text()

    def on_test_epoch_start(self) -> None:
        self._refresh_eval_text()

    def on_predict_epoch_start(self) -> None:
        self._refresh_eval_text()

    def _evaluate(self, batch: Any, prefix: str, tuned: MulticlassAccuracy, zero_shot: MulticlassAccuracy) -> None:
        images, labels = batch
        features = encode_images(self.model, images)
        logits = clip_logits(features, self._eval_text, self.model.logit_scale)
        tuned(logits, labels)
        zero_shot(clip_logits(features, self.zero_shot_text, self.model.logit_scale), labels)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, labels), on_epoch=True, sync_dist=True)
        self.log(f"{prefix}/acc", tuned, on_epoch=True, prog_bar=True)
        self.log(f"{prefix}/zero_shot_acc", zero_shot, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_zero_shot_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_zero_shot_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = clip_logits(encode_images(self.model, images), self._eval_text, self.model.logit_scale).softmax(-1)
        return {"probs": probs, "preds": probs.argmax(dim=-1)}

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.optimizer_factory, self.scheduler_factory, self.scheduler_interval,
                                      params=[self.prompt.ctx])

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen towers out: they come from ``pretrained`` (the checkpoint holds the prompt,
        a few kB, instead of the whole CLIP); record the training samples and the baseline."""
        for key in [k for k in checkpoint["state_dict"] if k.startswith("model.")]:
            del checkpoint["state_dict"][key]
        checkpoint[NAME] = {
            "towers": self._towers_fingerprint(),
            "class_names": list(self.class_names),
            "selection": dict(self.selection) if self.selection is not None else None,
            "zero_shot_accuracy": self.zero_shot_accuracy,
        }

    def _towers_fingerprint(self) -> list[float]:
        """Sums of the frozen weights: a resumed prompt must meet the towers it was tuned on."""
        with torch.no_grad():
            return [float(sum(p.double().sum() for p in self.model.parameters())),
                    float(sum(p.double().abs().sum() for p in self.model.parameters()))]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(NAME, {})
        # sums taken on another device (or thread count) may differ in the last bits: compare with a tolerance
        if "towers" in state and not all(
            math.isclose(saved, now, rel_tol=1e-9, abs_tol=1e-6)
            for saved, now in zip(state["towers"], self._towers_fingerprint())
        ):
            raise StackError(
                "holds weights other than those the checkpoint's prompt was tuned on", source=type(self).__name__,
                key=f"{_KEY}.pretrained", value=self.hparams.pretrained,
                fix="resume with the pretrained weights (and model_name) of the checkpoint's run",
            )
        # the frozen towers come from `pretrained`, as when the checkpoint was saved
        own = {k: v for k, v in self.state_dict().items() if k.startswith("model.")}
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k not in checkpoint["state_dict"]})
        names = state.get("class_names")
        if names and not self.prompt.class_names:
            self.prompt.bind_classes(self.model, self.tokenizer, names)
            self.class_names = list(names)
            self._metrics_for(len(names))
        selection = state.get("selection")
        if selection is not None and self.selection is not None:
            same = all(torch.equal(selection[k], self.selection[k]) for k in ("indices", "labels"))
            if not same:
                raise StackError(
                    "differs from the training samples of the checkpoint being resumed", source=type(self).__name__,
                    key="few-shot selection", value=f"{len(self.selection['indices'])} samples",
                    fix="resume with the same data, seed, shots, label_noise and unsupervised settings",
                )
        elif selection is not None:
            self.selection = selection
        if state.get("zero_shot_accuracy") is not None:
            self.zero_shot_accuracy = float(state["zero_shot_accuracy"])
        if not math.isfinite(self.zero_shot_accuracy or 0.0):
            self.zero_shot_accuracy = None
