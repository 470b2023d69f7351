"""The package's shape: imports only go down the pipeline, and every stage depends on the code it runs.

DVC reruns a stage when one of its ``deps`` changes, so a stage whose ``deps`` miss a
module it imports would keep stale outputs after that module is edited. The import
closure of each stage script is computed statically (AST, :mod:`layout_tools`) and
compared with ``dvc.yaml``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from layout_tools import REPO, direct_imports, import_closure, module_name

#: Phases in pipeline order; a module may import its own phase and the ones before it.
#: ``inference`` (the backends and decision scoring) sits under every phase that runs a model, so
#: ``data`` (the teacher), ``eval`` and ``runtime`` import one implementation of it.
#: ``distill`` and ``runtime`` both sit at the end and never import each other.
LAYERS: dict[str, int] = {"core": 0, "inference": 1, "data": 2, "model": 3, "eval": 4, "distill": 5, "runtime": 5}

#: Modules a stage may import without listing them in its deps: presentation only, never
#: changing an output. Empty: even the progress bars (so8t/console.py) are listed, since the
#: same module picks the thread count.
PRESENTATION_ONLY: set[str] = set()

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _phase(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LAYERS else "core"


def _package_files() -> list[Path]:
    return sorted((REPO / "so8t").rglob("*.py"))


def _body(stage: dict) -> dict:
    """A stage's definition; a ``foreach`` stage's is its ``do`` (one per row, same code)."""
    return stage["do"] if "foreach" in stage else stage


def _script(stage: dict) -> Path:
    return REPO / next(w for w in _body(stage)["cmd"].split() if w.endswith(".py"))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_module_is_a_dependency(name):
    stage = _body(STAGES[name])
    deps = {str(d) if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}

    def covered(rel: str) -> bool:
        return rel in deps or any(rel.startswith(d.rstrip("/") + "/") for d in deps)

    script = _script(stage)
    assert covered(str(script.relative_to(REPO))), f"stage {name}: its script {script} is not in its deps"
    missing = sorted(
        rel
        for f in import_closure(script)
        if not covered(rel := str(f.relative_to(REPO))) and module_name(f) not in PRESENTATION_ONLY
    )
    assert not missing, f"stage {name} imports {missing} but dvc.yaml does not list them in its deps"


def test_the_closure_follows_imports_inside_functions(tmp_path):
    """A lazy import (inside a function, as the distill stages do) counts like a top-level one."""
    closure = {module_name(f) for f in import_closure(REPO / "stages" / "distill.py")}
    assert {"so8t.distill.pipeline", "so8t.model.trainer", "so8t.inference", "so8t.schema"} <= closure
    assert "so8t.model.train" not in closure  # distill reuses the components, never the train stage's recipe


def test_imports_only_go_down_the_pipeline():
    bad = []
    for f in _package_files():
        mod = module_name(f)
        here = _phase(mod)
        for g in direct_imports(f):
            other = module_name(g)
            there = _phase(other)
            if LAYERS[there] > LAYERS[here] or (LAYERS[there] == LAYERS[here] and there != here):
                bad.append(f"{mod} ({here}) imports {other} ({there})")
    assert not bad, "imports against the pipeline order core -> data -> model -> eval -> distill/runtime:\n" + "\n".join(bad)


def test_every_phase_is_a_subpackage_with_a_docstring():
    for phase in LAYERS:
        if phase == "core":
            continue
        init = REPO / "so8t" / phase / "__init__.py"
        assert init.is_file(), f"so8t/{phase}/ is not a package"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"


@pytest.mark.parametrize("script", sorted((REPO / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stage_scripts_are_thin(script):
    """A stage reads params, calls the package, writes outputs: ``main()`` of at most ~50 lines."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    (main,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert main.end_lineno - main.lineno + 1 <= 50, f"{script.name}: main() has {main.end_lineno - main.lineno + 1} lines"


#: Modules allowed past :data:`MAX_MODULE_LINES`: a cohesive table of formats (its docstring is the table).
LONG_MODULES: set[str] = {"so8t/data/readers.py"}
#: One concern per module: past this a module is split (torchtune's recipes / modules / training).
MAX_MODULE_LINES = 800
#: Longest function or method body, not counting its docstring.
MAX_FUNCTION_LINES = 80


def test_no_module_is_too_long():
    long = [
        f"{rel}: {n} lines"
        for f in _package_files()
        if (rel := str(f.relative_to(REPO))) not in LONG_MODULES
        and (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern):\n" + "\n".join(long)


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    n = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(
        first.value.value, str
    ):
        n -= first.end_lineno - first.lineno + 1
    return n


def test_no_function_is_too_long():
    long = [
        f"{f.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines"
        for f in _package_files()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (n := _body_lines(node)) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without their docstring:\n" + "\n".join(long)
