"""The shape of the code: no import cycle (imports inside functions count), small modules, no upward import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "servekit"
MAX_LINES = 400
# Command-line layers: nothing in the core may import them (nor the TorchServe adapters, servekit.handlers).
CLI_MODULES = {"servekit.cli", "servekit.cli_args", "servekit.reload.__main__", "servekit.proxy"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every servekit/handlers/models module a file imports, at any depth of the file (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in ("servekit", "models")}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def test_no_import_cycle_in_servekit():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            # A package's __init__ importing its own submodule is the package, not a cycle.
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


def test_the_core_imports_neither_a_cli_nor_a_model():
    for name, targets in graph().items():
        if name in CLI_MODULES or name.startswith("servekit.bench"):
            continue
        assert not targets & CLI_MODULES, f"{name} imports a command line: {targets & CLI_MODULES}"
    for path in PACKAGE.rglob("*.py"):
        upward = {m for m in imports_of(path) if m.split(".")[0] == "models"}
        if not module_name(path).startswith("servekit.handlers"):
            upward |= {m for m in imports_of(path) if m.startswith("servekit.handlers")}
        assert not upward, f"{module_name(path)} imports {upward}"


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
