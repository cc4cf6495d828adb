"""This process's memory, as the benchmarks and the quantizer's phase report see it."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from pathlib import Path
from typing import Iterator


def peak_rss_mb() -> float:
    """This process's peak resident set in MB (VmHWM). Not ru_maxrss where /proc exists: Linux
    carries that over exec, so a spawned child would report its parent's peak at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_seconds() -> float:
    """Wall seconds since this process started (from /proc; 0.0 where it cannot be read), so that
    a command can account for its own start-up (interpreter, imports) before its first line ran."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime: clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - started)


@contextlib.contextmanager
def shedding(model, interval_s: float = 0.02) -> Iterator[None]:
    """Keep the resident pages of ``model``'s memory-mapped weights dropped while the block runs.

    For building a runtime session over mapped weights that pre-packs them: the runtime reads
    each weight once and keeps its own packed copy, and without this the mapped pages it read stay
    resident until the session is built, so that, for a moment, the weights are resident twice. A
    background thread drops them every ``interval_s`` (madvise DONTNEED: the mapping stays valid and
    a page read again comes back from the page cache); they are dropped once more on exit.
    Runtimes that release the GIL while they build (ONNX Runtime does) let the thread run."""
    from qcompile import modelio

    done = threading.Event()

    def shed() -> None:
        while not done.wait(interval_s):
            modelio.drop_resident_weights(model)

    thread = threading.Thread(target=shed, name="qcompile-shed-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        modelio.drop_resident_weights(model)


class PhaseClock:
    """Wall time per phase of a command, and the process's peak RSS at the end of each.

    ``lap(phase)`` closes the phase that ran since the previous lap; a phase lapped twice (say,
    timing done in two places) adds up, so that the phases always sum to the time since the start."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self.peak_rss_mb[phase] = max(self.peak_rss_mb.get(phase, 0.0), peak_rss_mb())
        self._last = now

    def skip(self) -> None:
        """Restart the lap without recording it (time accounted by another clock)."""
        self._last = time.perf_counter()


def trim() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed blocks for reuse, and after large arrays come and go (a session's buffers,
    calibration outputs) that is hundreds of MB still counted as resident: called between phases, it
    keeps one phase's garbage from adding to the next one's peak."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None
