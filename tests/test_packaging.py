"""The wheel lists its packages by hand (pyproject.toml): every code package of the tree must be
among them, or a non-editable install misses it (it happened after two folder moves)."""
from __future__ import annotations

import os
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_code_package_ships_in_the_wheel():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("dispo_ray", "actors"):
        for d, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            if "__init__.py" in files:
                found.add(os.path.relpath(d, REPO).replace(os.sep, "."))
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
