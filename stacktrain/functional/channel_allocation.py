"""How many channels each layer keeps: one global ranking of BatchNorm ``|gamma|`` under a
channel-sparsity or FLOPs budget (`Allocation`), widths rounded to a multiple (`round_widths`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from stacktrain.functional.channel_scores import top_indices

__all__ = ["Allocation", "round_widths"]


def round_widths(counts: torch.Tensor, multiple: int, minimum: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Each count to its nearest multiple of ``multiple``, then at least the group's minimum (itself
    rounded up to the multiple) and at most the group's size. Non-decreasing in ``counts``."""
    if multiple <= 1:
        return counts
    rounded = torch.div(counts + multiple // 2, multiple, rounding_mode="floor") * multiple
    floor = torch.minimum(torch.div(minimum + multiple - 1, multiple, rounding_mode="floor") * multiple, sizes)
    return torch.minimum(torch.maximum(rounded, floor), sizes)


class Allocation:
    """One global ranking of all units: each group's ``minimum`` best units first, then every other
    unit by score (BN ``|gamma|``), highest first. The top ``k`` units give each group its width,
    so a single threshold over the scores allocates channels across layers."""

    def __init__(self, scores: Sequence[torch.Tensor], minimum: Sequence[int], multiple: int = 1) -> None:
        """``multiple``: round every group's width to a multiple of it (nearest; at least the group's
        minimum, at most its size): CPU and GPU kernels run channel counts like 64 or 56 faster than 61."""
        group_ids, values, mandatory = [], [], []
        for g, score in enumerate(scores):
            order = top_indices(score, score.numel())
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            group_ids.append(torch.full((score.numel(),), g, dtype=torch.long))
            values.append(score.detach().to(torch.float64).cpu())
            mandatory.append(rank.cpu() < int(minimum[g]))
        self.num_groups = len(scores)
        self.group_ids = torch.cat(group_ids)
        key_score = torch.cat(values)
        key_mandatory = torch.cat(mandatory)
        # mandatory first, then by score, ties by position (stable sorts, least significant first)
        order = torch.sort(-key_score, stable=True).indices
        order = order[torch.sort((~key_mandatory[order]).to(torch.int8), stable=True).indices]
        self.order = order
        self.minimum_total = int(key_mandatory.sum())
        self.total = int(self.group_ids.numel())
        self.multiple = int(multiple)
        self.sizes = torch.tensor([score.numel() for score in scores], dtype=torch.long)
        self.minimum = torch.tensor([int(m) for m in minimum], dtype=torch.long)

    def counts(self, k: int) -> torch.Tensor:
        """Units per group when the top ``k`` units are kept (rounded to ``multiple``; the rounding
        keeps the counts non-decreasing in ``k``, so `largest_within` still bisects)."""
        k = max(self.minimum_total, min(int(k), self.total))
        counts = torch.bincount(self.group_ids[self.order[:k]], minlength=self.num_groups)
        return round_widths(counts, self.multiple, self.minimum, self.sizes)

    def largest_within(self, cost: Callable[[torch.Tensor], float], limit: float) -> int:
        """The largest ``k`` whose allocation costs at most ``limit`` (cost grows with ``k``)."""
        low, high = self.minimum_total, self.total
        if cost(self.counts(low)) > limit:
            return low
        while low < high:
            middle = (low + high + 1) // 2
            if cost(self.counts(middle)) <= limit:
                low = middle
            else:
                high = middle - 1
        return low
