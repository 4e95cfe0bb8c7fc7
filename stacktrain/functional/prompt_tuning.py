"""CoOp prompt learning on open_clip text towers, and the pieces of PTNL's noisy-label protocol.

No Lightning here:

* `text_tower` finds the parts of an open_clip text tower (``CLIP`` or ``CustomTextCLIP`` with
  open_clip's own ``TextTransformer``) and rejects towers the prompt cannot be spliced into;
* `encode_text_embeddings` runs that tower from token *embeddings* instead of token ids, exactly as
  ``model.encode_text`` does (batch-first transformer, ``attn_mask``, pooling at the EOT token,
  ``text_projection``), so learned vectors can replace word embeddings;
* `apply_prompt_tuning` freezes a CLIP model and returns the `PromptLearner` to train in its place;
* `PromptLearner` holds CoOp's learnable context: ``[SOS] [V]_1 ... [V]_M [CLASS] . [EOT]`` with the
  class token at the end, middle or front, one context shared by all classes or one per class,
  randomly initialised or from a phrase such as "a photo of a";
* `generalized_cross_entropy` is the robust loss of PTNL (Zhang & Sabuncu's GCE);
* `sample_few_shot`, `noisy_few_shot` (PTNL's noise: every class keeps exactly k samples, a set number
  of them taken from other classes), `symmetric_label_noise` (label flips) and `top_confident_per_class`
  are the k-shot sampling, the seeded label noise and the zero-shot pseudo-labelling of PTNL's experiments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from stacktrain.errors import StackError

__all__ = [
    "TextTower",
    "text_tower",
    "encode_text_embeddings",
    "PromptLearner",
    "apply_prompt_tuning",
    "generalized_cross_entropy",
    "GeneralizedCrossEntropy",
    "sample_few_shot",
    "symmetric_label_noise",
    "noisy_few_shot",
    "top_confident_per_class",
]

ClassTokenPosition = Literal["end", "middle", "front"]
_POOL_TYPES = ("argmax", "eos", "first", "last")


@dataclass(frozen=True)
class TextTower:
    """The parts of an open_clip text tower that encoding from embeddings needs."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])


def text_tower(model: nn.Module, *, source: str = "PromptLearner", key: str = "model_name") -> TextTower:
    """The text tower of an open_clip ``CLIP`` (parts on the model) or ``CustomTextCLIP`` (parts on
    ``model.text``). Raises `StackError` for towers whose input is not a sequence of token
    embeddings that a prompt can be spliced into (Hugging Face text towers, CoCa's class token)."""
    host = model.text if isinstance(getattr(model, "text", None), nn.Module) else model
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    missing = [name for name in needed if not hasattr(host, name)]
    if missing:
        raise StackError(
            f"has a text tower without {', '.join(missing)} (e.g. a Hugging Face text model); CoOp prompts "
            "need open_clip's own TextTransformer", source=source, key=key, value=type(host).__name__,
            fix="use an open_clip model with the built-in text transformer (ViT-B-32, RN50, stacktrain-tiny-clip, ...)",
        )
    if getattr(host, "cls_emb", None) is not None or getattr(host, "use_pad_mask", False):
        raise StackError(
            "has a text tower with an appended class token or a padding mask (CoCa style), which prompt "
            "embeddings cannot be fed through", source=source, key=key, value=type(host).__name__,
            fix="use a CLIP model whose text tower pools at the EOT token",
        )
    pool_type = getattr(host, "text_pool_type", None) or getattr(host, "pool_type", "argmax")
    if pool_type not in _POOL_TYPES:
        raise StackError(f"has text pooling {pool_type!r}, not one of {_POOL_TYPES}", source=source, key=key,
                         value=type(host).__name__, fix="use a CLIP model that pools one token of the text")
    return TextTower(
        token_embedding=host.token_embedding,
        positional_embedding=host.positional_embedding,
        transformer=host.transformer,
        ln_final=host.ln_final,
        text_projection=getattr(host, "text_projection", None),
        attn_mask=getattr(host, "attn_mask", None),
        pool_type=pool_type,
        eos_id=getattr(host, "text_eos_id", getattr(host, "eos_id", None)),
    )


def encode_text_embeddings(
    tower: TextTower, embeddings: torch.Tensor, tokens: torch.Tensor, normalize: bool = False
) -> torch.Tensor:
    """Text features from token embeddings ``[N, L, D]``; ``tokens`` ``[N, L]`` are the ids the
    embeddings stand for, used only to find the pooled (EOT) position. With the embeddings of
    ``tokens`` this equals ``model.encode_text(tokens)``."""
    cast_dtype = tower.transformer.get_cast_dtype()
    length = embeddings.shape[1]
    x = embeddings.to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
    x = tower.transformer(x, attn_mask=mask)
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
    if isinstance(tower.text_projection, nn.Linear):
        x = tower.text_projection(x)
    elif tower.text_projection is not None:
        x = x @ tower.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def _pooled_positions(tokens: torch.Tensor, tower: TextTower) -> torch.Tensor:
    if tower.pool_type == "eos":
        return (tokens == tower.eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


class PromptLearner(nn.Module):
    """CoOp's learnable prompt for a frozen open_clip text tower.

    Each class's prompt is ``[SOS] ctx_1 ... ctx_M name . [EOT]`` in embedding space: the context
    vectors (``self.ctx``, the only parameters) are learned; the start token, the class-name tokens,
    the period, EOT and padding are fixed embeddings kept as buffers (``token_prefix``,
    ``token_suffix``; not saved, since the frozen model reproduces them). The model is only read,
    never held.

    The class names can be bound later (`bind_classes`) when a shared context is learned: its
    parameter does not depend on them, so it exists from construction on. Class-specific contexts
    need the names (their number) at construction.

    Args:
        model: an open_clip CLIP model (see `text_tower`).
        tokenizer: the model's tokenizer (``open_clip.get_tokenizer``).
        class_names: one name per class, in label order (or None, to bind later).
        n_ctx: number of context vectors when ``ctx_init`` is not given.
        ctx_init: a phrase whose word embeddings initialise the context ("a photo of a"); its
            token count replaces ``n_ctx``.
        class_token_position: where the class name goes: "end", "middle" or "front".
        class_specific: one context per class (CSC) instead of one shared by all classes.
        generator: random generator for the N(0, 0.02) initialisation (seeded by the caller).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        class_names: Sequence[str] | None = None,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: ClassTokenPosition = "end",
        class_specific: bool = False,
        generator: torch.Generator | None = None,
        *,
        source: str = "PromptLearner",
        key_prefix: str = "",
    ) -> None:
        super().__init__()
        self.source = source
        self.key_prefix = key_prefix
        tower = text_tower(model, source=source, key=f"{key_prefix}model_name")
        if class_token_position not in ("end", "middle", "front"):
            raise StackError("is not one of ['end', 'middle', 'front']", source=source,
                             key=f"{key_prefix}class_token_position", value=class_token_position,
                             fix="use 'end' (CoOp's default), 'middle' or 'front'")
        if class_specific and not class_names:
            raise StackError("needs the class names at construction (one context per class)", source=source,
                             key=f"{key_prefix}class_names", value=class_names,
                             fix="give the class names, or use a shared context (class_specific false)")
        embedding = tower.token_embedding
        device = embedding.weight.device
        num_classes = len(class_names) if class_names else 0
        with torch.no_grad():
            if ctx_init:
                phrase = ctx_init.replace("_", " ")
                init_tokens = tokenizer([phrase]).to(device)
                n_ctx = int(_pooled_positions(init_tokens, tower)[0]) - 1
                if n_ctx < 1:
                    raise StackError("has no tokens", source=source, key=f"{key_prefix}ctx_init", value=ctx_init,
                                     fix="give a phrase such as 'a photo of a', or leave ctx_init empty")
                vectors = embedding(init_tokens)[0, 1 : 1 + n_ctx].float().clone()
                if class_specific:
                    vectors = vectors.unsqueeze(0).repeat(num_classes, 1, 1)
                self.prompt_prefix = phrase
            else:
                if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1:
                    raise StackError("must be a positive integer", source=source, key=f"{key_prefix}n_ctx",
                                     value=n_ctx, fix="use 16 (CoOp's default) or another positive number")
                shape = (num_classes, n_ctx, tower.width) if class_specific else (n_ctx, tower.width)
                vectors = torch.randn(shape, generator=generator) * 0.02
                self.prompt_prefix = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.class_token_position = class_token_position
        self.class_specific = class_specific
        self.ctx = nn.Parameter(vectors.to(device=device, dtype=embedding.weight.dtype))
        self.class_names: list[str] = []
        self.name_lens: list[int] = []
        self.register_buffer("token_prefix", torch.empty(0), persistent=False)
        self.register_buffer("token_suffix", torch.empty(0), persistent=False)
        self.register_buffer("tokenized_prompts", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("order", torch.empty(0, dtype=torch.long), persistent=False)
        if class_names:
            self.bind_classes(model, tokenizer, class_names)

    def bind_classes(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                     class_names: Sequence[str]) -> None:
        """Build the fixed parts of every class's prompt (class-name tokens, period, EOT) from
        ``model``'s token embedding; raises `StackError` if a name does not fit the text context."""
        source, key_prefix = self.source, self.key_prefix
        names = [str(name).replace("_", " ") for name in class_names]
        if self.class_specific and len(names) != self.ctx.shape[0]:
            raise StackError(
                f"has {len(names)} classes but the class-specific context was built for {self.ctx.shape[0]}",
                source=source, key=f"{key_prefix}class_names", value=list(class_names),
                fix="give the same class names the prompt was built with",
            )
        tower = text_tower(model, source=source, key=f"{key_prefix}model_name")
        embedding = tower.token_embedding
        device = embedding.weight.device
        n_ctx = self.n_ctx
        with torch.no_grad():
            tokens = tokenizer([f"{self.prompt_prefix} {name}." for name in names]).to(device)
            name_lens = [int(_pooled_positions(tokenizer([name]), tower)[0]) - 1 for name in names]
            eot = _pooled_positions(tokens, tower).tolist()
            for name, length, position in zip(names, name_lens, eot):
                if position != 1 + n_ctx + length + 1:  # SOS, context, name, ".", then EOT
                    raise StackError(
                        f"leaves no room for the class name {name!r} in the text context of "
                        f"{tower.context_length} tokens", source=source,
                        key=f"{key_prefix}{'ctx_init' if self.ctx_init else 'n_ctx'}",
                        value=self.ctx_init if self.ctx_init else n_ctx,
                        fix=f"use at most {tower.context_length - 3 - max(name_lens)} context tokens, or shorter class names",
                    )
            token_embeddings = embedding(tokens).detach()
        self.class_names = names
        self.name_lens = name_lens
        self.token_prefix = token_embeddings[:, :1].clone()
        self.token_suffix = token_embeddings[:, 1 + n_ctx :].clone()
        self.tokenized_prompts = tokens
        self.order = self._order(name_lens, tokens.shape[1]).to(device)

    def _order(self, name_lens: list[int], length: int) -> torch.Tensor:
        """Per class, the position in ``[prefix, ctx, suffix]`` ("end" layout) of every output
        position of the chosen layout; the EOT and everything after it keep their positions."""
        rows = []
        m = self.n_ctx
        for name_len in name_lens:
            prefix, ctx = [0], list(range(1, 1 + m))
            name = list(range(1 + m, 1 + m + name_len))
            rest = list(range(1 + m + name_len, length))
            if self.class_token_position == "end":
                order = prefix + ctx + name + rest
            elif self.class_token_position == "front":
                order = prefix + name + ctx + rest
            else:
                half = m // 2
                order = prefix + ctx[:half] + name + ctx[half:] + rest
            rows.append(order)
        return torch.tensor(rows, dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """The prompts' token embeddings ``[C, L, D]`` (with ``ctx`` in place of ``self.ctx`` if given)."""
        if not self.class_names:
            raise StackError("has no class names yet", source=self.source, key=f"{self.key_prefix}class_names",
                             value=None, fix="call bind_classes(model, tokenizer, class_names) first")
        ctx = self.ctx if ctx is None else ctx
        ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        prompts = torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)
        if self.class_token_position == "end":
            return prompts
        index = self.order.unsqueeze(-1).expand(-1, -1, prompts.shape[-1])
        return torch.gather(prompts, 1, index)

    def encode(self, model: nn.Module, normalize: bool = True, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """The class text features ``[C, D]`` of the prompts through ``model``'s text tower."""
        return encode_text_embeddings(text_tower(model), self(ctx), self.tokenized_prompts, normalize=normalize)


def apply_prompt_tuning(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str] | None = None,
    **options: Any,
) -> PromptLearner:
    """Freeze ``model`` (an open_clip CLIP: nothing of it trains) and return the `PromptLearner` whose
    context vectors are the only parameters to train; ``options`` are `PromptLearner`'s (``n_ctx``,
    ``ctx_init``, ``class_token_position``, ``class_specific``, ``generator``). Classify with
    ``clip_logits(encode_images(model, x), learner.encode(model), model.logit_scale)``."""
    model.requires_grad_(False)
    return PromptLearner(model, tokenizer, class_names, **options)


def generalized_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, q: float = 0.5, reduction: str = "mean"
) -> torch.Tensor:
    """Generalized cross-entropy (Zhang & Sabuncu, 2018): ``(1 - p_y^q) / q``.

    ``q -> 0`` recovers cross-entropy; ``q = 1`` is the mean absolute error ``1 - p_y``, which is
    robust to label noise but slow to fit; PTNL uses ``q = 0.5``. Gradients are cross-entropy's
    weighted by ``p_y^q``, so confidently-contradicted (likely mislabelled) samples count less."""
    if not 0.0 < q <= 1.0:
        raise StackError("is out of range (0, 1]", source="generalized_cross_entropy", key="q", value=q,
                         fix="use q in (0, 1], e.g. 0.5")
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, targets.long().unsqueeze(1)).squeeze(1)
    loss = (1.0 - torch.exp(q * log_p)) / q
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class GeneralizedCrossEntropy(nn.Module):
    """`generalized_cross_entropy` as a module."""

    def __init__(self, q: float = 0.5) -> None:
        super().__init__()
        generalized_cross_entropy(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), q)  # validates q
        self.q = q

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return generalized_cross_entropy(logits, targets, self.q)


def sample_few_shot(
    labels: torch.Tensor, shots: int, num_classes: int, generator: torch.Generator, *,
    class_names: Sequence[str] | None = None, source: str = "sample_few_shot", key: str = "shots",
) -> torch.Tensor:
    """Indices of ``shots`` samples of every class, drawn without replacement with ``generator``
    (class by class, so the draw of one class does not depend on the others' sizes). Raises
    `StackError` when a class has fewer than ``shots`` samples."""
    chosen = []
    counts = torch.bincount(labels.long(), minlength=num_classes)
    if int(counts.min()) < shots:
        worst = int(counts.argmin())
        name = class_names[worst] if class_names is not None else str(worst)
        raise StackError(
            f"is more than the data allows: class {name!r} has only {int(counts[worst])} training samples",
            source=source, key=key, value=shots, fix=f"use at most {int(counts.min())} shots per class, or more data",
        )
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        order = torch.randperm(len(members), generator=generator)[:shots]
        chosen.append(members[order])
    return torch.cat(chosen)


def symmetric_label_noise(
    labels: torch.Tensor, rate: float, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """Labels with ``round(rate * n_c)`` of the ``n_c`` samples of every class replaced by a
    different class drawn uniformly (symmetric noise, as PTNL's "x% of the shots are wrong")."""
    if not 0.0 <= rate < 1.0:
        raise StackError("is out of range [0, 1)", source="symmetric_label_noise", key="rate", value=rate,
                         fix="use a fraction such as 0.25")
    noisy = labels.clone()
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        wrong = int(round(rate * len(members)))
        if wrong == 0:
            continue
        flip = members[torch.randperm(len(members), generator=generator)[:wrong]]
        offset = torch.randint(1, num_classes, (wrong,), generator=generator)
        noisy[flip] = (c + offset) % num_classes
    return noisy


def noisy_few_shot(
    labels: torch.Tensor, shots: int, num_noisy: int, num_classes: int, generator: torch.Generator, *,
    class_names: Sequence[str] | None = None, source: str = "noisy_few_shot", key: str = "shots",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PTNL's noisy k-shot set (CEWu/PTNL, ``select_top_k_similarity_per_class_with_noisy_label``):
    every class gets exactly ``shots`` samples labelled as it, ``num_noisy`` of which truly belong to
    other classes. Returns ``(indices, noisy_labels)`` with ``shots * num_classes`` entries, class by class.

    As in the reference, each class's samples are split into a clean part (the first
    ``ceil(n_c * (1 - num_noisy / shots))`` of a random order) and a reserve; class c draws its
    ``shots - num_noisy`` correct samples from its clean part and its ``num_noisy`` wrong ones from the
    other classes' reserves, so no image is both a correct and a wrong sample. Unlike flipping labels
    (`symmetric_label_noise`), the classes stay balanced. (The reference draws the wrong ones with
    replacement and orders the split by zero-shot confidence; here they are drawn without replacement
    within a class, from a seeded random order.)"""
    if not 0 <= num_noisy < shots:
        raise StackError(f"must be in [0, {shots}) for {shots} shots per class", source=source, key="num_noisy",
                         value=num_noisy, fix="use a fraction of wrong samples below 1, e.g. 0.25")
    labels = labels.long()
    keep = float(shots - num_noisy) / float(shots)
    clean, reserve = [], []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        split = math.ceil(len(members) * keep) if num_noisy else len(members)
        clean.append(members[:split])
        reserve.append(members[split:])
    for c in range(num_classes):
        short = len(clean[c]) < shots - num_noisy or (
            num_noisy and sum(len(r) for d, r in enumerate(reserve) if d != c) < num_noisy)
        if short:
            name = class_names[c] if class_names is not None else str(c)
            raise StackError(
                f"is more than the data allows: class {name!r} has only {int((labels == c).sum())} training samples "
                f"for {shots - num_noisy} correct ones and a reserve for other classes' wrong ones",
                source=source, key=key, value=shots, fix="use fewer shots per class, or more data")
    indices, noisy = [], []
    for c in range(num_classes):
        right = clean[c][torch.randperm(len(clean[c]), generator=generator)[: shots - num_noisy]]
        others = torch.cat([r for d, r in enumerate(reserve) if d != c]) if num_noisy else right[:0]
        wrong = others[torch.randperm(len(others), generator=generator)[:num_noisy]]
        indices.append(torch.cat([right, wrong]))
        noisy.append(torch.full((shots,), c, dtype=torch.long))
    return torch.cat(indices), torch.cat(noisy)


def top_confident_per_class(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PTNL's unsupervised selection: label every sample with its most probable class and keep, per
    class, the ``k`` samples predicted with the highest probability (fewer if fewer are predicted
    as that class). Returns ``(indices, pseudo_labels)``; ties are broken by sample index."""
    confidence, predicted = probs.max(dim=1)
    indices, labels = [], []
    for c in range(probs.shape[1]):
        members = (predicted == c).nonzero().squeeze(1)
        order = torch.sort(confidence[members], descending=True, stable=True).indices[:k]
        indices.append(members[order])
        labels.append(torch.full((len(order),), c, dtype=torch.long))
    return torch.cat(indices), torch.cat(labels)
