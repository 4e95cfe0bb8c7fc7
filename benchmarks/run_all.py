"""Run every benchmark and write ``benchmarks/RESULTS.md`` (machine, date, every table they print).

    python benchmarks/run_all.py                 # the measurement modes (minutes each)
    python benchmarks/run_all.py --small         # smoke mode: seconds each, numbers meaningless
    python benchmarks/run_all.py --only early_exit grad_quant

Each benchmark runs in its own process, one after the other (never two at once: timing ratios are
only meaningful on an otherwise idle machine) and writes its JSON under ``benchmarks/results/``; the
report it puts there (``markdown``: its tables and verdicts) is copied into RESULTS.md with the
command that produced it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import machine  # noqa: E402

#: Every benchmark script, in the order they appear in RESULTS.md.
BENCHMARKS = ["stack_overhead", "token_dropout", "prune_regrow", "grad_quant", "early_exit", "prompt_tuning"]


def report_of(json_path: Path, stdout: str) -> str:
    """The benchmark's own report from its JSON, or else the Markdown tables it printed."""
    if json_path.exists():
        markdown = json.loads(json_path.read_text()).get("markdown")
        if markdown:
            return markdown.strip()
    return "\n".join(line for line in stdout.splitlines() if line.startswith("|"))


def run(name: str, small: bool, results_dir: Path, timeout: float) -> dict:
    script = HERE / f"{name}.py"
    out = results_dir / f"{name}{'-small' if small else ''}.json"
    command = [sys.executable, str(script), "--out", str(out)] + (["--small"] if small else [])
    if not script.exists():
        return {"name": name, "status": "missing", "command": " ".join(command), "seconds": 0.0, "output": ""}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = report_of(out, done.stdout) if done.returncode == 0 else ""
        if done.returncode != 0:
            output += "\n\n" + "\n".join(done.stderr.strip().splitlines()[-15:])
    except subprocess.TimeoutExpired:
        status, output = f"timed out after {timeout:.0f} s", ""
    shown = [str(script.relative_to(HERE.parent)), "--out", str(out.relative_to(HERE.parent))] + command[4:]
    return {"name": name, "status": status, "command": " ".join(shown),
            "seconds": time.perf_counter() - start, "output": output, "json": str(out.relative_to(HERE.parent))}


def write_results(entries: list[dict], small: bool, path: Path) -> None:
    info = machine()
    lines = [
        "# stacktrain benchmark results",
        "",
        f"Measured {info['date']} on {info['platform']}, {info['cpu_count']} CPU cores, torch {info['torch']}"
        + (f", {info['cuda']}" if info["cuda"] else ", no GPU") + ".",
        f"Mode: {'smoke (--small): the numbers below only show that the benchmarks run' if small else 'measurement'}.",
        "Ratios are technique over baseline, measured inside one process on the same machine; CPU time is the",
        "process CPU time. Regenerate with `python benchmarks/run_all.py`.",
        "",
    ]
    for entry in entries:
        lines += [f"## {entry['name']}", "", f"`python {entry['command']}`: {entry['status']} "
                  f"in {entry['seconds']:.0f} s (JSON: `{entry.get('json', '')}`)", ""]
        if entry["output"]:
            lines += [entry["output"], ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--small", action="store_true", help="smoke mode of every benchmark")
    arguments.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    arguments.add_argument("--out", default=None, help="RESULTS.md path (default benchmarks/RESULTS.md)")
    arguments.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    args = arguments.parse_args(argv)
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    entries = []
    for name in args.only or BENCHMARKS:
        print(f"running {name} ...", flush=True)
        entries.append(run(name, args.small, results_dir, args.timeout))
        print(f"  {entries[-1]['status']} in {entries[-1]['seconds']:.0f} s", flush=True)
    out = Path(args.out) if args.out else HERE / "RESULTS.md"
    write_results(entries, args.small, out)
    (results_dir / "run_all.json").write_text(json.dumps(entries, indent=2))
    print(f"written {out}")
    return 0 if all(e["status"] == "ok" for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
