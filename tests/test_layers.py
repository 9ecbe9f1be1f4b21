"""The architecture, checked: import-linter's contracts in pyproject.toml (layers import only
downward; no import cycles), and that the checker really fails on a violation."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(root: str) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=root))


def test_the_layering_holds():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in r.stdout


def test_an_upward_import_and_a_cycle_are_caught(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "docs", "runs", "build", "tests",
                                                               "__pycache__", "*.png"))
    with open(copy / "dispo_ray" / "algorithm" / "windows.py", "a") as f:
        f.write("\nfrom dispo_ray.rollout import driver  # noqa: E402,F401 - upward, and a cycle\n")
    r = _lint(str(copy))
    assert r.returncode != 0
    assert "Contracts: 0 kept, 2 broken." in r.stdout, r.stdout[-3000:]
    assert "dispo_ray.algorithm.windows -> dispo_ray.rollout.driver" in r.stdout
