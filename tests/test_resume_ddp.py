"""Exact resume on 2 DDP processes for every technique alone and every stack config: N steps
uninterrupted vs. stopped at step k and resumed from the checkpoint end with identical weights,
optimizer state and technique state on each rank, and the checkpoint loads with
``torch.load(weights_only=True)``.

All the runs are fits in ONE 2-process launch of tests/resume_ddp_driver.py (import cost paid once).
The one-process resume of each technique is in its own test file; of the stacks in
tests/test_stack_configs_resume.py; the CNN stack also resumes through ``train.py fit --ckpt_path`` there.
"""

from __future__ import annotations


import pytest

from ddp_harness import TESTS, launch_driver
from resume_ddp_driver import SCENARIOS
from stack_matrix_driver import STATS

#: the techniques each scenario's checkpoint must hold state for (besides ExactResume's RNG states)
SAVED = {
    "TokenDropout": {"TokenDropout"},
    "PruneRegrow": {"PruneRegrow"},
    "GradientQuantization": {"GradientQuantization"},
    "BoostedEarlyExit": set(),  # a module: its state (exit thresholds) is in the weights
    "PromptTunedCLIP": set(),  # a module: the prompt and the selected samples are in its own checkpoint keys
    "MultiViewWorkers": {"TokenDropout"},
    "ExtendedRun": {"TokenDropout"},
    "SIGTERM": set(),
    "stack_vit": {"TokenDropout", "GradientQuantization"},
    "stack_cnn": {"PruneRegrow", "GradientQuantization"},
    "stack_clip": {"TokenDropout"},
}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, micro_clip) -> list[dict]:
    workdir = tmp_path_factory.mktemp("resume_ddp")
    return launch_driver("resume_ddp_driver.py", workdir, "--clip", micro_clip)


def test_every_technique_and_stack_config_is_covered():
    assert set(SAVED) == set(SCENARIOS)
    stacks = {path.stem for path in TESTS.parent.joinpath("configs").glob("stack_*.yaml")}
    assert stacks and stacks <= set(SCENARIOS)


@pytest.mark.ddp
@pytest.mark.parametrize("name", [name for name, scenario in SCENARIOS.items() if not scenario.extend])
def test_resume_on_two_processes_is_exact(resumed, name):
    for rank, results in enumerate(resumed):
        result = results[name]
        assert result["status"] == "ok", f"rank {rank}:\n{result.get('error')}"
        full, again = result["uninterrupted"], result["resumed"]
        assert result["stopped_at"] == SCENARIOS[name].stop_at
        assert full["global_step"] == again["global_step"] == result["total"]
        differing = sorted(k for k in full["tensors"] if full["tensors"][k] != again["tensors"].get(k))
        assert full["weights"] == again["weights"], f"rank {rank}: weights differ: {differing[:8]}"
        assert full["optimizer"] == again["optimizer"], f"rank {rank}: optimizer state differs"
        assert full["techniques"] == again["techniques"], f"rank {rank}: technique state differs"
    # both ranks end with the same weights (DDP; BatchNorm running statistics are per rank)
    first, second = ({k: v for k, v in results[name]["resumed"]["tensors"].items() if not k.endswith(STATS)}
                     for results in resumed)
    assert first == second, sorted(k for k in first if first[k] != second.get(k))[:8]
    rank0 = resumed[0][name]
    assert rank0["checkpoint_step"] == SCENARIOS[name].stop_at
    assert {"ExactResume", *SAVED[name]} <= set(rank0["checkpoint_callbacks"])


@pytest.mark.ddp
def test_an_extended_run_on_two_processes_continues_on_the_replanned_schedule(resumed):
    """Planned for 2 steps, checkpointed at its end and resumed for 4 (SimCLR, 2 data-loader workers per
    rank, OneCycleLR, TokenDropout): it runs to step 4 where OneCycleLR used to raise after the first
    batch, ends with the learning rate of a run planned for 4 steps, and both ranks agree."""
    for rank, results in enumerate(resumed):
        result = results["ExtendedRun"]
        assert result["status"] == "ok", f"rank {rank}:\n{result.get('error')}"
        full, again = result["uninterrupted"], result["resumed"]
        assert again["global_step"] == full["global_step"] == 4 and result["stopped_at"] == 2
        assert again["lr"] == pytest.approx(full["lr"])
    first, second = ({k: v for k, v in results["ExtendedRun"]["resumed"]["tensors"].items() if not k.endswith(STATS)}
                     for results in resumed)
    assert first == second, sorted(k for k in first if first[k] != second.get(k))[:8]
