"""The prompt-tuning benchmark in its small mode (a micro CLIP pretrained for a few steps, cached in a
temporary folder): headroom, every cell, the context comparison, the unsupervised run, the class
embedding similarity, every context's claims, the step times and the verdicts reach the JSON. No accuracy or timing is
asserted: at this size the numbers mean nothing."""

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
    assert all(len(cell["accuracies"]) == 1 and len(cell["class_similarity"]) == 1 for cell in payload["cells"].values())
    assert 0.0 <= payload["cells"]["unsupervised (gce)"]["pseudo_label_acc"] <= 1.0
    assert 0.0 <= payload["zero_shot"] <= 1.0 and 0.0 <= payload["linear_probe"]["test"] <= 1.0
    assert {c["check"] for c in payload["headroom"]["checks"]} >= {"baseline below the ceiling"}
    assert payload["context"] == "16 random per class"
    assert set(payload["other_contexts"]) == {"a photo of a", "16 random"}
    for cells in payload["other_contexts"].values():  # the cells every claim is judged on
        assert set(cells) == {"ce noise 0%", "ce noise 50%", "gce noise 0%", "gce noise 50%", "unsupervised (gce)"}
    assert len(payload["context_comparison"]) == 8
    zero_shot = payload["zero_shot"]  # the baseline every comparison of the report is made against
    assert f"zero-shot {zero_shot:.4f}" in payload["markdown"]
    gains = [a - zero_shot for a in payload["cells"]["gce noise 0%"]["accuracies"]]
    assert f"mean {100 * sum(gains) / len(gains):+.2f} points over zero-shot {zero_shot:.3f}" in payload["markdown"]
    assert set(payload["step_time"]) == {"images", "cached features"}
    assert payload["step_time"]["images"]["wall_ratio"] == 1.0
    assert len(payload["verdicts"]) == 3 * 6  # the claims for the grid's context, then each other one's
    assert sum(v["claim"].endswith("[context 16 random]") for v in payload["verdicts"]) == 6
    assert all(v["verdict"].startswith("not shown") or payload["headroom"]["ok"] for v in payload["verdicts"])
    assert list((tmp_path / "cache").glob("stacktrain-micro-clip-seed0-*.pt"))  # pretrained once, cached
    assert payload["markdown"] == prompt_tuning.report(payload)  # the report rebuilds from the JSON alone
