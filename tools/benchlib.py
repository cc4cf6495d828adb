"""Shared by the quantization benchmarks: isolated quantizer runs, scoring, interleaved timing.

    from benchlib import run_isolated, score, time_rows
    row = run_isolated(quantize_fn, *args)   # {"seconds", "peak_rss_mb", "error"}

``quantize_fn`` must be a module-level function of an importable module (it is pickled by
reference for the spawned process). A crash of the quantizer under test is a result, not the
benchmark's failure: it comes back as ``error`` (the exception's first line) with its traceback
printed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from qcompile.memory import peak_rss_mb


def _worker(fn: Callable[..., Any], args: tuple, queue) -> None:
    started = time.perf_counter()
    try:
        fn(*args)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        traceback.print_exc()
    queue.put({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "error": error})


def run_isolated(fn: Callable[..., Any], *args: Any) -> dict:
    """``fn(*args)`` in a fresh spawned process; its seconds, peak RSS (MB) and error (or None)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def score(row: dict, entry, path: str | Path, reference: str | Path) -> dict:
    """Add the model's bytes on disk and (real-weight entries) its task metric to ``row``."""
    path = Path(path)
    row["path"] = str(path)
    row["bytes"] = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    if entry.real_weights:
        row.update(entry.evaluate(path, reference=reference) if entry.name == "minilm" else entry.evaluate(path))
    return row


def time_rows(rows: list[dict], runs: int, shapes: Mapping[str, Mapping[str, int]]) -> None:
    """Time every row that has a model, interleaved, once per shape; ratios vs the first row.

    ``shapes`` maps a label to symbolic dims; rows get ``speed_<label>`` and ``median_ms_<label>``.
    """
    from qcompile.bench import BenchSettings, bench_models

    ok = [r for r in rows if not r.get("error")]
    for label, dims in shapes.items():
        timing = bench_models([r["path"] for r in ok], BenchSettings(runs=runs, dims=dict(dims)),
                              labels=[r["quantizer"] for r in ok])
        for r, t in zip(ok, timing["results"]):
            r[f"speed_{label}"] = t["speedup_vs_baseline"]
            r[f"median_ms_{label}"] = t["median_ms"]


def metric_cell(row: dict) -> str:
    """The task metric of a row, as a table cell."""
    if "perplexity" in row:
        return f"PPL {row['perplexity']:.2f}"
    if "r_at_1" in row:
        return f"R@1 {row['r_at_1']:.3f}, cos {row.get('embedding_cosine', 1.0):.4f}"
    if "top1" in row:
        return f"top-1 {row['top1']:.4f}"
    return "— (random weights)"


def report(rows: list[dict], markdown: Callable[[list[dict]], str], json_out: Path | None) -> None:
    """Print the CPU signature and the full table; write the rows as JSON if asked."""
    from qcompile.targets.ort_cpu.kernel_probe import cpu_signature

    print(f"\n{cpu_signature()}\n")
    print(markdown(rows))
    if json_out:
        json_out.write_text(json.dumps([{k: v for k, v in r.items() if k != "path"} for r in rows], indent=2,
                                       default=str))
