"""Two-node DDP across two network namespaces (benchmarks/two_nodes.py's launch): torchrun --nnodes 2,
one process per namespace over a veth pair, Lightning num_nodes 2; both nodes end with the same weights."""

from __future__ import annotations

import pytest
import torch

from benchmarks import two_nodes


def test_powersgd_bytes_follow_torchs_compression_rule():
    # a 64 x 32 matrix is compressed to rank-1 factors (64 + 32 values); a 4 x 2 one and a vector are sent whole
    assert two_nodes.powersgd_bytes([[64, 32], [4, 2], [10]]) == 4 * (64 + 32) + 4 * 8 + 4 * 10
    assert two_nodes.bytes_per_step("fp16_hook", {"shapes": [[64, 32], [10]], "bytes_history": []}) == (2 * 2058, 4 * 2058)


@pytest.mark.ddp
def test_two_nodes_over_a_veth_pair_end_with_identical_weights(tmp_path):
    why = two_nodes.can_make_namespaces()
    if why is not None:
        pytest.skip(f"two network namespaces: {why}")
    config = two_nodes.method_config("int4_allgather", tmp_path, two_nodes.REPO / "configs" / "quickstart.yaml")
    try:
        with two_nodes.two_namespaces() as nodes:
            two_nodes.set_link(nodes, "1gbit")
            payload = two_nodes.launch(nodes, config, 3, tmp_path, "int4", weights_dir=tmp_path / "weights")
    except two_nodes.Skip as error:
        pytest.skip(str(error))
    assert payload["world_size"] == 2 and payload["num_nodes"] == 2 and len(payload["step_s"]) == 3
    sent, fp32 = two_nodes.bytes_per_step("int4_allgather", payload)
    assert len(payload["bytes_history"]) == 3 and 0.12 < sent / fp32 <= 0.14  # 4-bit codes plus a scale per tensor
    rank0, rank1 = (torch.load(tmp_path / "weights" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
