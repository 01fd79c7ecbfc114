"""The README's citations of tests point at tests that exist.

The guarantees table and the known limits name their evidence in
backquotes as ``test_file.py::test_name`` (a ``*`` for a family of tests,
``[id]`` for one parameter): a test renamed or removed would leave a guarantee citing
nothing. Read from the source (no import, no collection), so this costs
milliseconds.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"`(?:tests/)?(test_\w+\.py)(?:::([\w*]+)(?:\[([^\]`]+)\])?)?`")


def _citations() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    return sorted(set(CITED.findall(text)))


@functools.cache
def _defined(path: Path) -> tuple[list[str], list[str]]:
    """The test functions a file defines, and its string literals (where
    parameter ids are written)."""
    tree = ast.parse(path.read_text())
    names = [node.name for node in ast.walk(tree)
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    strings = [node.value for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    return names, strings


def test_the_readme_cites_tests() -> None:
    # The pattern still finds what the README writes: if the README's way
    # of citing changed, this test would pass on nothing.
    assert len(_citations()) > 50


def test_every_test_the_readme_cites_exists() -> None:
    missing = []
    for file, name, param in _citations():
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
            continue
        if not name:
            continue
        names, strings = _defined(path)
        if not fnmatch.filter(names, name):
            missing.append(f"{file}::{name}")
        elif param and not fnmatch.filter(strings, param):
            missing.append(f"{file}::{name}[{param}] (no such parameter id)")
    assert not missing, "cited in README.md, not in tests/: " + ", ".join(missing)
