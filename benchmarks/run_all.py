"""Run every benchmark and write ``benchmarks/RESULTS.md``: the measured results, then the run just done.

    python benchmarks/run_all.py                 # the measurement modes (minutes each)
    python benchmarks/run_all.py --small         # smoke mode: seconds each, numbers meaningless (RESULTS-small.md)
    python benchmarks/run_all.py --collect       # run nothing: rewrite RESULTS.md from the JSONs
    python benchmarks/run_all.py --only early_exit grad_quant

Each benchmark runs in its own process, one after the other (never two at once: timing ratios are
only meaningful on an otherwise idle machine) and writes its JSON under ``benchmarks/results/``
(``<name>.json`` in the measurement mode, ``<name>-small.json`` in the smoke mode). RESULTS.md has two
parts, each JSON rendered by its benchmark's ``report(payload)`` under its file name and the machine
it ran on:

* Measured: every measurement JSON in ``benchmarks/results/`` (any file without ``-small``, e.g. also
  ``early_exit_vit.json``; its ``benchmark`` field names the script), the no-op attach cost first;
* Smoke run (``--small``; ``--collect`` shows the ``-small`` JSONs present) or, after a measurement
  run, the log of what ran.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import VERDICTS, machine, machine_line, staleness  # noqa: E402

#: Every benchmark script, in the order they appear in RESULTS.md (the tasks' calibration, then the no-op
#: attach cost first).
BENCHMARKS = ["calibration", "stack_overhead", "token_dropout", "prune_regrow", "grad_quant", "early_exit",
              "prompt_tuning"]
#: Benchmarks run by hand (they need root or more than this script's budget); their JSONs are collected too.
COLLECTED_ONLY = ["two_nodes"]
#: Every benchmark whose JSON `--collect` reads, in RESULTS.md's order.
COLLECTED = BENCHMARKS + COLLECTED_ONLY
#: Claims no benchmark measures yet; listed under the verdict table so that their absence is visible.
NOT_MEASURED = ["The stack's combined saving (several techniques in one run against the plain run): no benchmark "
                "measures it yet."]
SMALL_SUFFIX = "-small"
#: What run_all itself writes next to the benchmarks' JSONs (not a benchmark result).
RUN_LOG = "run_all.json"
SMOKE_CAVEAT = ("Smoke mode (`--small`): a few steps on tiny models, so the accuracies sit near chance and the timings "
                "cover a handful of steps. These numbers only show that every benchmark runs end to end; they are no "
                "result (the measured ones are above).")


def run(name: str, small: bool, results_dir: Path, timeout: float) -> dict[str, Any]:
    """Runs one benchmark script in its own process; its JSON lands in ``results_dir``."""
    script = HERE / f"{name}.py"
    out = results_dir / f"{name}{SMALL_SUFFIX if small else ''}.json"
    command = [sys.executable, str(script), "--out", str(out)] + (["--small"] if small else [])
    shown = " ".join([f"benchmarks/{script.name}", "--out", _shown_path(out)] + command[4:])
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        error = "" if done.returncode == 0 else "\n".join(done.stderr.strip().splitlines()[-15:])
    except subprocess.TimeoutExpired:
        status, error = f"timed out after {timeout:.0f} s", ""
    return {"name": name, "status": status, "command": shown, "seconds": time.perf_counter() - start,
            "json": str(out), "error": error}


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return str(path)


def result_files(results_dir: Path, small: bool) -> list[Path]:
    """The benchmark JSONs of one kind in ``results_dir``, in BENCHMARKS order (then by file name)."""
    files = [path for path in sorted(results_dir.glob("*.json"))
             if path.name != RUN_LOG and path.stem.endswith(SMALL_SUFFIX) == small]
    order = {name: index for index, name in enumerate(COLLECTED)}

    def key(path: Path) -> tuple[int, str]:
        return order.get(_benchmark_of(path), len(order)), path.name

    return sorted(files, key=key)


def _benchmark_of(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("benchmark", ""))
    except (OSError, ValueError):
        return ""


def _load(path: Path) -> tuple[dict[str, Any], Any]:
    """A benchmark JSON and the module of the benchmark that wrote it."""
    payload = json.loads(path.read_text())
    name = payload["benchmark"]
    if name not in COLLECTED:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(COLLECTED)})")
    return payload, importlib.import_module(f"benchmarks.{name}")


def render(path: Path, level: str = "###") -> tuple[list[str], bool]:
    """The Markdown section of one JSON: heading (file name), machine line, whether it is stale, the
    benchmark's report. Returns the lines and whether it rendered (a JSON that cannot be read or
    rendered says why)."""
    lines = [f"{level} {path.name}", ""]
    try:
        payload, module = _load(path)
        report = module.report(payload)
    except Exception as error:  # noqa: BLE001 - one unreadable JSON must not hide the others
        return lines + [f"Could not render `{_shown_path(path)}`: {type(error).__name__}: {error}", ""], False
    stale = staleness(payload)
    lines += [f"Benchmark `{payload['benchmark']}`. {machine_line(payload['machine'])}", ""]
    if stale:
        lines += [f"**Stale**: {stale}. Rerun `python benchmarks/{payload['benchmark']}.py` for figures of this code.", ""]
    return lines + [report.strip(), ""], True


def verdict_table(json_paths: list[Path]) -> list[str]:
    """RESULTS.md's first section: every claim of every measured JSON with its verdict, figure and source
    (a stale JSON says so beside its verdict)."""
    lines = ["| claim | verdict | figure | paper | why not shown / note | from |", "|---|---|---|---|---|---|"]
    for path in json_paths:
        try:
            payload, module = _load(path)
            rows = module.verdicts(payload) if hasattr(module, "verdicts") else []
        except Exception as error:  # noqa: BLE001 - shown in its own section too
            lines.append(f"| (could not read) | | | | {type(error).__name__}: {error} | `{path.name}` |")
            continue
        stale = staleness(payload)
        for row in rows:
            assert row["verdict"] in VERDICTS, row
            note = "; ".join(part for part in (row["reason"], f"stale: {stale}" if stale else "") if part)
            cells = [row["claim"], f"**{row['verdict']}**", row["figure"], row["paper"], note, f"`{path.name}`"]
            lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    lines += ["", *(f"Not measured: {item}" for item in NOT_MEASURED), ""]
    return lines


def write_results(path: Path, results_dir: Path, mode: str, entries: list[dict[str, Any]]) -> bool:
    """Writes RESULTS.md; ``mode`` is "small", "measure" or "collect" (what this invocation did).
    Returns whether every JSON rendered."""
    written = machine()
    lines = [
        "# stacktrain benchmark results",
        "",
        f"Written {written['date']} by `python benchmarks/run_all.py"
        + {"small": " --small", "measure": "", "collect": " --collect"}[mode] + "`.",
        "Ratios are technique over baseline, measured inside one process on the same machine; CPU time is",
        "the process CPU time. Every section names the JSON in `benchmarks/results/` it is rendered from",
        "and the machine and date of that measurement. `python benchmarks/run_all.py` reruns the",
        "measurements (minutes each); `--collect` only rewrites this file from the JSONs.",
        "",
        "## Measured",
        "",
    ]
    measured = result_files(results_dir, small=False)
    if not measured:
        lines += ["No measurement JSON in `benchmarks/results/`: run `python benchmarks/run_all.py`.", ""]
    else:
        lines[lines.index("## Measured"):lines.index("## Measured")] = [
            "## Verdicts", "",
            "One row per claim, under the protocol of BENCHMARKS.md: `holds` / `fails` only where the task has "
            "headroom and the paired interval decides; otherwise `not shown (no headroom)` or `not shown (within "
            "noise)`, with the reason. A figure whose JSON was measured on other code than the current one is "
            "marked stale.", "", *verdict_table(measured)]
    every_rendered = _render_into(lines, measured)
    if mode == "measure":
        lines += ["## This run", "", "Measurement mode; its JSONs are rendered above.", ""]
        lines += [_log_line(entry) for entry in entries] + [""]
    else:
        # a failed benchmark may have left an older JSON behind: only this run's own JSONs are shown
        small_files = [Path(e["json"]) for e in entries if e["status"] == "ok"] if mode == "small" \
            else result_files(results_dir, small=True)
        if mode == "small" or small_files:
            lines += ["## Smoke run", "", SMOKE_CAVEAT, ""]
            lines += [_log_line(entry) for entry in entries] + ([""] if entries else [])
            every_rendered &= _render_into(lines, small_files)
    for entry in entries:
        if entry["error"]:
            lines += [f"`{entry['name']}` {entry['status']}:", "", "```", entry["error"], "```", ""]
    path.write_text("\n".join(lines).rstrip() + "\n")
    return every_rendered


def _render_into(lines: list[str], json_paths: list[Path]) -> bool:
    """Appends the section of every JSON to ``lines``; whether all of them rendered."""
    every_rendered = True
    for json_path in json_paths:
        section, rendered = render(json_path)
        lines += section
        every_rendered &= rendered
    return every_rendered


def _log_line(entry: dict[str, Any]) -> str:
    return f"- `python {entry['command']}`: {entry['status']} in {entry['seconds']:.0f} s"


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = arguments.add_mutually_exclusive_group()
    mode.add_argument("--small", action="store_true", help="smoke mode of every benchmark")
    mode.add_argument("--collect", action="store_true", help="run nothing; rewrite RESULTS.md from the JSONs present")
    arguments.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    arguments.add_argument("--out", default=None, help="RESULTS.md path (default benchmarks/RESULTS.md; "
                           "with --small the untracked benchmarks/RESULTS-small.md)")
    arguments.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    args = arguments.parse_args(argv)
    RESULTS_DIR.mkdir(exist_ok=True)
    entries = []
    if not args.collect:
        for name in args.only or BENCHMARKS:
            print(f"running {name} ...", flush=True)
            entries.append(run(name, args.small, RESULTS_DIR, args.timeout))
            print(f"  {entries[-1]['status']} in {entries[-1]['seconds']:.0f} s", flush=True)
        (RESULTS_DIR / RUN_LOG).write_text(json.dumps(entries, indent=2))
    # a smoke run must not rewrite the tracked measured results: it goes to an untracked file
    out = Path(args.out) if args.out else HERE / ("RESULTS-small.md" if args.small else "RESULTS.md")
    mode_name = "collect" if args.collect else "small" if args.small else "measure"
    every_rendered = write_results(out, RESULTS_DIR, mode_name, entries)
    print(f"written {out}")
    return 0 if every_rendered and all(e["status"] == "ok" for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
