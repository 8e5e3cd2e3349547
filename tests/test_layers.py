"""The package's import contract: one level of subpackages in layers, each importing only the
layers below it, and no circle between modules (docs/layout.md draws the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"

# Lowest first. A module may import modules of lower layers and of its own subpackage; models and
# report stand side by side and do not import each other.
# audit (the dataset audit) builds on training's cached features and sits below the commands.
LAYERS = {"errors": 0, "utils": 1, "config": 2, "data": 3, "models": 4, "report": 4, "training": 5,
          "audit": 6, "commands": 7, "api": 8}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """Each finetune module that ``path`` imports: (name, line, whether inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "finetune":
                if child.module == "finetune":  # from finetune import x: x is a subpackage or a name
                    found.extend([(f"finetune.{a.name}", child.lineno, local) for a in child.names
                                  if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file()])
                else:
                    found.append((child.module, child.lineno, local))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, local) for a in child.names if a.name.split(".")[0] == "finetune")
            visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def layer(module: str) -> str | None:
    """The layer a module belongs to (its subpackage, or the top-level module's own name)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_in_a_known_layer():
    unknown = [m for m in MODULES if m != "finetune" and layer(m) not in LAYERS]
    assert not unknown, f"modules outside the layers {sorted(LAYERS)}: {unknown}"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "finetune"])
def test_imports_only_run_down_the_layers(module):
    own = layer(module)
    upward = []
    for target, line, _ in imports_of(MODULES[module]):
        other = layer(target)
        if other is None or other == own:
            continue
        if LAYERS[other] >= LAYERS[own]:
            upward.append(f"line {line}: {target} ({other}, layer {LAYERS[other]})")
    assert not upward, f"{module} ({own}, layer {LAYERS[own]}) imports at or above its layer: {upward}"


def test_no_circles_between_modules():
    graph = {m: {t for t, _, _ in imports_of(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    graph["finetune"] = set()  # the lazy top-level exports are loaded on first use, not on import
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            pytest.fail("circle: " + " -> ".join(cycle))


def explained(lines: list[str], line: int) -> bool:
    """Whether the import on ``line`` (1-based), or the block of imports it closes, carries a comment
    on one of its lines or on the line above the block."""
    index = line - 1
    while True:
        if "#" in lines[index]:
            return True
        above = lines[index - 1].strip() if index else ""
        if not above and index > 1 and lines[index - 2].strip().startswith(("from ", "import ", "#")):
            index -= 1  # the blank line between the import groups (stdlib, third party, ours)
            continue
        if not above.startswith(("from ", "import ", "#")) and not above.endswith(","):
            return False
        index -= 1


def test_function_local_imports_of_the_package_say_why():
    """Imports go at the top; a local one (a command's --help answering before torch loads) has a
    comment saying so, on its line or above its block of imports."""
    unexplained = []
    for module, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, local in imports_of(path):
            if local and module != "finetune" and not explained(lines, line):
                unexplained.append(f"{module}:{line} imports {target}")
    assert not unexplained, f"function-local imports without a comment: {unexplained}"
