"""SIGINT and SIGTERM as exceptions, so that an interrupted run cleans up after itself.

Python turns SIGINT into :class:`KeyboardInterrupt`, but its default for SIGTERM is to die on the
spot: no ``finally`` block runs, and temporary files (the atomic save's, the CLI's temporary
folder) stay behind. :func:`install` makes SIGTERM raise :class:`Terminated` (a KeyboardInterrupt,
so every handler of interrupts treats both alike) in the main thread, where the interrupted work
unwinds through its context managers. :func:`deferred` holds both signals off for a few
statements that must not be split, such as the renames that commit a save; the signal takes
effect when the block ends.

The exit status of an interrupted command is 128 + the signal number: 130 for SIGINT, 143 for
SIGTERM (:func:`exit_code`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""

    exit_code = 128 + signal.SIGTERM


_deferring = 0
_pending: list[int] = []


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated("terminated (SIGTERM)")
    raise KeyboardInterrupt


def _on_signal(signum: int, frame) -> None:  # noqa: ARG001 - the signal module's signature
    if _deferring:
        _pending.append(signum)
        return
    _raise_for(signum)


def install() -> None:
    """Raise :class:`Terminated` on SIGTERM and KeyboardInterrupt on SIGINT, deferrable by
    :func:`deferred`. Signals the process was started to ignore stay ignored; off the main thread
    (where Python cannot set handlers) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current == signal.SIG_IGN:
            continue
        if signum == signal.SIGINT and current is not signal.default_int_handler:
            continue  # someone else's SIGINT handler (a debugger, a test runner): leave it
        signal.signal(signum, _on_signal)


def exit_code(exc: BaseException) -> int:
    """The exit status for an interrupt: 143 after SIGTERM, 130 after SIGINT."""
    return getattr(exc, "exit_code", 128 + signal.SIGINT)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (as installed by :func:`install`) until the block ends, then raise
    for the first that arrived. Without :func:`install`, SIGINT still interrupts at once."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            _raise_for(signum)
