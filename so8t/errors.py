"""The root of every error a user can fix (bad params, bad data, a missing input or model file).

Stages print such an error's message and exit 1 (:func:`so8t.console.run_stage`); any other
exception is a bug and shows its traceback. Each phase's errors derive from :class:`So8tError`
(and from the built-in class a caller would expect, e.g. ``ValueError``).
"""

from __future__ import annotations


class So8tError(Exception):
    """An error in the user's input, parameters or environment; its message says what to change."""


def error_location(error: dict, skip: tuple[str, ...] = ()) -> str:
    """The dotted key of one pydantic validation error (``train.lora_r``, ``roots.0.path``).

    Args:
        error: one item of ``pydantic.ValidationError.errors()`` (its ``loc`` tuple).
        skip: location parts left out (FastAPI's ``body``).

    Returns:
        The parts of ``loc`` joined with dots; ``""`` for an error of the whole object.
    """
    return ".".join(str(p) for p in error.get("loc", ()) if p not in skip)
