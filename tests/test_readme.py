"""The README's first commands are what CI runs, and every config it names exists."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO


def first_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < 200, "the two commands must open the README"
    return block.group(1).strip().splitlines()


def test_readme_opens_with_exactly_the_two_commands():
    assert first_block() == [
        'pip install -e ".[dev]" && python train.py fit --config configs/quickstart.yaml',
        "python -m pytest",
    ]


def test_ci_script_reads_the_same_two_commands():
    script = REPO / ".ci" / "run"
    extracted = subprocess.run(
        ["bash", "-c", "awk '/^```/{if (inside) exit; inside=1; next} inside' README.md"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()
    assert extracted == first_block()
    assert "awk '/^```/{if (inside) exit; inside=1; next} inside' README.md" in script.read_text()


def test_configs_named_in_the_readme_exist():
    text = (REPO / "README.md").read_text()
    for name in set(re.findall(r"configs/[\w.]+\.yaml", text)):
        assert (REPO / name).is_file(), name
