"""Benchmark and compare whole models on a runtime, side by side, on the same feeds."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from qcompile import execute, modelio, specs
from qcompile.feedsearch import fitting_feeds
from qcompile.metrics import Comparison
from qcompile.progress import bar
from qcompile.runtimes import RuntimeOptions, TimingResult, time_side_by_side
from qcompile.runtimes.timing import ratios


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
