"""The package's layering: which module imports which (at the top and inside functions), cycles, sizes.

    python scripts/layering.py            # the imports inside functions, any cycle, the longest modules

tests/test_layering.py holds the package to it: no import cycle (imports inside functions counted), at most
`MAX_LOCAL_IMPORTS` imports of the package inside functions, each with a comment that says why, and no
module over `MAX_LINES` lines.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipelines"
MAX_LOCAL_IMPORTS = 15
MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module of the package, dotted
    line: int
    local: bool  # inside a function
    commented: bool  # a comment on its line or the line above


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.level:  # relative: from .x import y (y may be a module)
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
        names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
    else:
        names = [node.module or ""]
        names += [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
    return [n for n in dict.fromkeys(names) if n in known]


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports() -> list[Import]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found = []
    for module, path in sorted(files.items()):
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)

        def walk(node: ast.AST, local: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if _type_checking(child):
                    continue  # annotations only: never executed
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    comment = "#" in lines[child.lineno - 1] or lines[child.lineno - 2].strip().startswith("#")
                    for target in _targets(child, module, path.name == "__init__.py", set(files)):
                        if target != module:
                            found.append(Import(module, target, child.lineno, local, comment))
                walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        walk(tree, False)
    return found


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.module, set()).add(e.target)
        graph.setdefault(e.target, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def line_counts() -> dict[str, int]:
    return {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}


def main() -> int:
    found = imports()
    local = [i for i in found if i.local]
    print(f"imports of the package inside functions: {len(local)} (at most {MAX_LOCAL_IMPORTS})")
    for i in local:
        print(f"  {i.module}:{i.line} -> {i.target}" + ("" if i.commented else "   (no comment)"))
    loops = cycles(found)
    print(f"import cycles: {len(loops)}")
    for loop in loops:
        print("  " + " <-> ".join(loop))
    long = {m: n for m, n in line_counts().items() if n > MAX_LINES}
    print(f"modules over {MAX_LINES} lines: {len(long)}" + "".join(f"\n  {m}: {n}" for m, n in sorted(long.items())))
    return 1 if loops or len(local) > MAX_LOCAL_IMPORTS or long else 0


if __name__ == "__main__":
    sys.exit(main())
