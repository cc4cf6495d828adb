"""Measure the FP32 optimization pipeline on zoo models, side by side, and print a markdown table.

    python tools/bench_optimize.py [--models minilm,smollm2] [--runs 30] [--json-out FILE]

For each model: export (cached), `qcompile optimize` with verification, nodes before/after, the
worst per-pass relative L2 error, optimize wall time, then FP32 vs optimized timed interleaved on
ONNX Runtime CPU at batch 1, sequence 128 (speed ratio > 1 means the optimized model is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime

import qcompile
from qcompile.bench import BenchSettings, bench_models
from qcompile.models import cached_export, get_entry


def measure(name: str, runs: int, workdir: Path) -> dict:
    entry = get_entry(name)
    source = cached_export(entry)
    started = time.perf_counter()
    result = qcompile.optimize_with_stats(source, verify=True)
    optimize_s = time.perf_counter() - started
    out = workdir / f"{name}.opt.onnx"
    qcompile.save(result.model, out)
    dims = dict(entry.bench_dims) or {"batch": 1}
    timing = bench_models([source, out], BenchSettings(runs=runs, warmup=3, dims=dims), labels=["fp32", "optimized"])
    fp32, opt = timing["results"]
    return {
        "model": name,
        "real_weights": entry.real_weights,
        "nodes_before": result.stats[0].nodes_before,
        "nodes_after": result.stats[-1].nodes_after,
        "worst_rel_l2": max((s.rel_l2 for s in result.stats if s.rel_l2 is not None), default=0.0),
        "optimize_s": optimize_s,
        "feed": timing["feed_shapes"],
        "fp32_median_ms": fp32["median_ms"],
        "optimized_median_ms": opt["median_ms"],
        "speed_ratio": opt["speedup_vs_baseline"],
        "runs": runs,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | nodes before → after | worst rel L2 (verified) | optimize s | FP32 median ms "
        "| optimized median ms | speed vs FP32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['nodes_before']} → {r['nodes_after']} | {r['worst_rel_l2']:.1e} "
            f"| {r['optimize_s']:.1f} "
            f"| {r['fp32_median_ms']:.2f} | {r['optimized_median_ms']:.2f} | {r['speed_ratio']:.3f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name.strip(), args.runs, Path(tmp)) for name in args.models.split(",") if name.strip()]
    print(f"onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.runs} interleaved runs per model")
    print(markdown(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
