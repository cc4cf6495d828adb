"""Why the pipeline ends with `clear-shapes`: time MiniLM optimized with and without it, side by side.

    python tools/bench_shape_annotations.py [--runs 100]

With every intermediate shape annotated, ONNX Runtime fuses SkipLayerNormalization into MiniLM;
the script prints which ORT fusions each variant gets and the speed of each relative to FP32.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

import qcompile
from qcompile.bench import BenchSettings, bench_models
from qcompile.models import cached_export, minilm
from qcompile.passes import DEFAULT_PIPELINE


def ort_ops(path: Path, tmp: Path) -> Counter:
    """Op histogram of the graph ORT actually runs (after its own optimizations)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp / (path.stem + ".ort.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    source = cached_export(minilm.ENTRY)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with_shapes = tmp / "with_shapes.onnx"
        cleared = tmp / "cleared.onnx"
        qcompile.save(qcompile.optimize(source, list(DEFAULT_PIPELINE)), with_shapes)
        qcompile.save(qcompile.optimize(source), cleared)
        paths = [source, with_shapes, cleared]
        labels = ["fp32", "optimized, shapes kept", "optimized, clear-shapes"]
        for label, path in zip(labels, paths):
            ops = ort_ops(path, tmp)
            print(f"{label}: ORT runs SkipLayerNormalization x{ops['SkipLayerNormalization']}, "
                  f"LayerNormalization x{ops['LayerNormalization']}, BiasGelu x{ops['BiasGelu']}")
        report = bench_models(paths, BenchSettings(runs=args.runs, dims={"batch": 1, "sequence": 128}), labels=labels)
    print("| variant | median ms | speed vs FP32 |\n|---|---|---|")
    for r in report["results"]:
        print(f"| {r['name']} | {r['median_ms']:.2f} | {r['speedup_vs_baseline']:.3f}× |")


if __name__ == "__main__":
    main()
