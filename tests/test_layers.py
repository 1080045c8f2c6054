"""bench/'s layers: arrows point down, there is no import cycle, and an import inside a function says why.

cli -> commands' library (harness, sft, kernel_speed, gpu_check) -> measurement library (pinpoint,
checks, compare, timing, results, ...) -> qwen_layers.registry -> kernels / backends. Read from the
source with ``ast`` (nothing is imported), so the test sees imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "qwen_layers", "kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "benchmarks" not in p.parts}


def _imports(name: str, path: Path):
    """(imported module, line, inside a function?) for every import of a project module in ``path``."""
    tree = ast.parse(path.read_text())
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # "from bench import checks" imports the module bench.checks
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                yield t, node.lineno, id(node) in in_function


SOURCES = _sources()
GRAPH = {name: list(_imports(name, path)) for name, path in SOURCES.items()}


def _is_cli(name: str) -> bool:
    return name == "bench.cli" or name.startswith("bench.cli.") or name == "bench.__main__"


@pytest.mark.parametrize("module", [m for m in SOURCES if not _is_cli(m)])
def test_library_never_imports_the_cli(module):
    up = [f"line {line}: {target}" for target, line, _ in GRAPH[module] if _is_cli(target)]
    assert not up, f"{module} imports the command line (arrows point down): {up}"


@pytest.mark.parametrize("module", [m for m in SOURCES if m.startswith(("qwen_layers", "kernels"))])
def test_model_and_kernels_never_import_bench(module):
    up = [f"line {line}: {target}" for target, line, _ in GRAPH[module] if target.split(".")[0] == "bench"]
    assert not up, f"{module} imports bench/ (the harness sits above the model and kernels): {up}"


def test_no_import_cycle():
    """Module-level imports between project modules form no cycle (a package imports its own modules)."""
    edges = {m: {t for t, _, inside in deps if not inside and t in SOURCES and t != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if m.startswith(t + "."):  # a submodule importing its own package's __init__: executed first
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_inside_functions_say_why(module):
    """An import of a project module inside a function is allowed only with a comment giving the reason
    (an optional dependency behind it, or a package that may be foreign)."""
    lines = SOURCES[module].read_text().splitlines()
    silent = [f"line {line}: {target}" for target, line, inside in GRAPH[module]
              if inside and "#" not in lines[line - 1]]
    assert not silent, f"{module}: imports inside functions without a reason: {silent}"


def test_the_check_can_fail(tmp_path):
    """The graph reader sees a library module importing the CLI from inside a function."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bench.cli import UsageError\n    return UsageError\n")
    assert [(t, inside) for t, _, inside in _imports("bench.bad", bad)] == [("bench.cli", True)]
