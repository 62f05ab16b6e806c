"""The house: contracts (vaegen/) at the bottom, the three stages in the middle, orchestration (studies/) on top.
Imports run only downward, and the stages do not import each other (the evaluator may rebuild a VAE from the
trainer's model definitions)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("vaegen", "generator", "trainer", "evaluator", "studies")
ALLOWED = {
    "vaegen": {"vaegen"},
    "generator": {"vaegen", "generator"},
    "trainer": {"vaegen", "trainer"},
    "evaluator": {"vaegen", "evaluator", "trainer"},
    "studies": set(PACKAGES),
}
# `python -m vaegen` (torchrun's `-m vaegen ...`) is a program that starts the command group on the top floor;
# nothing imports it.
LAUNCHERS = {REPO / "vaegen" / "__main__.py"}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def test_imports_run_only_down_the_layers():
    upward = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path in LAUNCHERS:
                continue
            for target in sorted(imported_packages(path) - ALLOWED[package]):
                upward.append(f"{path.relative_to(REPO)} imports {target}")
    assert not upward, upward


def test_no_module_imports_another_that_imports_it_back():
    graph = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            targets = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
                elif isinstance(node, ast.Import):
                    targets |= {a.name for a in node.names}
            graph[module] = {t for t in targets if t.split(".")[0] in PACKAGES}
    modules = set(graph)
    edges = {m: {t for t in graph[m] if t in modules and t != m} for m in modules}

    def reaches(start, goal, seen=()):
        return any(t == goal or (t not in seen and reaches(t, goal, (*seen, t))) for t in edges[start])

    cycles = sorted(f"{a} <-> {b}" for a in modules for b in edges[a] if a < b and reaches(b, a))
    assert not cycles, cycles
