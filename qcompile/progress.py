"""Progress bars on stderr (rich); quiet when stderr is not a terminal or QCOMPILE_QUIET is set."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

stderr = Console(stderr=True)


def enabled() -> bool:
    return stderr.is_terminal and not os.environ.get("QCOMPILE_QUIET")


@contextlib.contextmanager
def bar(description: str, total: float | None = None) -> Iterator[callable]:
    """A progress bar; yields ``advance(n=1, description=None)``."""
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=True, disable=not enabled(),
    )
    with progress:
        task = progress.add_task(description, total=total)

        def advance(n: float = 1, description: str | None = None) -> None:
            progress.update(task, advance=n, **({"description": description} if description else {}))

        yield advance
