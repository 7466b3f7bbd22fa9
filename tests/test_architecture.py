"""The layering rules of the package, checked from its source (see README, "How the code is
laid out"): cli → cluster → mil → wsi, one owner for errors, no private names across modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gigamil"
MAX_LINES = 400
MODULES = {p.relative_to(PKG.parent).as_posix(): p.read_text() for p in PKG.rglob("*.py")}


def _imports(source: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names)
    return found


def test_modules_are_small_or_say_why() -> None:
    long = {m: s.count("\n") for m, s in MODULES.items() if s.count("\n") > MAX_LINES}
    unexplained = [m for m, s in MODULES.items() if m in long
                   and not s.lstrip().startswith("# cohesive:")]
    assert not unexplained, long
    assert len(long) <= 2, long


@pytest.mark.parametrize(("package", "forbidden"), [
    ("gigamil/wsi/", r"^torch(\.|$)"),          # slide I/O imports no torch
    ("gigamil/mil/", r"^gigamil\.cluster"),      # models and MIL never know where they run
    ("gigamil/wsi/", r"^gigamil\.(cluster|mil)"),
])
def test_imports_point_one_way(package: str, forbidden: str) -> None:
    bad = [f"{m}:{line} {mod}" for m, s in MODULES.items() if m.startswith(package)
           for line, mod, _ in _imports(s) if re.match(forbidden, mod)]
    assert not bad


def test_nothing_imports_the_cli_and_no_private_names_cross_modules() -> None:
    cli, private = [], []
    for m, s in MODULES.items():
        for line, mod, names in _imports(s):
            if mod.startswith("gigamil.cli") and not m.startswith("gigamil/cli/") \
                    and m != "gigamil/__main__.py":
                cli.append(f"{m}:{line}")
            if mod.startswith("gigamil"):
                private += [f"{m}:{line} {mod}.{n}" for n in names
                            if n.startswith("_") and not n.startswith("__")]
    assert not cli and not private, (cli, private)


def test_every_exception_lives_in_errors() -> None:
    outside = []
    for m, s in MODULES.items():
        if m == "gigamil/errors.py":
            continue
        for node in ast.walk(ast.parse(s)):
            if isinstance(node, ast.ClassDef) and any(
                    re.search(r"(Error|Exception|Interrupt)\b", ast.unparse(b)) for b in node.bases):
                outside.append(f"{m}:{node.lineno} {node.name}")
    assert not outside


def test_the_cli_holds_no_run_layout_or_executor_logic() -> None:
    bad = [m for m, s in MODULES.items() if m.startswith("gigamil/cli/")
           and re.search(r"torch\.load|checkpoints/|best\.pt|is_slurm|\.submit\(", s)]
    assert not bad
