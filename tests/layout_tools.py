"""Static import analysis of the package (AST only, nothing is imported), for the layout tests."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "so8t"


def module_file(name: str) -> Path | None:
    """``so8t.inference.hf`` -> ``so8t/inference/hf.py`` (or the package's ``__init__.py``: ``so8t.inference``)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = REPO.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def module_name(path: Path) -> str:
    rel = path.resolve().relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def direct_imports(path: Path) -> set[Path]:
    """Package modules imported anywhere in ``path`` (top level or inside functions), with their packages."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    files: set[Path] = set()
    for name in found:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module import runs every enclosing package's __init__
            f = module_file(".".join(parts[:i]))
            if f is not None:
                files.add(f)
    return files


def import_closure(path: Path) -> set[Path]:
    """Every package file executed when ``path`` runs: its imports, theirs, and so on."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        for f in direct_imports(todo.pop()):
            if f not in seen:
                seen.add(f)
                todo.append(f)
    return seen


if __name__ == "__main__":
    # Print the package files a stage script runs, for its `deps` in dvc.yaml:
    #   python tests/layout_tools.py stages/train.py
    import sys

    for arg in sys.argv[1:]:
        script = (REPO / arg).resolve()
        print(f"{arg}:")
        for f in sorted(import_closure(script)):
            print(f"  - {f.relative_to(REPO)}")
