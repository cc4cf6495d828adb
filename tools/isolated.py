"""Run one quantizer in its own process so that its wall time and peak RSS are its own.

    from isolated import run_isolated
    row = run_isolated(quantize_fn, *args)   # {"seconds", "peak_rss_mb", "error"}

``quantize_fn`` must be a module-level function of an importable module (it is pickled by
reference for the spawned process). A crash of the quantizer under test is a result, not the
benchmark's failure: it comes back as ``error`` (the exception's first line) with its traceback
printed.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
import traceback
from typing import Any, Callable


def _worker(fn: Callable[..., Any], args: tuple, queue) -> None:
    started = time.perf_counter()
    try:
        fn(*args)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        traceback.print_exc()
    queue.put({"seconds": time.perf_counter() - started,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "error": error})


def run_isolated(fn: Callable[..., Any], *args: Any) -> dict:
    """``fn(*args)`` in a fresh spawned process; its seconds, peak RSS (MB) and error (or None)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result
