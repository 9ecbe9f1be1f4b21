"""The README and docs/ stay true to the repository: links resolve, the README stays a first screen,
the configuration page names every key, and the two commands are where a newcomer looks. No Ray."""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any, Iterator, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CONFIG_PAGE = os.path.join(ROOT, "docs", "configuration.md")
README_MAX_LINES = 200

# Config keys docs/configuration.md need not name, each with its reason. Empty today: every key
# of the composed default config has a row there.
UNDOCUMENTED_KEYS: dict = {}

# [text](target) and ![alt](target); reference-style links are not used in these pages.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _pages() -> List[str]:
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def _strip_code(text: str) -> str:
    """Markdown outside fenced code blocks (a diagram or a shell line is not a link)."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _relative_links(path: str) -> Iterator[Tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        text = _strip_code(f.read())
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s):, mailto:, an anchor on the same page
        yield text.count("\n", 0, m.start()) + 1, target


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for page in _pages():
        for line, target in _relative_links(page):
            file_part = target.split("#", 1)[0]
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(page), file_part))):
                broken.append(f"{os.path.relpath(page, ROOT)}:{line}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_first_screen_with_the_commands():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
    for command in ("make run", "make test"):
        assert command in text, f"README.md does not show `{command}`"


def _leaf_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _leaf_keys(getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    else:
        yield prefix


def test_every_config_key_is_on_the_configuration_page():
    from dispo_ray.infra.config import compose

    keys = list(_leaf_keys(compose([])))
    assert len(keys) > 100, keys  # the walk reached the leaves
    with open(CONFIG_PAGE, encoding="utf-8") as f:
        page = f.read()
    missing = [k for k in keys if k not in UNDOCUMENTED_KEYS and f"`{k}`" not in page]
    assert not missing, "docs/configuration.md does not name: " + ", ".join(missing)
    stale = [k for k in UNDOCUMENTED_KEYS if k not in keys]
    assert not stale, f"UNDOCUMENTED_KEYS lists keys the config no longer has: {stale}"
