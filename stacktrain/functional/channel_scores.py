"""Choosing channels inside one layer: column-subset-selection leverage scores (L1 fallback), the
projection residuals that rank regrow candidates, seeded regrow sampling, and `explore_group`, one
prune-then-regrow step of one group. Deterministic given the weights and the ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["css_scores", "l1_scores", "projection_residuals", "sample_regrow", "explore_group",
           "cosine_regrow_fraction", "top_indices"]


def l1_scores(matrix: torch.Tensor) -> torch.Tensor:
    """L1 norm of every column: the cheap criterion."""
    return matrix.abs().sum(dim=0)


def css_scores(matrix: torch.Tensor, keep: int) -> torch.Tensor:
    """Rank-``keep`` leverage scores of the columns of ``matrix`` ((C_in*k*k) x C_out): the squared
    row norms of the top-``keep`` right singular vectors. Column subset selection keeps the columns
    with the largest scores. Falls back to `l1_scores` where leverage cannot rank the columns:
    fewer rows than columns (as in the CHEX code) or nothing to drop.

    The right singular vectors are the eigenvectors of the Gram matrix ``M^T M`` (C_out x C_out),
    computed in float64: the same subspace as the SVD at a fraction of its cost for tall matrices."""
    rows, columns = matrix.shape
    if keep >= columns or rows < columns or columns == 0 or keep <= 0:
        return l1_scores(matrix)
    work = matrix.detach().to(torch.float64)
    try:
        _, vectors = torch.linalg.eigh(work.T @ work)  # ascending eigenvalues
    except RuntimeError:  # LAPACK did not converge
        return l1_scores(matrix)
    return vectors[:, -keep:].pow(2).sum(dim=1).to(matrix.dtype)


def projection_residuals(kept: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Norm of what is left of each candidate column after orthogonal projection onto the span of
    the ``kept`` columns K (projection K (K^T K)^+ K^T, as in the CHEX code): large means the
    candidate adds a direction the kept channels lack."""
    candidates = candidates.detach().to(torch.float64)
    if kept.shape[1] == 0:
        return candidates.norm(dim=0)
    basis = kept.detach().to(torch.float64)
    coefficients = torch.linalg.pinv(basis.T @ basis, hermitian=True) @ (basis.T @ candidates)
    return (candidates - basis @ coefficients).norm(dim=0)


def sample_regrow(residuals: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct candidates, drawn with probability proportional to softmax(residuals)."""
    count = min(int(count), residuals.numel())
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    probabilities = torch.softmax(residuals.to(torch.float64), dim=0)
    return torch.multinomial(probabilities, count, replacement=False, generator=generator)


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores, ties broken by index (deterministic)."""
    order = torch.sort(-scores.to(torch.float64), stable=True).indices
    return order[:count]


def explore_group(
    matrix: torch.Tensor,
    alive: torch.Tensor,
    keep: int,
    total: int,
    generator: torch.Generator | None,
    criterion: str = "css",
) -> torch.Tensor:
    """One CHEX step on one group: keep ``keep`` of the alive units by CSS (or L1), then regrow
    units until ``total`` are alive, sampled by projection residual onto the kept units.

    ``matrix`` has one column per unit: the producing weights, pruned units holding their most
    recently used values. Returns the new boolean mask.
    """
    num_units = alive.numel()
    active = alive.nonzero().flatten()
    keep = max(0, min(int(keep), active.numel()))
    columns = matrix[:, active]
    scores = css_scores(columns, keep) if criterion == "css" else l1_scores(columns)
    kept = active[top_indices(scores, keep)]
    new = torch.zeros(num_units, dtype=torch.bool)
    new[kept] = True
    grow = max(0, min(int(total), num_units) - keep)
    if grow:
        candidates = (~new).nonzero().flatten()
        if grow >= candidates.numel() or generator is None:
            chosen = candidates[top_indices(projection_residuals(matrix[:, kept], matrix[:, candidates]), grow)]
        else:
            residuals = projection_residuals(matrix[:, kept], matrix[:, candidates])
            chosen = candidates[sample_regrow(residuals, grow, generator)]
        new[chosen] = True
    return new


def cosine_regrow_fraction(initial: float, step: int, until: int) -> float:
    """delta_t = delta_0 * (1 + cos(pi * t / T_max)) / 2, and 0 from T_max on."""
    if until <= 0 or step >= until:
        return 0.0
    return float(initial) * (1.0 + math.cos(math.pi * step / until)) / 2.0
