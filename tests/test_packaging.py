"""The wheel holds every package of the source tree (setuptools is given an explicit list)."""

from __future__ import annotations

import tomllib

from tests.conftest import REPO_ROOT


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for init in (REPO_ROOT / "mcp_heal_proxy").rglob("__init__.py")
    }
    assert on_disk <= listed, f"pyproject.toml [tool.setuptools] packages misses {sorted(on_disk - listed)}"
