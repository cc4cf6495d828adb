"""This process's memory, as the benchmarks and the quantizer's phase report see it."""

from __future__ import annotations

import resource
from pathlib import Path


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
