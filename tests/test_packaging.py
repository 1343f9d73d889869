"""A normal (non-editable) install ships every package and module of the project: what
pyproject.toml lists is what the repository holds."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("model", "tokenizer", "data", "train")


def listed(key: str) -> set[str]:
    """The list pyproject.toml's [tool.setuptools] gives for `key` (packages, py-modules)."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(rf"^{key} = (\[.*?\])$", text, re.MULTILINE)
    assert found, f"pyproject.toml has no {key} line"
    return set(ast.literal_eval(found.group(1)))


def test_every_package_is_listed_for_installation():
    packages = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in TOP
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert listed("packages") == packages


def test_every_top_level_module_is_listed_and_the_page_ships():
    modules = {p.stem for p in ROOT.glob("*.py") if p.stem not in ("conftest", "setup")}
    assert listed("py-modules") == modules
    static = ROOT / "train" / "server" / "static"
    kinds = {p.suffix for p in static.iterdir()}
    assert kinds <= {".html", ".css", ".js"}  # each kind named in package-data
