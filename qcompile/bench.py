"""Benchmark and compare whole models on a runtime, side by side, on the same feeds."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from qcompile import execute, modelio, specs
from qcompile.feedsearch import fitting_feeds
from qcompile.metrics import Comparison
from qcompile.progress import bar
from qcompile.runtimes import RuntimeOptions, TimingResult, time_side_by_side
from qcompile.runtimes.timing import ratios, summarize

#: A speed guard's ``"auto"`` number of timed runs per model: at least GUARD_MIN_RUNS, at most
#: GUARD_MAX_RUNS, stopping once they add up to GUARD_SECONDS (a large model's guard costs two of
#: its runs; a small one's gets twenty).
GUARD_MIN_RUNS, GUARD_MAX_RUNS, GUARD_SECONDS = 2, 20, 0.5


@dataclass(frozen=True)
class BenchSettings:
    """What to time: shapes for symbolic dims, repetitions, threads, target."""

    target: str = "ort-cpu"
    batch: int | None = None
    seq: int | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    runs: int = 20
    warmup: int = 3
    min_time_s: float = 0.0
    threads: int | None = None
    seed: int = 0


def bench_models(paths: list[str | Path], settings: BenchSettings, labels: list[str] | None = None,
                 feed: Mapping[str, np.ndarray] | None = None) -> dict:
    """Time models side by side (interleaved) on one feed; ratios are vs the first model.

    ``feed`` None: a seeded random feed, its symbolic dims sized (unless the settings size them) so
    that the first model runs (qcompile/feedsearch.py)."""
    labels = labels or [str(p) for p in paths]
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    first = modelio.load(paths[0])
    input_specs = specs.input_specs(first)
    options = RuntimeOptions(threads=settings.threads, spin_wait=len(paths) == 1)
    with contextlib.ExitStack() as stack:
        loaded = [stack.enter_context(execute.loaded(str(path), settings.target, options)) for path in paths]
        if feed is None:
            feed = fitting_feeds(input_specs, lambda f: execute.run_all(loaded[0], [f]), samples=1,
                                 seed=settings.seed, dims=settings.dims, batch=settings.batch, seq=settings.seq)[0][0]
        else:
            specs.validate_feed(input_specs, feed, where=f"inputs of {paths[0]}")
        for path in paths[1:]:
            specs.validate_feed(specs.input_specs(modelio.load(path, check=False)), feed, where=f"inputs of {path}")
        first_array = next(iter(feed.values()), None)
        items = first_array.shape[0] if first_array is not None and first_array.ndim else 1
        fns = {label: (lambda rt=rt: rt.run(feed)) for label, rt in zip(labels, loaded)}
        with bar("timing", total=settings.runs) as advance:
            results: dict[str, TimingResult] = time_side_by_side(
                fns, runs=settings.runs, warmup=settings.warmup, min_time_s=settings.min_time_s,
                items_per_run=items, on_round=lambda _: advance(),
            )
    speed = ratios(results, labels[0])
    return {
        "target": settings.target,
        "threads": settings.threads,
        "feed_shapes": {name: list(array.shape) for name, array in feed.items()},
        "baseline": labels[0],
        "results": [
            {**results[label].to_json(), "path": str(path), "speedup_vs_baseline": speed[label]}
            for label, path in zip(labels, paths)
        ],
    }


def compare_models(
    reference: str | Path, candidate: str | Path, feeds: list[dict[str, np.ndarray]], target: str = "ort-cpu"
) -> Comparison:
    """Run both models on the same feeds and compare every output."""
    comparison = Comparison()
    with execute.loaded(str(reference), target) as ref_rt, execute.loaded(str(candidate), target) as cand_rt:
        with bar("comparing", total=len(feeds)) as advance:
            for feed in feeds:
                comparison.add(ref_rt.run(feed), cand_rt.run(feed))
                advance()
    return comparison


def time_runs(name: str, fn, runs: int | str, *, warmup: int = 0, items_per_run: int = 1,
              done: Sequence[float] = ()) -> TimingResult:
    """Time ``fn(i)`` (run i), which its caller has already run ``warmup`` times: ``runs`` runs, or
    ``"auto"`` (see GUARD_MIN_RUNS); ``done``: seconds of runs the caller timed already."""
    samples: list[float] = list(done)

    def enough() -> bool:
        if runs == "auto":
            return len(samples) >= GUARD_MAX_RUNS or (len(samples) >= GUARD_MIN_RUNS and sum(samples) >= GUARD_SECONDS)
        return len(samples) >= int(runs)

    while not enough():
        started = time.perf_counter()
        fn(len(samples))
        samples.append(time.perf_counter() - started)
    return summarize(name, samples, warmup, items_per_run)


def guard_report(fp32: TimingResult, quantized: TimingResult, feed: Mapping[str, np.ndarray], target: str) -> dict:
    """A speed guard's figures, shaped like :func:`bench_models`'s report (baseline: FP32). The two
    models were timed in turn, not interleaved (``"interleaved": False``), so the speed-up is the
    ratio of their fastest runs (``"statistic": "min"``): load from other processes only ever adds
    time, and the fastest run of each is the one it disturbed least."""
    return {
        "target": target,
        "threads": None,
        "interleaved": False,
        "statistic": "min",
        "feed_shapes": {name: list(np.shape(array)) for name, array in feed.items()},
        "baseline": "fp32",
        "results": [{**t.to_json(), "speedup_vs_baseline": fp32.min_ms / t.min_ms if t.min_ms > 0 else float("inf")}
                    for t in (fp32, quantized)],
    }
