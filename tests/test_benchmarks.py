"""Benchmarks run in their small mode and write their JSON (no timing is asserted); every stored
result JSON renders through its benchmark's ``report``, and run_all --collect builds RESULTS.md from them."""

from __future__ import annotations

import json

import pytest


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
    assert payload["markdown"] == stack_overhead.report(payload)  # the report rebuilds from the JSON alone


# ------------------------------------------------------------------------ RESULTS.md from the JSONs
def _result_jsons() -> list:
    from benchmarks import run_all

    return sorted(path for path in run_all.RESULTS_DIR.glob("*.json") if path.name != run_all.RUN_LOG)


def test_every_benchmark_has_a_measurement_json():
    from benchmarks import run_all

    files = run_all.result_files(run_all.RESULTS_DIR, small=False)
    measured = {json.loads(path.read_text())["benchmark"] for path in files}
    assert measured == set(run_all.COLLECTED)  # the hand-run ones are measured too


@pytest.mark.parametrize("path", _result_jsons(), ids=lambda path: path.name)
def test_report_renders_every_result_json(path):
    import importlib

    payload = json.loads(path.read_text())
    markdown = importlib.import_module(f"benchmarks.{payload['benchmark']}").report(payload)
    tables = _tables(markdown)
    assert tables and all(rows for _, rows in tables), markdown
    for header, rows in tables:  # every row has one cell per column
        assert all(row.count("|") == header.count("|") for row in rows), (header, rows)


def _tables(markdown: str) -> list[tuple[str, list[str]]]:
    """(header, data rows) of every Markdown table in ``markdown``."""
    lines = markdown.splitlines()
    found = []
    for index, line in enumerate(lines[:-1]):
        if line.startswith("| variant |") and lines[index + 1].startswith("|---"):
            rows = []
            for row in lines[index + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(row)
            found.append((line, rows))
    return found


def test_collect_writes_the_measured_results_without_smoke_claims(tmp_path):
    from benchmarks import run_all
    from benchmarks.common import machine_line

    out = tmp_path / "RESULTS.md"
    assert run_all.main(["--collect", "--out", str(out)]) == 0
    text = out.read_text()
    measured = text.split("## Measured\n", 1)[1].split("\n## ", 1)[0]
    files = run_all.result_files(run_all.RESULTS_DIR, small=False)
    positions = []
    for path in files:
        payload = json.loads(path.read_text())
        heading = f"### {path.name}\n"
        assert heading in measured and machine_line(payload["machine"]) in measured
        positions.append(measured.index(heading))
    assert positions == sorted(positions)
    benchmarks = [json.loads(path.read_text())["benchmark"] for path in files]
    assert benchmarks.index("stack_overhead") <= 1 + benchmarks.count("calibration")  # calibration, then attach cost
    assert "(contract bound: 2%) -> holds" in measured.split("### stack_overhead.json", 1)[1].split("### ", 1)[0]
    assert "-small" not in measured and "smoke" not in measured.lower() and "Could not render" not in measured
    small = run_all.result_files(run_all.RESULTS_DIR, small=True)
    if small:  # the smoke JSONs come after, under their own caveat
        smoke = text.split("\n## Smoke run\n", 1)[1]
        assert run_all.SMOKE_CAVEAT in smoke and all(f"### {path.name}\n" in smoke for path in small)


def test_verdict_table_leads_with_one_row_per_claim(tmp_path):
    """RESULTS.md starts with the verdicts, each from the vocabulary and naming its JSON; token dropout's
    time to accuracy on the digits (raw pixels above every SSL plateau) is not shown, with that reason;
    prompt tuning's claims that do not hold say why."""
    from benchmarks import run_all
    from benchmarks.common import VERDICTS

    out = tmp_path / "RESULTS.md"
    run_all.main(["--collect", "--out", str(out)])
    text = out.read_text()
    assert text.index("## Verdicts") < text.index("## Measured")
    table = text.split("## Verdicts\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert rows and all(any(f"**{v}**" in row for v in VERDICTS) for row in rows)
    assert all(row.rstrip(" |").endswith(".json`") for row in rows)
    times = [row for row in rows if row.startswith("| simclr: time to the baseline's k-NN plateau")]
    assert times and all("**not shown (no headroom)**" in row and "raw-pixel k-NN" in row for row in times)
    prompt = [row.split("|") for row in rows if row.rstrip(" |").endswith("`prompt_tuning.json`")]
    assert prompt and all(cells[5].strip() for cells in prompt if "**holds**" not in cells[2])  # a reason each
    assert "Not measured: The stack's combined saving" in table


def test_every_benchmark_takes_data(capsys):
    import importlib

    from benchmarks import run_all

    for name in run_all.BENCHMARKS:
        with pytest.raises(SystemExit):
            importlib.import_module(f"benchmarks.{name}").main(["--help"])
        assert "--data" in capsys.readouterr().out, name


def test_calibration_benchmark_small(tmp_path):
    from benchmarks import calibration

    out = tmp_path / "calibration.json"
    payload = calibration.main(["--small", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["floors"]["chance"] == pytest.approx(0.1)
    assert 0.1 < stored["floors"]["raw_knn"] < 0.6  # the cluttered task: far below the digits' 0.98
    assert set(stored["runs"]) == {"cnn_w32", "cnn_w8", "vit"} and all(len(r) == 2 for r in stored["runs"].values())
    assert [row["claim"] for row in calibration.verdicts(payload)][0].startswith("cluttered: raw-pixel k-NN")
    assert stored["provenance"]["code"]["benchmarks/calibration.py"]
