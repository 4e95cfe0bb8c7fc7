"""The prompt-tuning benchmark in its small mode (a micro CLIP pretrained for a few steps, cached in a
temporary folder): every cell, the unsupervised run, the step times and the checks reach the JSON.
No accuracy or timing is asserted (at this size the numbers mean nothing); the report's comparisons
are checked against the zero-shot baseline they are made with."""

from __future__ import annotations

import json


def test_prompt_tuning_benchmark_small(tmp_path, monkeypatch):
    from benchmarks import prompt_tuning

    monkeypatch.setenv("STACKTRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "prompt_tuning.json"
    prompt_tuning.main(["--small", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "prompt_tuning" and payload["small"]
    expected = {f"{loss} noise {rate}%" for loss in ("ce", "gce") for rate in ("0", "12.5", "25", "50")}
    assert set(payload["cells"]) == expected | {"unsupervised (gce)"}
    assert all(len(cell["accuracies"]) == 1 for cell in payload["cells"].values())
    zero_shot = payload["zero_shot"]  # the baseline every comparison of the report is made against
    for loss in ("ce", "gce"):
        assert payload["checks"][f"tuned ({loss}) beats zero-shot at 0% noise"] == (
            payload["cells"][f"{loss} noise 0%"]["median"] > zero_shot)
    assert payload["checks"]["unsupervised beats zero-shot"] == (payload["cells"]["unsupervised (gce)"]["median"] > zero_shot)
    assert f"zero-shot {zero_shot:.4f}" in payload["markdown"]
    assert set(payload["step_time"]) == {"images", "cached features"}
    assert payload["step_time"]["images"]["wall_ratio"] == 1.0
    assert len(payload["checks"]) == 4
    assert list((tmp_path / "cache").glob("stacktrain-micro-clip-seed0-*.pt"))  # pretrained once, cached
    assert payload["markdown"] == prompt_tuning.report(payload)  # the report rebuilds from the JSON alone
