"""The shape of the code base: no import cycles, short functions, a wheel that carries its
configs and data."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dsnet.configs import shipped_configs

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dsnet", "pipelines")
MAX_FUNCTION_LINES = 50


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` (a module re-importing itself there is no cycle)."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Every dsnet/pipelines module ``module`` imports, at any depth (function-level and
    ``TYPE_CHECKING`` imports included: a cycle hidden in a function is still a cycle)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    stack = [n for n in ast.parse(path.read_text()).body if not _is_main_guard(n)]
    while stack:
        node = stack.pop()
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.update({target} & known)
            found.update(f"{target}.{a.name}" for a in node.names
                         if f"{target}.{a.name}" in known)
    return found - {module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imported(m, p, set(mods)) for m, p in mods.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    """The check above could fail: a two-module cycle is reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_function_is_longer_than_50_lines():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert long == []


def test_library_never_imports_pipelines():
    mods = _modules()
    library = {m: p for m, p in mods.items() if m.split(".")[0] == "dsnet"}
    bad = {m: sorted(i for i in _imported(m, p, set(mods)) if i.startswith("pipelines"))
           for m, p in library.items()}
    assert {m: v for m, v in bad.items() if v} == {}


# ------------------------------------------------------------------ non-editable install


def _tracked_copy(dest: Path) -> Path:
    """The files git tracks or would track (no .venv, build/ or egg-info of the checkout)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _fresh_venv(path: Path) -> Path:
    """A new venv that sees this interpreter's third-party packages (torch, ray, ...) as a
    plain path, so the checkout's editable dsnet (a finder installed by a .pth file there)
    is not active in it."""
    # No pip of its own: ensurepip's old setuptools would shadow ours (and lack bdist_wheel).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (Path(site) / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``pip install .`` (not editable) of the tracked files into a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _tracked_copy(tmp / "src")
    python = _fresh_venv(tmp / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src)],
                   check=True, cwd=tmp,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    shutil.rmtree(src)  # nothing may come from the source tree any more
    return python, tmp


def _run(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def test_wheel_carries_configs_and_data(installed):
    python, cwd = installed
    code = ("import dsnet, pipelines.cli as cli, dsnet.configs as c, dsnet.data.datasets as d\n"
            "print(dsnet.__file__); print(cli.DEFAULT_CONFIG.is_file())\n"
            "print(sorted(p.name for p in c.shipped_configs()))\n"
            "print(sorted(p.name for p in d.FASHION_MNIST_DIR.iterdir()))")
    out = _run(python, cwd, "-c", code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "site-packages" in lines[0] and str(ROOT) not in lines[0]
    assert lines[1] == "True"
    assert lines[2] == str(sorted(p.name for p in shipped_configs()))
    assert "train-images-idx3-ubyte.gz" in lines[3] and "LICENSE" in lines[3]


def test_installed_commands_find_their_defaults(installed):
    python, cwd = installed
    helped = _run(python, cwd, "-m", "pipelines.full", "--help")
    assert helped.returncode == 0 and "--config" in helped.stdout, helped.stderr
    # A bad key in an otherwise default run: the default config was found and parsed
    # (its error names the key, not a missing file), and nothing started.
    bad = _run(python, cwd, "-m", "pipelines.full", "--set", "supernet.epochs=-1")
    assert bad.returncode == 2, bad.stderr
    assert "epochs" in bad.stderr and "No such file" not in bad.stderr
    assert not (cwd / "results").exists()
