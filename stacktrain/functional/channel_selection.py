"""CHEX channel exploration, the math (no Lightning), re-exported from the files that hold it:

* `stacktrain.functional.channel_groups`: tracing and coupled channel groups (`find_channel_groups`);
* `stacktrain.functional.channel_scores`: scores inside a layer (CSS, L1, regrow residuals, `explore_group`);
* `stacktrain.functional.channel_allocation`: widths per layer under a budget (`Allocation`);
* `stacktrain.functional.channel_masks`: `ChannelPlan` (costs of widths, applying and moving masks);
* `stacktrain.functional.prune_regrow`: one whole CHEX update (`prune_regrow_update`), for a plain PyTorch loop.
"""

from stacktrain.functional.channel_allocation import Allocation, round_widths
from stacktrain.functional.channel_groups import ChannelGroup, ChannelSlice, find_channel_groups, trace_dependency_graph
from stacktrain.functional.channel_masks import ChannelPlan, mask_digest
from stacktrain.functional.channel_scores import (
    cosine_regrow_fraction, css_scores, explore_group, l1_scores, projection_residuals, sample_regrow,
)

__all__ = [
    "ChannelSlice", "ChannelGroup", "ChannelPlan", "Allocation", "find_channel_groups", "trace_dependency_graph",
    "css_scores", "l1_scores", "projection_residuals", "sample_regrow", "explore_group", "cosine_regrow_fraction",
    "mask_digest", "round_widths",
]
