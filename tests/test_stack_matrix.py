"""The stacking matrix: every pair of techniques that can share a model trains together on 2 CPU
processes with identical weights on both ranks, and every pair that cannot is refused with a
`StackError` naming key, value and fix before the first batch.

Techniques: TokenDropout (TD), PruneRegrow (PR), GradientQuantization (GQ) are callbacks;
BoostedEarlyExit (EE) and PromptTunedCLIP (PT) are modules, so EE+PT cannot be one model (not tested).

The working pairs run in ONE 2-process launch of tests/stack_matrix_driver.py (one fit after the
other in the same process group); the refused pairs run in this process on one device.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lightning.pytorch import Callback, seed_everything

from conftest import make_trainer
from ddp_harness import launch_driver
from stack_matrix_driver import (
    RUNS,
    STEPS,
    cnn_classifier,
    cnn_early_exit,
    digits,
    grad_quant,
    prompt_tuned,
    prune_regrow,
    shapes,
    token_dropout,
    vit_classifier,
    vit_early_exit,
)
from stacktrain.errors import StackError

#: technique abbreviation -> its name in the efficiency report
REPORT_NAMES = {"TD": "token_dropout", "PR": "prune_regrow", "GQ": "grad_quant", "EE": "early_exit",
                "PT": "prompt_tuning"}
PAIRS = [name for name in RUNS if " " not in name]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, micro_clip) -> list[dict]:
    """Both ranks' results of one 2-process launch of the driver over every working pair."""
    workdir = tmp_path_factory.mktemp("matrix")
    return launch_driver("stack_matrix_driver.py", workdir, "--clip", micro_clip)


def differing(first: dict, second: dict) -> list[str]:
    return sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k))


# ------------------------------------------------------------------------------------ working pairs
@pytest.mark.ddp
@pytest.mark.parametrize("pair", PAIRS)
def test_pair_trains_together_on_two_processes(matrix, pair):
    rank0, rank1 = (results[pair] for results in matrix)
    for rank, result in enumerate((rank0, rank1)):
        assert result["status"] == "ok", f"rank {rank}:\n{result.get('error')}"
        assert result["global_step"] == result["batches"] == STEPS
    assert rank0["weights"] == rank1["weights"], f"weights differ: {differing(rank0['tensors'], rank1['tensors'])}"
    assert rank0["techniques"] == rank1["techniques"], {
        name: differing(rank0["technique_parts"][name], rank1["technique_parts"][name])
        for name in rank0["technique_parts"]
    }
    # each technique of the pair acted: it reported savings (ratio below 1) in the shared report
    report = rank0["report"]
    for abbreviation in pair.split("+"):
        lines = {k: v for k, v in report.items() if k.startswith(REPORT_NAMES[abbreviation] + " |")}
        assert lines and all(0 < ratio < 1 for ratio in lines.values()), (abbreviation, report)
    if "GQ" in pair:  # the 4-bit all-gather replaced DDP's fp32 all-reduce
        assert report["grad_quant | communicated bytes/step"] == pytest.approx(0.125, abs=0.005)


@pytest.mark.ddp
def test_token_dropout_shortens_the_sequence_every_exit_head_of_a_staged_vit_sees(matrix):
    """TD+EE: the staged ViT's stem runs the ViT's own token-drop slot, so with keep 0.5 and patches
    twice as large (16 -> 4 patches -> 2 kept) every exit head trains on 1 + 2 tokens; validation
    sees all 1 + 16."""
    tokens = matrix[0]["TD+EE"]["exit_tokens"]
    assert tokens["train"] == [3] * (2 * STEPS) and set(tokens["eval"]) == {17}
    assert matrix[0]["TD+EE"]["report"]["token_dropout | tokens/sample"] == pytest.approx(3 / 17)


@pytest.mark.ddp
def test_token_dropout_in_prompt_tuning_compounds_with_it(matrix):
    report = matrix[0]["TD+PT"]["report"]
    assert report["token_dropout | tokens/sample"] == pytest.approx(9 / 17)
    assert report["all techniques | train FLOPs/step"] == pytest.approx(
        report["prompt_tuning | train FLOPs/step"] * report["token_dropout | train FLOPs/step"])


@pytest.mark.ddp
def test_list_order_does_not_change_the_run(matrix):
    """DESIGN.md contract 7 on the pair that both shape the weights' update (MetaGrad's hypernetwork
    rewrites the gradients before the step, PruneRegrow masks the weights after it and compacts):
    [PR, GQ] and [GQ, PR] run in the same stack order and end bitwise identical (weights, BatchNorm
    statistics, technique states). The two act in different phases of the step, so their results
    would agree even unsorted (checked by hand with `arrange_stack` disabled): what this test can
    catch is the hooks running in the user's order (``stack``); test_stack.py shows with techniques
    whose result depends on the order that sorting them is what makes the run order-independent."""
    for results in matrix:
        listed, reversed_ = results["PR+GQ"], results["PR+GQ reversed"]
        assert listed["status"] == reversed_["status"] == "ok", reversed_.get("error")
        assert listed["order"] == ["PruneRegrow", "GradientQuantization"] == reversed_["order"][::-1]
        assert listed["stack"] == reversed_["stack"] == ["GradientQuantization", "PruneRegrow"]
        assert listed["everything"] == reversed_["everything"], differing(listed["tensors"], reversed_["tensors"])


# ------------------------------------------------------------------------------------ refused pairs
class BatchSpy(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


#: id -> (builder of (model, data, techniques), technique that refuses, key, words of the reason)
REFUSED: dict[str, tuple[Callable[[str], tuple], str, str, str]] = {
    "TD+GQ on a CNN": (lambda clip: (cnn_classifier(), digits(), [grad_quant(), token_dropout()]),
                       "TokenDropout", "model", "has no ViT"),
    "TD+EE on a CNN backbone": (lambda clip: (cnn_early_exit(), digits(), [token_dropout()]),
                                "TokenDropout", "model", "has no ViT"),
    "TD+PR on a ViT": (lambda clip: (vit_classifier(), digits(), [prune_regrow(), token_dropout()]),
                       "PruneRegrow", "model", "no prunable convolution channels"),
    "TD+PR on a CNN": (lambda clip: (cnn_classifier(), digits(), [prune_regrow(), token_dropout()]),
                       "TokenDropout", "model", "has no ViT"),
    "PR+EE on a ViT backbone": (lambda clip: (vit_early_exit(), digits(), [prune_regrow()]),
                                "PruneRegrow", "model", "no prunable convolution channels"),
    "PR+PT": (lambda clip: (prompt_tuned(clip), shapes(), [prune_regrow()]),
              "PruneRegrow", "model", "both CLIP towers are frozen"),
    "TD+PT with cache_features": (lambda clip: (prompt_tuned(clip, cache_features=True), shapes(), [token_dropout()]),
                                  "TokenDropout", "model", "cache_features=True"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_pair_that_cannot_share_a_model_is_refused_before_the_first_batch(case, micro_clip, tmp_path):
    build, source, key, reason = REFUSED[case]
    seed_everything(0, verbose=False)
    model, data, techniques = build(micro_clip)
    spy = BatchSpy()
    trainer = make_trainer(tmp_path, [*techniques, spy], max_steps=STEPS, limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(StackError) as caught:
        trainer.fit(model, data)
    error = caught.value
    message = str(error)
    assert (error.source, error.key) == (source, key), message
    assert reason in message and f"{key}=" in message and error.fix and "Fix: " in message, message
    assert spy.batches == 0 and trainer.global_step == 0
