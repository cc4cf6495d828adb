"""`qcompile demo`: MiniLM with real weights -> verified FP32 optimization -> static INT8 ->
all three measured side by side (latency on ORT CPU, retrieval R@1, embedding cosine vs FP32)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from qcompile import modelio
from qcompile.bench import BenchSettings, bench_models
from qcompile.passmanager import VerifyOptions, count_nodes
from qcompile.pipeline import optimize_with_stats
from qcompile.static_int8 import quantize_static as quantize


def run_demo(out_dir: Path, runs: int = 30, log: Callable[[str], None] = print) -> dict:
    """Run the demo, writing models into ``out_dir``; returns a JSON-ready report."""
    from qcompile.models import cached_export, minilm

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log("1/5 exporting MiniLM-L6-v2 (real weights; cached after the first run)")
    fp32_path = out_dir / "minilm.fp32.onnx"
    source = modelio.load(cached_export(minilm.ENTRY))
    modelio.save(source, fp32_path)

    log("2/5 optimizing with verification on ONNX Runtime CPU")
    model = modelio.load(fp32_path)
    nodes_before = count_nodes(model)
    result = optimize_with_stats(model, verify=True, verify_options=VerifyOptions(dims={"batch": 2, "sequence": 32}))
    opt_path = out_dir / "minilm.opt.onnx"
    modelio.save(result.model, opt_path)
    worst = max((s.rel_l2 for s in result.stats if s.rel_l2 is not None), default=0.0)

    log("3/5 static INT8 quantization (calibrated on 64 pydoc sentences)")
    quantized = quantize(result.model, minilm.ENTRY.calibration(64), optimize=False)  # in place; saved above
    int8_path = out_dir / "minilm.int8.onnx"
    modelio.save(quantized.model, int8_path)

    log("4/5 timing the three side by side (batch 1, sequence 128)")
    timing = bench_models([fp32_path, opt_path, int8_path],
                          BenchSettings(runs=runs, dims={"batch": 1, "sequence": 128}),
                          labels=["fp32", "optimized", "int8"])

    log("5/5 scoring retrieval on chatterbot-corpus")
    scores = {
        "fp32": minilm.evaluate(fp32_path),
        "optimized": minilm.evaluate(opt_path, reference=fp32_path),
        "int8": minilm.evaluate(int8_path, reference=fp32_path),
    }
    scores["fp32"]["embedding_cosine"] = 1.0
    rows = []
    for label, path, nodes in (("fp32", fp32_path, nodes_before), ("optimized", opt_path, result.stats[-1].nodes_after),
                               ("int8", int8_path, count_nodes(quantized.model))):
        t = next(r for r in timing["results"] if r["name"] == label)
        rows.append({
            "model": label, "path": str(path), "nodes": nodes, "median_ms": t["median_ms"],
            "speedup": t["speedup_vs_baseline"], "r_at_1": scores[label]["r_at_1"],
            "embedding_cosine": scores[label]["embedding_cosine"],
        })
    return {
        "rows": rows,
        "worst_pass_rel_l2": worst,
        "passes": result.to_json()["passes"],
        "quantization": quantized.to_json(),
        "seconds": time.perf_counter() - started,
    }
