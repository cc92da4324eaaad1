"""The package import graph of components/ and pipelines/, read from the source with `ast` (nothing is imported), and
the rules it must keep (tests/unit/test_import_graph.py):

- no cycle between packages (an import inside a function counts as much as one at the top of a module);
- no private name (`_name`, or a name imported from a `_module`) imported from another package;
- `components/` never imports `pipelines/`, and `components.core` imports no step package;
- no module over MAX_LINES lines;
- every import of ours is written with its installed name, `kfp_finetune.components...` (`import components` would
  load a second copy of a module from a source checkout, and fails where the wheel is installed).

A package is `pipelines`, `components` (its own `__init__.py`: the version), or one sub-package of `components`
(`components.core`, `components.ingest`, ...; a sub-package nested deeper belongs to its step).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TOP = ("components", "pipelines")
# The installed name of the two folders (setup.cfg's package_dir): imports are written with it.
PREFIX = "kfp_finetune."
CORE = "components.core"
MAX_LINES = 500


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)  # dotted name (without PREFIX) -> file
    edges: dict[str, set[str]] = field(default_factory=dict)  # package -> packages it imports
    why: dict[tuple[str, str], str] = field(default_factory=dict)  # (package, package) -> one import that made it
    private: list[str] = field(default_factory=list)
    long_modules: list[str] = field(default_factory=list)
    unprefixed: list[str] = field(default_factory=list)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "components" and len(parts) >= 3:
        return ".".join(parts[:2])
    if parts[0] == "components" and len(parts) == 2:
        return module if _is_package_name(module) else "components"
    return parts[0]


_PACKAGES: set[str] = set()


def _is_package_name(module: str) -> bool:
    return module in _PACKAGES


def _strip(name: str) -> str | None:
    """The dotted name without PREFIX when it names one of our modules, else None."""
    if name.startswith(PREFIX):
        name = name[len(PREFIX) :]
    return name if name.split(".")[0] in TOP else None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def unprefixed_imports(tree: ast.AST) -> Iterable[tuple[str, int]]:
    """(module, line) of every absolute import of `components...` / `pipelines...` without PREFIX."""
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        for name in names:
            if name.split(".")[0] in TOP:
                yield name, node.lineno


def imports_of(module: str, is_package: bool, tree: ast.AST) -> Iterable[tuple[str, str | None, int]]:
    """(target module, imported name or None, line) for every import of ours in the module, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _strip(alias.name)
                if target:
                    yield target, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = _strip(node.module or "")
            if target:
                for alias in node.names:
                    yield target, alias.name, node.lineno


def build(root: Path) -> Graph:
    graph = Graph()
    files = sorted(p for top in TOP if (root / top).is_dir() for p in (root / top).rglob("*.py"))
    _PACKAGES.clear()
    for path in files:
        name = module_name(root, path)
        graph.modules[name] = path
        if path.name == "__init__.py":
            _PACKAGES.add(name)
    for name, path in graph.modules.items():
        text = path.read_text()
        lines = len(text.splitlines())
        rel = path.relative_to(root)
        if lines > MAX_LINES:
            graph.long_modules.append(f"{rel}: {lines} lines (at most {MAX_LINES})")
        package = package_of(name)
        graph.edges.setdefault(package, set())
        tree = ast.parse(text, str(path))
        graph.unprefixed += [f"{rel}:{line} imports {target}: write {PREFIX}{target}"
                             for target, line in unprefixed_imports(tree)]
        for target, imported, line in imports_of(name, path.name == "__init__.py", tree):
            if imported is not None and f"{target}.{imported}" in graph.modules:
                target, imported = f"{target}.{imported}", None  # `from package import module`
            other = package_of(target)
            if other == package:
                continue
            graph.edges[package].add(other)
            graph.why.setdefault((package, other), f"{rel}:{line} imports {target}")
            names = [p for p in target.split(".")] + ([imported] if imported else [])
            if any(_private(part) for part in names):
                shown = f"{target}.{imported}" if imported else target
                graph.private.append(f"{rel}:{line} imports the private {shown} from package {other}")
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Every strongly connected set of packages with more than one member (Tarjan), each as a list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph.edges):
        if node not in index:
            visit(node)
    return found


def layer_violations(graph: Graph) -> list[str]:
    """Imports that climb: components -> pipelines, core -> a step."""
    bad = []
    for (source, target), why in sorted(graph.why.items()):
        if source.startswith("components") and target == "pipelines":
            bad.append(f"{why}: components/ must not import pipelines/")
        if source == CORE and target not in ("components",):
            bad.append(f"{why}: components.core must import no step package")
        if source == "components" and target != "components":
            bad.append(f"{why}: components/__init__.py must import nothing (every package imports it)")
    return bad


def problems(root: Path) -> list[str]:
    """Every broken rule, one line each (empty when the tree keeps them all)."""
    graph = build(root)
    found = []
    for group in cycles(graph):
        edges = [graph.why[(a, b)] for a in group for b in group if (a, b) in graph.why]
        found.append(f"import cycle between packages {', '.join(group)}: " + "; ".join(edges))
    found += graph.private
    found += layer_violations(graph)
    found += graph.long_modules
    found += graph.unprefixed
    return found


def unprefixed_elsewhere(root: Path, folders: Iterable[str] = ("tests", "bench")) -> list[str]:
    """The same prefix rule for the test suite and the benchmarks."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            found += [f"{path.relative_to(root)}:{line} imports {target}: write {PREFIX}{target}"
                      for target, line in unprefixed_imports(tree)]
    return found
