"""The layers of docs/architecture.md are enforced: `lint-imports` passes on this tree and fails on an upward import."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

UPWARD_IMPORT = "\nfrom hubkit.finetune import task  # noqa: E402,F401  (a hub module importing the top of the stack)\n"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with ``root``'s setup.cfg contracts, over the ``hubkit`` package in ``root``."""
    script = Path(sys.executable).parent / "lint-imports"
    command = str(script) if script.exists() else shutil.which("lint-imports")
    assert command, "import-linter is not installed (pip install -e '.[test]')"
    return subprocess.run([command, "--no-cache", "setup.cfg"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_lint_imports_passes_here_and_fails_on_an_upward_import(tmp_path):
    clean = lint_imports(REPO)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 broken" in clean.stdout

    shutil.copytree(REPO / "hubkit", tmp_path / "hubkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    with open(tmp_path / "hubkit" / "hub" / "fs.py", "a") as f:
        f.write(UPWARD_IMPORT)
    broken = lint_imports(tmp_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "hubkit.hub.fs -> hubkit.finetune.task" in broken.stdout  # both contracts name the offending import
    assert "0 broken" not in broken.stdout  # the layers and the torch-free contracts all see it


def test_no_import_cycles_among_hubkit_modules():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "import_cycles.py")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 import cycle(s)" in proc.stdout
