"""`qcompile demo`: MiniLM with real weights -> verified FP32 optimization -> static INT8 ->
all three measured side by side (latency on ORT CPU, retrieval R@1, embedding cosine vs FP32) ->
a gate (INT8 against FP32 on held-out sentences) and its HTML report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from qcompile import modelio
from qcompile.bench import BenchSettings, bench_models
from qcompile.evaluators import parse_metric
from qcompile.gate import Thresholds, run_gate
from qcompile.passmanager import VerifyOptions, count_nodes
from qcompile.pipeline import optimize_with_stats
from qcompile.report import environment, precision_by_op, write_report
from qcompile.static_int8 import quantize_static as quantize


def run_demo(out_dir: Path, runs: int = 30, log: Callable[[str], None] = print) -> dict:
    """Run the demo, writing models into ``out_dir``; returns a JSON-ready report."""
    from qcompile.models import cached_export, minilm

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log("1/6 exporting MiniLM-L6-v2 (real weights; cached after the first run)")
    fp32_path = out_dir / "minilm.fp32.onnx"
    source = modelio.load(cached_export(minilm.ENTRY))
    modelio.save(source, fp32_path)

    log("2/6 optimizing with verification on ONNX Runtime CPU")
    model = modelio.load(fp32_path)
    nodes_before = count_nodes(model)
    result = optimize_with_stats(model, verify=True, verify_options=VerifyOptions(dims={"batch": 2, "sequence": 32}))
    opt_path = out_dir / "minilm.opt.onnx"
    modelio.save(result.model, opt_path)
    worst = max((s.rel_l2 for s in result.stats if s.rel_l2 is not None), default=0.0)

    log("3/6 static INT8 quantization (calibrated on 64 pydoc sentences)")
    quantized = quantize(result.model, minilm.ENTRY.calibration(64), optimize=False)  # in place; saved above
    int8_path = out_dir / "minilm.int8.onnx"
    modelio.save(quantized.model, int8_path)

    log("4/6 timing the three side by side (batch 1, sequence 128)")
    timing = bench_models([fp32_path, opt_path, int8_path],
                          BenchSettings(runs=runs, dims={"batch": 1, "sequence": 128}),
                          labels=["fp32", "optimized", "int8"])

    log("5/6 scoring retrieval on chatterbot-corpus")
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
    log("6/6 gating INT8 against FP32 on held-out sentences (cosine drop <= 1 %, not slower)")
    gate = run_gate(fp32_path, int8_path, parse_metric("cosine"), list(minilm.ENTRY.heldout(16)),
                    Thresholds(max_drop=0.01, max_latency_ratio=1.0), runs=runs)
    report_path = out_dir / "report.html"
    data = gate.report_data("qcompile demo")
    data["precision_by_op"] = precision_by_op(quantized.model)
    data["candidates"] = [{"name": row["model"], "latency_ms": row["median_ms"], "metric": row["embedding_cosine"],
                           "within_budget": None, "chosen": row["model"] == "int8"} for row in rows]
    data.update(metric_name="embedding cosine vs FP32 (retrieval questions)", higher_is_better=True)
    write_report(report_path, {**data, "environment": environment()})
    return {
        "gate": {**gate.to_json(), "report": str(report_path)},
        "rows": rows,
        "worst_pass_rel_l2": worst,
        "passes": result.to_json()["passes"],
        "quantization": quantized.to_json(),
        "seconds": time.perf_counter() - started,
    }
