"""Shared rich console, progress bars and stage entry helper."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
T = TypeVar("T")


def warn(message: str) -> None:
    """Print ``message`` as a warning on stderr (rich markup in it is shown literally)."""
    from rich.markup import escape

    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)


def info(message: str) -> None:
    """Print ``message`` on stderr (rich markup in it is shown literally)."""
    from rich.markup import escape

    console.print(escape(message), soft_wrap=True, highlight=False)


def progress() -> Progress:
    """A rich progress bar with count, elapsed time and ETA."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    with progress() as bar:
        task = bar.add_task(description, total=total, info="")
        for item in items:
            yield item
            bar.advance(task)


def free_cores(sample_seconds: float = 0.5, busy_percent: float = 50.0) -> int:
    """Cores that are idle right now, at least 1.

    Measured over ``sample_seconds`` with psutil (per-core utilisation below
    ``busy_percent`` counts as free). llama.cpp and torch slow down several-fold
    when their threads exceed the free cores; the load average lags by minutes
    and would still count the previous stage's own work.
    """
    import psutil

    per_core = psutil.cpu_percent(interval=sample_seconds, percpu=True)
    return max(1, sum(1 for p in per_core if p < busy_percent))


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's ``main`` with timing.

    A :class:`so8t.errors.So8tError` (bad params, bad data, a missing input) prints its
    message and exits 1; any other exception is a bug and propagates with its traceback.
    """
    from so8t.errors import So8tError

    start = time.perf_counter()
    try:
        main()
    except So8tError as e:
        console.print(f"[bold red]{name} failed:[/] {e}")
        sys.exit(1)
    console.print(f"[green]{name} done[/] in {time.perf_counter() - start:.1f} s")
