"""The house's layers, read from the code's imports (every import, those under TYPE_CHECKING
and inside functions too): no module reaches back up to one that imports it, and the backend
never imports the HTTP side."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.served import ROOT


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of backends/ and service.py -> the modules of the house it imports."""
    paths = [*ROOT.glob("backends/**/*.py"), ROOT / "service.py"]
    modules = {module_name(path): path for path in paths}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    if target in modules and target != name:
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules} - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert circles(import_graph()) == []


def test_the_backend_never_imports_the_http_side():
    graph = import_graph()
    assert {
        (module, imported)
        for module, imports in graph.items()
        if module.startswith("backends.sdxl_backend")
        for imported in imports
        if imported.startswith("backends.api") or imported == "service"
    } == set()


def test_a_circle_is_found_where_there_is_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def house_modules() -> list[Path]:
    return [*ROOT.glob("backends/**/*.py"), *ROOT.glob("models/**/*.py"), ROOT / "service.py"]


def test_no_module_is_over_400_lines():
    assert {
        str(path.relative_to(ROOT)): lines
        for path in house_modules()
        if (lines := len(path.read_text().splitlines())) > 400
    } == {}


def test_no_folder_holds_more_than_12_modules_at_its_top_level():
    """A newcomer sees the layers from the tree: past a dozen modules, a folder is grouped by concern."""
    folders = {path.parent for path in house_modules()}
    assert {
        str(folder.relative_to(ROOT)): count
        for folder in folders
        if (count := len([p for p in folder.glob("*.py") if p.name != "__init__.py"])) > 12
    } == {}


def test_the_routes_reach_the_backend_through_the_runtime_only():
    """The one door: outside the composition, nothing reaches past the runtime to its engine,
    job store or devices (`runtime.engine...`): the routes ask the runtime's own methods."""
    behind_the_door = {"engine", "jobs", "devices", "fleet"}
    reached = set()
    for path in [*ROOT.glob("backends/api/**/*.py"), ROOT / "service.py"]:
        if "composition" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in behind_the_door:
                holder = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
                if holder == "runtime":
                    reached.add(f"{path.relative_to(ROOT)}: runtime.{node.attr}")
    assert reached == set()
