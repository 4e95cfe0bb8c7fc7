"""Benchmarks run in their small mode and write their JSON (no timing is asserted)."""

from __future__ import annotations

import json


def test_stack_overhead_benchmark_small(tmp_path):
    from benchmarks import stack_overhead

    out = tmp_path / "overhead.json"
    stack_overhead.main(["--small", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "stack_overhead"
    assert set(payload["results"]) == {"baseline", "report", "noop_technique"}
    assert payload["results"]["baseline"]["wall_ratio"] == 1.0
    assert payload["results"]["noop_technique"]["in_hooks_pct"] > 0
    assert payload["machine"]["torch"]
