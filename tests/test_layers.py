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
