"""The examples run as users run them (a subprocess each, a few steps), and the attach example takes
nothing from stacktrain but the callbacks."""

from __future__ import annotations

import ast
import sys

from ddp_harness import REPO, check, run_command

EXAMPLES = REPO / "examples"


def imports(path, package: str = "stacktrain") -> set[str]:
    """The modules of ``package`` that the script at ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == package}
    return found


def test_attach_to_existing_project_adds_each_callback_in_one_line(tmp_path):
    path = EXAMPLES / "attach_to_existing.py"
    assert imports(path) == {"stacktrain.callbacks"}
    result = check(run_command([sys.executable, path, "--steps", "3"], workdir=tmp_path, timeout=240))
    assert "ViT + TokenDropout + GradientQuantization: val/acc" in result.stdout
    assert "CNN + PruneRegrow + GradientQuantization: val/acc" in result.stdout
    assert "FLOPs ratio" in result.stdout
    assert not list(tmp_path.glob("*.png")), "plots go under --root, not into the current directory"
    assert list((tmp_path / "runs" / "attach_to_existing").glob("prune_regrow_widths*.png"))


def test_functional_api_without_a_trainer(tmp_path):
    path = EXAMPLES / "functional_api.py"
    assert imports(path) and all(module.startswith("stacktrain.functional.") for module in imports(path))
    assert not imports(path, "lightning")
    result = check(run_command([sys.executable, path, "--steps", "3"], workdir=tmp_path, timeout=240))
    lines = result.stdout.splitlines()
    for prefix in ("1. token dropping: tokens per training sample 9 instead of 65 for half of the steps", "2. quantization: 4-bit",
                   "3. channel selection: widths [32, 64, 64] -> [", "4. boosting ensemble:"):
        assert any(line.startswith(prefix) for line in lines), prefix
    assert "early-exit loop agrees: True" in result.stdout
