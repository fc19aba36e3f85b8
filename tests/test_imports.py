"""The import structure: the contract (``producer/``) is imported downward only, and no project
modules import each other in a circle.

Read from the source (ast), so that an import inside a function counts as much as one at the
top: it runs later, but it ties the two modules together all the same.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("producer", "worker", "ops")

#: The only imports of ``worker`` in ``producer/``: the CLI's worker-side commands, which start
#: or build worker things and import them inside the command. ``(module, function, imported)``.
WORKER_SIDE_COMMANDS = frozenset(
    {
        ("producer.cli_worker", "SettingsEpilog.format_epilog", "worker.settings"),  # `deepqueue worker --help`
        ("producer.cli_worker", "worker", "worker.cli"),  # `deepqueue worker`
        ("producer.cli_worker", "run_embedded", "worker.cli"),  # `deepqueue run`
        ("producer.cli_worker", "make_test_model", "worker.pipeline.testmodel"),  # `deepqueue make-test-model`
        ("producer.cli_worker", "make_test_lora", "worker.pipeline.testlora"),  # `deepqueue make-test-lora`
    }
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    line: int
    function: str | None  # the enclosing function's qualified name; None at module level
    target: str  # the project module (or package) imported


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(module: str, is_package: bool, node: ast.AST, modules: set[str]) -> Iterator[str]:
    """The project modules ``node`` imports: ``from X import Y`` is ``X.Y`` when Y is a submodule."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        source = _resolve(module, is_package, node)
        names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names]
    else:
        return
    for name in dict.fromkeys(names):
        while name and name not in modules:  # `import a.b.c` of an attribute path: its module
            name = name.rpartition(".")[0]
        if name:
            yield name


def imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of a project module, with where it is."""
    found = []
    names = set(modules)

    def visit(module: str, is_package: bool, node: ast.AST, function: str | None, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{scope}{child.name}"
                visit(module, is_package, child, name, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(module, is_package, child, function, f"{scope}{child.name}.")
            else:
                for target in _targets(module, is_package, child, names):
                    found.append(Import(module, child.lineno, function, target))
                visit(module, is_package, child, function, scope)

    for module, path in modules.items():
        visit(module, path.name == "__init__.py", ast.parse(path.read_text(), str(path)), None, "")
    return found


def circles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(frozenset(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def _shown(found: list[Import]) -> str:
    lines = (f"  {item.module} line {item.line} ({item.function or 'module level'}): {item.target}" for item in found)
    return "\n".join(lines)


def test_the_graph_sees_imports_inside_functions() -> None:
    found = imports(project_modules())
    assert any(
        item.module == "worker.pipeline.engine"
        and item.function == "load_engine"
        and item.target == "worker.pipeline.simulated"
        for item in found
    )
    assert any(item.module == "producer.client" and item.target == "producer.audit" for item in found)


def test_producer_imports_worker_only_in_the_clis_worker_side_commands() -> None:
    found = [item for item in imports(project_modules()) if item.module.split(".")[0] == "producer"]
    on_worker = [item for item in found if item.target.split(".")[0] == "worker"]
    at_module_level = [item for item in on_worker if item.function is None]
    assert not at_module_level, "producer imports worker at module level:\n" + _shown(at_module_level)
    unexpected = [item for item in on_worker if (item.module, item.function, item.target) not in WORKER_SIDE_COMMANDS]
    assert not unexpected, "producer imports worker outside the CLI's worker-side commands:\n" + _shown(unexpected)


def test_no_import_circles_among_project_modules() -> None:
    found = imports(project_modules())
    edges: dict[str, set[str]] = {}
    for item in found:
        if item.target != item.module:
            edges.setdefault(item.module, set()).add(item.target)
    every = circles(edges)
    report = "\n".join(
        f"  {' <-> '.join(sorted(circle))}\n"
        + _shown([item for item in found if item.module in circle and item.target in circle])
        for circle in every
    )
    assert not every, f"import circles (imports inside functions count):\n{report}"


def test_circles_finds_what_it_should() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert circles({"a": {"b"}, "b": set()}) == []
