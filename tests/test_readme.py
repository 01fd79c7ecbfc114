"""The README's citations of tests point at tests that exist, and what it
quotes of the code is still the code's.

The guarantees table and the known limits name their evidence in
backquotes as ``test_file.py::test_name`` (a ``*`` for a family of tests,
``[id]`` for one parameter): a test renamed or removed would leave a guarantee citing
nothing. The API section quotes signatures (``serve(..., drain_timeout=25.0,
...)``), defaults (a timeout's "(5 s)" after its name), the CLI's commands and flags
and environment variables: a changed default or a renamed variable would
leave it saying the old one. Read from the source (no import, no
collection; only the CLI's parser is built), so this costs milliseconds.
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


# ------------------------------------------------ what the README quotes of the code
#
# Signatures and default values are quoted in prose, far from the code that
# sets them: a changed default would leave the README saying the old one.
# Read from the source too (module-level constants resolved), except the
# CLI's parser, which is cheap to build (no asyncio, no aiohttp).

SIGNATURE = re.compile(r"`(hotswap(?:\.\w+)+)\(([^`]*)\)`")
SECONDS = re.compile(r"`(\w+)` \((\d+(?:\.\d+)?) s\b")


@functools.cache
def _module(dotted: str) -> ast.Module:
    return ast.parse((ROOT / (dotted.replace(".", "/") + ".py")).read_text())


def _value(node: ast.expr | None, tree: ast.Module) -> object:
    """A default as written: a literal, or a module-level constant's value."""
    if isinstance(node, ast.Name):
        for stmt in tree.body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else \
                [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == node.id for t in targets):
                assert isinstance(stmt, ast.Assign | ast.AnnAssign)
                return _value(stmt.value, tree)
        raise LookupError(node.id)
    return ast.literal_eval(node) if node is not None else None


def _parameters(args: ast.arguments, tree: ast.Module) -> list[tuple[str, str, object]]:
    """(name, kind, default) in order; positional-only counts as positional
    (the README need not write the ``/``)."""
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    found = [(a.arg, "positional", _value(d, tree)) for a, d in zip(positional, defaults,
                                                                      strict=True)]
    if args.vararg is not None:
        found.append((args.vararg.arg, "*", None))
    found += [(a.arg, "keyword", _value(d, tree))
              for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg is not None:
        found.append((args.kwarg.arg, "**", None))
    return found


def _function(dotted: str) -> tuple[ast.FunctionDef | ast.AsyncFunctionDef, ast.Module] | None:
    module, _, name = dotted.rpartition(".")
    if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
        return None
    tree = _module(module)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node, tree
    return None


def test_the_signatures_the_readme_quotes_are_the_codes() -> None:
    checked, wrong = set(), []
    for dotted, params in SIGNATURE.findall((ROOT / "README.md").read_text()):
        if not params:
            continue  # a name, as in "before `hotswap.startup.preload()` can"
        try:  # a signature, not a call (serve(..., on_drain=fn)): a def parses
            quoted = ast.parse(f"def f({params}): pass").body[0]
        except SyntaxError:
            continue
        found = _function(dotted)
        if found is None:
            continue
        node, tree = found
        assert isinstance(quoted, ast.FunctionDef)
        ours = _parameters(quoted.args, ast.Module(body=[], type_ignores=[]))
        theirs = _parameters(node.args, tree)
        if ours != theirs:
            wrong.append(f"{dotted}: README {ours}, code {theirs}")
        checked.add(dotted)
    assert not wrong, "signatures in README.md that the code no longer has: " + "; ".join(wrong)
    assert {"hotswap.aiohttp.serve", "hotswap.startup.preload",
            "hotswap.startup.idle_call"} <= checked


def _defaults() -> dict[str, object]:
    """Options' fields and serve()'s keyword parameters, with their defaults."""
    tree = _module("hotswap.upgrader")
    options = next(node for node in tree.body
                   if isinstance(node, ast.ClassDef) and node.name == "Options")
    found = {stmt.target.id: _value(stmt.value, tree) for stmt in options.body
             if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
             and stmt.value is not None and not isinstance(stmt.value, ast.Call)}
    serve = _function("hotswap.aiohttp.serve")
    assert serve is not None
    for name, kind, default in _parameters(serve[0].args, serve[1]):
        if kind == "keyword":
            assert name not in found, f"{name}: both an Option and a serve() parameter"
            found[name] = default
    return found


def test_the_timeouts_the_readme_gives_in_seconds_are_the_defaults() -> None:
    # "`message_timeout` (5 s; ...)": the README's way of giving a default.
    defaults = _defaults()
    checked, wrong = set(), []
    for name, seconds in SECONDS.findall((ROOT / "README.md").read_text()):
        if name in defaults:
            checked.add(name)
            if defaults[name] != float(seconds):
                wrong.append(f"{name}: README {seconds} s, code {defaults[name]}")
    assert not wrong, "defaults in README.md that the code no longer has: " + "; ".join(wrong)
    assert {"handover_timeout", "connect_timeout", "message_timeout",
            "predecessor_drain_timeout", "cleanup_timeout"} <= checked


def test_the_cli_accepts_what_the_readme_shows() -> None:
    from hotswap.cli import build_parser

    text = (ROOT / "README.md").read_text()
    block = text.split("CLI (`hotswap` or `python -m hotswap`):", 1)[1]
    block = block.split("```sh", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert len(lines) >= 3 and all(line.startswith("hotswap ") for line in lines)
    parser = build_parser()
    for line in lines:
        args = line.replace("[", "").replace("]", "").split()[1:]
        parser.parse_args(args)  # an unknown flag exits (SystemExit): the test fails
    # The flag the prose names, and the probe's default timeout, which
    # probe.sh relies on ("still says "not ready" for a stuck loop (its 2 s
    # timeout)").
    assert parser.parse_args(["status", "--name", "n", "--allow-uid", "0"]).allow_uid == [0]
    probe = parser.parse_args(["probe", "--name", "n"]).timeout
    for seconds in re.findall(r"\(its (\d+(?:\.\d+)?) s timeout\)", " ".join(text.split())):
        assert float(seconds) == probe, f"README: the probe's {seconds} s; code: {probe}"


def test_the_environment_variables_the_readme_names_are_read() -> None:
    named = set(re.findall(r"\b(?:HOTSWAP|SIDECAR|SIDECARSET)_[A-Z_]*[A-Z]\b",
                           (ROOT / "README.md").read_text()))
    assert len(named) > 5
    sources = [path.read_text() for folder in ("hotswap", "scripts", "examples", "tests")
               for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".sh")
               and path.name != "test_readme.py"]
    # Whole names: HOTSWAP_MIGRATE is not read because HOTSWAP_MIGRATE_FAST is.
    unread = sorted(name for name in named
                    if not any(re.search(rf"\b{name}\b", text) for text in sources))
    assert not unread, "environment variables README.md names that nothing reads: " + \
        ", ".join(unread)


def test_each_scripts_header_lists_the_variables_it_reads() -> None:
    # The README: "the header of each script lists what it reads", and
    # sends readers there for the hook's and the probe's settings.
    assert "the header of each script lists what it reads" in \
        " ".join((ROOT / "README.md").read_text().split())
    unlisted = []
    for script in ("migrate.sh", "probe.sh"):
        lines = (ROOT / "scripts" / script).read_text().splitlines()
        end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
        header, body = "\n".join(lines[:end]), "\n".join(lines[end:])
        read = set(re.findall(r"\$\{?((?:HOTSWAP|SIDECARSET)_[A-Z_]*[A-Z])\b", body))
        assert read, f"{script}: the pattern finds no variable"
        unlisted += [f"{script}: {name}" for name in sorted(read)
                     if not re.search(rf"\b{name}\b", header)]
    assert not unlisted, "read but not listed in the script's header: " + ", ".join(unlisted)
