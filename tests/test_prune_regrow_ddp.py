"""PruneRegrow as 2 CPU processes under DDP (gloo), from the shipped config: both ranks decide the
same masks at every update, and after compaction (module re-wrapped in DDP) the ranks keep training
in sync although each sees its own data."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import CONFIGS
from ddp_harness import assert_states_equal, check, launch_driver, load_rank_states, run_ddp

pytestmark = pytest.mark.ddp

STATS = ("running_mean", "running_var", "num_batches_tracked")


def test_two_ranks_agree_on_every_mask_and_stay_in_sync_after_compaction(tmp_path):
    config = yaml.safe_load((CONFIGS / "prune_regrow_resnet.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(logger=False, max_steps=12, limit_val_batches=0, enable_checkpointing=False)
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("RichProgressBar")]
    explorer = next(c for c in trainer["callbacks"] if c["class_path"].endswith("PruneRegrow"))
    explorer["init_args"].update(update_unit="step", update_every=2, explore_until=0.6)
    config["model"]["init_args"]["model_name"] = "test_resnet"
    config["data"]["init_args"]["batch_size"] = 32
    path = tmp_path / "prune_regrow_ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    check(run_ddp(["fit", "--config", str(path)], workdir=tmp_path, dump_dir=tmp_path / "ranks"))
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    assert rank0["global_step"] == rank1["global_step"] == 12
    first, second = rank0["techniques"]["PruneRegrow"], rank1["techniques"]["PruneRegrow"]
    # updates at 0, every 2 steps, and T_max = 0.6 * 12 = 7; every rank decided the same masks itself
    assert [h["step"] for h in first["history"]] == [0, 2, 4, 6, 7]
    for a, b in zip(first["history"], second["history"]):
        assert a["digest"] == a["local_digest"] == b["local_digest"] == b["digest"], a["step"]
    assert len({h["digest"] for h in first["history"]}) == 5
    assert_states_equal(first, second, "PruneRegrow state")
    assert first["compacted"] and first["compacted_at"] == 7
    # identical weights although the ranks saw different batches: gradients were still all-reduced
    # by the re-wrapped DDP module after the layers shrank. (BatchNorm running statistics are per rank
    # between DDP's buffer broadcasts, so they differ by the last local batch, as in any DDP run.)
    params = lambda state: {k: v for k, v in state.items() if not k.endswith(STATS)}  # noqa: E731
    assert_states_equal(params(rank0["model"]), params(rank1["model"]), "weights")
    assert {k: v.shape for k, v in rank0["model"].items()} == {k: v.shape for k, v in rank1["model"].items()}
    conv = rank0["model"]["model.layer1.0.conv1.weight"]
    assert conv.shape[0] < 32 or conv.shape[1] < 32 or sum(v.numel() for v in rank0["model"].values()) < 373_370
    assert torch.isfinite(conv).all()


def test_one_line_attach_traces_on_the_first_batch_and_ranks_agree(tmp_path):
    """A module without forward and a plain DataLoader of tensors (tests/prune_regrow_attach_driver.py),
    2 processes: both trace the same network on their own first batch and decide the same masks."""
    rank0, rank1 = (r["attach"] for r in launch_driver("prune_regrow_attach_driver.py", tmp_path, "--clip", "none"))
    assert rank0["status"] == rank1["status"] == "ok", rank0.get("error") or rank1.get("error")
    assert rank0["traced"] == rank1["traced"] == "net" and rank0["compacted"] and rank1["compacted"]
    assert [h["step"] for h in rank0["history"]] == [0, 2, 3]
    for a, b in zip(rank0["history"], rank1["history"]):
        assert a["digest"] == a["local_digest"] == b["local_digest"] == b["digest"], a["step"]
    assert 0.45 <= rank0["history"][-1]["flops_ratio"] <= 0.5
    assert rank0["weights"] == rank1["weights"] and rank0["conv_shape"] == rank1["conv_shape"]
