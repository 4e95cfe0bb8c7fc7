"""Self-supervised objectives and their parts: SimCLR's NT-Xent, MoCo v3's InfoNCE, DINO's
self-distillation loss, projection heads, EMA updates and the weighted k-NN classifier used to
evaluate frozen features. Plain torch, no Lightning.

Distributed training passes the other ranks' embeddings in (``*_all``, ``offset`` = this rank's first
row), so the losses themselves never talk to other processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "nt_xent_loss",
    "moco_contrastive_loss",
    "dino_loss",
    "koleo_loss",
    "cosine_momentum",
    "ema_update",
    "bn_mlp",
    "DINOHead",
    "knn_predict",
]


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.2,
    z1_all: torch.Tensor | None = None,
    z2_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy over two views ``[B, d]``.

    Each embedding's positive is the other view of its sample; every other embedding of both views
    (of all ranks when ``z1_all``/``z2_all`` ``[N, d]`` are given, this rank's rows starting at
    ``offset``) is a negative. Mean over the ``2B`` anchors.
    """
    batch = z1.shape[0]
    anchors = F.normalize(torch.cat((z1, z2)), dim=1)
    if z1_all is None or z2_all is None:
        z1_all, z2_all, offset = z1, z2, 0
    total = z1_all.shape[0]
    candidates = F.normalize(torch.cat((z1_all, z2_all)), dim=1)
    logits = anchors @ candidates.T / temperature
    rows = torch.arange(batch, device=z1.device)
    own = torch.cat((offset + rows, total + offset + rows))
    positive = torch.cat((total + offset + rows, offset + rows))
    # the fill takes the logits' dtype: bfloat16 under autocast (bf16-mixed), float32 otherwise
    fill = torch.tensor(-math.inf, device=z1.device, dtype=logits.dtype)
    logits = logits.index_put((torch.arange(2 * batch, device=z1.device), own), fill)
    return F.cross_entropy(logits, positive)


def moco_contrastive_loss(
    q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, k_all: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """MoCo v3's InfoNCE: queries ``[B, d]`` against keys (of all ranks when ``k_all`` ``[N, d]`` is given),
    positives on the diagonal, scaled by ``2 * temperature`` as in the reference code."""
    q = F.normalize(q, dim=1)
    keys = F.normalize(k_all if k_all is not None else k, dim=1)
    logits = q @ keys.T / temperature
    labels = offset + torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def dino_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> torch.Tensor:
    """DINO: cross entropy between the teacher's centred, sharpened distribution on each global view and
    the student's on every *other* view (globals and local crops), averaged over the pairs.

    ``student`` holds one ``[B, K]`` output per view (global views first), ``teacher`` one per global view.
    """
    targets = [F.softmax((t - center) / teacher_temperature, dim=-1).detach() for t in teacher]
    log_probs = [F.log_softmax(s / student_temperature, dim=-1) for s in student]
    total, pairs = torch.zeros((), device=center.device), 0
    for i, target in enumerate(targets):
        for j, log_prob in enumerate(log_probs):
            if i == j:
                continue
            total = total + torch.sum(-target * log_prob, dim=-1).mean()
            pairs += 1
    return total / pairs


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser (``KoLeoLoss`` in facebookresearch/dinov2, Sablayrolles et al. 2019):
    minus the mean log distance of each L2-normalised feature ``[B, d]`` to its nearest other feature
    in the batch. Minimising it spreads the features over the sphere: a direct push against features
    that are the same for every image (a randomly initialised ViT's class token)."""
    features = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = features @ features.T
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    distances = (features - features[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """EMA momentum rising from ``base`` to 1 along a half cosine (BYOL, MoCo v3, DINO)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter (in place)."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def bn_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """The BN-MLP projector of SimCLR / MoCo v3: ``layers`` linear layers, BatchNorm + ReLU between them,
    optionally a BatchNorm without affine parameters at the end (MoCo v3's projector)."""
    modules: list[nn.Module] = []
    for index in range(layers):
        first = in_dim if index == 0 else hidden_dim
        last = index == layers - 1
        modules.append(nn.Linear(first, out_dim if last else hidden_dim, bias=False))
        if not last:
            modules += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


class DINOHead(nn.Module):
    """DINO's projection head: an MLP to a bottleneck, L2 normalisation, and a weight-normalised linear
    layer to ``out_dim`` prototypes whose norm is fixed (``norm_last_layer``), as in the reference code.
    ``batchnorm`` puts a BatchNorm after each hidden layer (the reference's ``use_bn``): a small ViT at
    initialisation gives nearly the same feature for every image, the centred teacher is then uniform
    from the first steps and DINO collapses; BatchNorm removes that common part."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 layers: int = 3, batchnorm: bool = False) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for index in range(layers):
            first = in_dim if index == 0 else hidden_dim
            last = index == layers - 1
            modules.append(nn.Linear(first, bottleneck_dim if last else hidden_dim))
            if not last:
                modules += [nn.BatchNorm1d(hidden_dim), nn.GELU()] if batchnorm else [nn.GELU()]
        self.mlp = nn.Sequential(*modules)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Weighted k-NN class scores ``[Q, num_classes]`` (Wu et al. 2018, used by DINO and MoCo): the ``k``
    most cosine-similar bank features vote for their label with weight ``exp(similarity / temperature)``.
    ``exclude_self``: the bank is the queries themselves; a query does not vote for itself."""
    queries = F.normalize(queries, dim=1)
    bank = F.normalize(bank, dim=1)
    similarity = queries @ bank.T
    if exclude_self:
        similarity.fill_diagonal_(-2.0)
    k = min(k, bank.shape[0])
    top_similarity, top_index = similarity.topk(k, dim=1)
    weights = (top_similarity / temperature).exp()
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device, dtype=weights.dtype)
    votes.scatter_add_(1, bank_labels[top_index], weights)
    return votes
