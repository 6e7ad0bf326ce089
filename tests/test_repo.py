"""Repository hygiene: CI runs the README's test command; the library never imports Ray;
test modules share helpers through tests/helpers.py, never through each other."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_quick_start_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "pipelines.full" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci


def test_library_does_not_import_ray():
    code = ("import sys, pkgutil, importlib, dsnet\n"
            "for m in pkgutil.walk_packages(dsnet.__path__, 'dsnet.'):\n"
            "    importlib.import_module(m.name)\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def imported_modules(tree: ast.AST) -> set[str]:
    """Every module an ``import`` / ``from ... import`` names (``from a import b``: ``a`` and
    ``a.b``, as ``b`` may be a module), at any depth of the file."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):       # module None: ``from . import x``
            base = f"{node.module}." if node.module else ""
            names.update([node.module] if node.module else [])
            names.update(base + alias.name for alias in node.names)
    return names


def test_test_modules_do_not_import_each_other():
    offenders = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        found = sorted(m for m in imported_modules(ast.parse(path.read_text()))
                       if re.fullmatch(r"(tests\.)?test_\w+(\..*)?", m))
        if found:
            offenders[path.name] = found
    assert not offenders, f"import shared helpers from tests.helpers instead: {offenders}"
