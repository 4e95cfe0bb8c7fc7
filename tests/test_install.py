"""`pip install .` and `pip install -e .` both give stacktrain.callbacks / lightning_modules /
datamodules from outside the repository, and no top-level `callbacks` or `datamodules` module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, stacktrain.callbacks, stacktrain.lightning_modules, stacktrain.datamodules
from stacktrain.callbacks import EfficiencyReport
from stacktrain.datamodules.make_shards import main
print(json.dumps({
    "callbacks": stacktrain.callbacks.__file__,
    "lightning_modules": stacktrain.lightning_modules.__file__,
    "datamodules": stacktrain.datamodules.__file__,
    "top_level": [name for name in ("callbacks", "lightning_modules", "datamodules")
                  if importlib.util.find_spec(name) is not None],
}))
"""


def _venv_with_dependencies(path: Path) -> Path:
    """A fresh venv without stacktrain; it sees this environment's dependencies through a plain path
    entry (not a site dir, so this environment's own stacktrain install is invisible)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "outer_dependencies.pth").write_text("\n".join(sorted(outer)) + "\n")
    return python


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_install_from_outside_the_repository(tmp_path, editable):
    import json

    python = _venv_with_dependencies(tmp_path / "venv")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    before = subprocess.run([python, "-c", "import stacktrain"], cwd=outside, capture_output=True, text=True)
    assert before.returncode != 0, "the fresh venv must not see another stacktrain install"
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
               "--no-index", "-q"]
    command += ["-e", str(REPO)] if editable else [str(REPO)]
    env = dict(os.environ, PIP_NO_INDEX="1")
    built_before = (REPO / "build").exists()
    try:
        subprocess.run(command, check=True, cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    finally:  # a regular install builds in the source tree: leave the repository as it was
        if not built_before:
            shutil.rmtree(REPO / "build", ignore_errors=True)
    probe = subprocess.run([python, "-c", PROBE], cwd=outside, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["top_level"] == []
    for name in ("callbacks", "lightning_modules", "datamodules"):
        where = Path(found[name])
        if editable:
            assert where == REPO / name / "__init__.py"
        else:
            assert (tmp_path / "venv") in where.parents and where.parent.name == name
            assert where.parent.parent.name == "stacktrain"
