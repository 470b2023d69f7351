"""Every dotted ``so8t.`` reference in a docstring names something that exists.

Docstrings point readers to the code that defines a formula or a step
(``:func:`so8t.eval.calibration.apply_temperature```); a module that moved leaves such a
pointer dangling. Each reference is resolved as Python would: the longest importable module
prefix, then attributes.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from layout_tools import REPO

#: ``so8t`` followed by dotted identifiers (a trailing ``.`` of a sentence is not part of it).
REFERENCE = re.compile(r"(?<![\w.])so8t(?:\.[A-Za-z_]\w*)+")


def _docstrings(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield getattr(node, "lineno", 1), doc


def resolves(ref: str) -> bool:
    """``ref`` is an importable module, or an importable module followed by existing attributes."""
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                # A dataclass or pydantic field without a default is not a class attribute.
                fields = getattr(obj, "__dataclass_fields__", None) or getattr(obj, "model_fields", None) or {}
                if name not in fields:
                    return False
                obj = None
            else:
                obj = getattr(obj, name)
        return True
    return False


def _references():
    for path in sorted((REPO / "so8t").rglob("*.py")):
        for line, doc in _docstrings(path):
            for ref in sorted(set(REFERENCE.findall(doc))):
                yield f"{path.relative_to(REPO)}:{line}", ref


def test_the_resolver_tells_real_from_stale_references():
    assert resolves("so8t.decision.parse_decision")
    assert resolves("so8t.eval")
    assert not resolves("so8t.pet.pet_penalty")
    assert not resolves("so8t.decision.no_such_function")


def test_every_docstring_reference_resolves():
    refs = list(_references())
    assert len(refs) > 50, "the scan found almost no references: is the pattern right?"
    stale = [f"{where}: {ref}" for where, ref in refs if not resolves(ref)]
    assert not stale, "docstrings name modules or objects that do not exist:\n" + "\n".join(stale)


@pytest.mark.parametrize("text, found", [
    ("see :func:`so8t.eval.calibration.apply_temperature`.", ["so8t.eval.calibration.apply_temperature"]),
    ("``so8t_base.json`` and so8t. alone", []),
])
def test_the_pattern(text, found):
    assert REFERENCE.findall(text) == found
