"""The shape of the tree that issue 25 set: no import cycle between the project's modules, and no
module or function grown past what a reader takes in at once."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "bridge", "common", "consumer", "publisher", "rabbitmq", "stack")
# Largest module (lines) per package, and the longest function, where issue 25 set one.
MODULE_LIMITS = {"bridge": 300, "publisher": 400, "consumer": 400, "rabbitmq": 400}
FUNCTION_LIMIT = 60
FUNCTION_LIMITED = ("bridge", "publisher", "consumer", "rabbitmq")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    modules = project_modules()
    # A package's __init__ is not an edge of its own: `from bridge import x` names module x.
    graph = {name: {target for target in imports_of(path, modules) if target != name
                    and not (path.name != "__init__.py" and name.startswith(target + "."))}
             for name, path in modules.items()}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("package", sorted(MODULE_LIMITS))
def test_no_module_over_its_package_limit(package):
    limit = MODULE_LIMITS[package]
    too_long = {str(path.relative_to(ROOT)): lines for path in (ROOT / package).rglob("*.py")
                if (lines := len(path.read_text(encoding="utf-8").splitlines())) > limit}
    assert too_long == {}, f"over {limit} lines"


@pytest.mark.parametrize("package", FUNCTION_LIMITED)
def test_no_function_over_the_limit(package):
    too_long = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LIMIT:
                    too_long[f"{path.relative_to(ROOT)}:{node.name}"] = length
    assert too_long == {}, f"over {FUNCTION_LIMIT} lines"


def test_the_forwarder_reads_in_one_sitting():
    assert len((ROOT / "bridge" / "forwarder.py").read_text(encoding="utf-8").splitlines()) < 200
