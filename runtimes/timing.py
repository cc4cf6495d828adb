"""Timing harness: warm-up, N runs or a minimum time, robust statistics, side-by-side runs.

Side-by-side timing interleaves the candidates run by run so that noise from a shared machine hits
all of them alike; compare them by ratio, never by absolute numbers from different runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping


@dataclass(frozen=True)
class TimingResult:
    """Latency statistics in milliseconds; throughput in items per second."""

    name: str
    runs: int
    warmup: int
    min_ms: float
    median_ms: float
    p90_ms: float
    mean_ms: float
    stdev_ms: float
    items_per_run: int
    throughput: float

    def to_json(self) -> dict:
        return asdict(self)


def summarize(name: str, samples_s: list[float], warmup: int, items_per_run: int = 1) -> TimingResult:
    """Statistics over per-run wall times (seconds)."""
    if not samples_s:
        raise ValueError("no timing samples")
    ms = sorted(s * 1e3 for s in samples_s)
    p90_index = min(len(ms) - 1, max(0, int(round(0.9 * (len(ms) - 1)))))
    median = statistics.median(ms)
    return TimingResult(
        name=name,
        runs=len(ms),
        warmup=warmup,
        min_ms=ms[0],
        median_ms=median,
        p90_ms=ms[p90_index],
        mean_ms=statistics.fmean(ms),
        stdev_ms=statistics.stdev(ms) if len(ms) > 1 else 0.0,
        items_per_run=items_per_run,
        throughput=items_per_run / (median / 1e3) if median > 0 else float("inf"),
    )


def time_side_by_side(
    fns: Mapping[str, Callable[[], object]],
    *,
    runs: int = 20,
    warmup: int = 3,
    min_time_s: float = 0.0,
    items_per_run: int = 1,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, TimingResult]:
    """Time several callables interleaved round by round.

    Each round runs every candidate once (rotating who goes first). Stops after ``runs`` rounds,
    or later if ``min_time_s`` of total timed work has not yet passed.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    round_index = 0
    while round_index < runs or time.perf_counter() - started < min_time_s:
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
        round_index += 1
        if on_round:
            on_round(round_index)
    return {name: summarize(name, samples[name], warmup, items_per_run) for name in names}


def ratios(results: Mapping[str, TimingResult], baseline: str) -> dict[str, float]:
    """Speed of each candidate relative to ``baseline`` (>1 means faster), by median latency."""
    base = results[baseline].median_ms
    return {name: base / r.median_ms for name, r in results.items()}
