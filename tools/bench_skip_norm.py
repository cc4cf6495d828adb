"""ONNX Runtime's skip-norm kernels against the ops they replace, on ORT CPU: why ort-cpu's pipeline
leaves out ``fuse-skip-layernorm`` and keeps ``fuse-skip-norm``.

    python tools/bench_skip_norm.py [--rows 1,128] [--width 384,768] [--threads 1,2] [--runs 200]

Each model chains 20 residual norms y_i = Norm(y_{i-1} + r) over [1, rows, width] in one of four forms:
``SkipLayerNormalization`` vs ``Add`` + ``LayerNormalization``, and ``SkipSimplifiedLayerNormalization``
vs Add + the decomposed RMSNorm an exporter writes. Sessions at ORT_ENABLE_BASIC, so that ORT does
not fuse the loose forms itself; spin-waiting off; the pairs run interleaved; median microseconds
per norm.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

CHAIN = 20


def chain(form: str, width: int) -> bytes:
    """20 residual norms of one form over x [1, S, width] with the residual r."""
    inits = [numpy_helper.from_array(np.ones(width, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(width, np.float32), "beta"),
             numpy_helper.from_array(np.array([1e-5], np.float32), "eps"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes, x = [], "x"
    for i in range(CHAIN):
        y, s = f"y{i}", f"s{i}"
        if form == "SkipLayerNormalization":
            nodes.append(oh.make_node(form, [x, "r", "gamma", "beta"], [y], domain="com.microsoft", epsilon=1e-5))
        elif form == "SkipSimplifiedLayerNormalization":
            nodes.append(oh.make_node(form, [x, "r", "gamma"], [y], domain="com.microsoft", epsilon=1e-5))
        elif form == "Add + LayerNormalization":
            nodes += [oh.make_node("Add", [x, "r"], [s]),
                      oh.make_node("LayerNormalization", [s, "gamma", "beta"], [y], axis=-1, epsilon=1e-5)]
        else:  # Add + RMSNorm, decomposed: s / sqrt(mean(s^2) + eps) * gamma
            nodes += [oh.make_node("Add", [x, "r"], [s]), oh.make_node("Mul", [s, s], [f"q{i}"]),
                      oh.make_node("ReduceMean", [f"q{i}", "axes"], [f"m{i}"]),
                      oh.make_node("Add", [f"m{i}", "eps"], [f"e{i}"]), oh.make_node("Sqrt", [f"e{i}"], [f"d{i}"]),
                      oh.make_node("Div", [s, f"d{i}"], [f"n{i}"]), oh.make_node("Mul", [f"n{i}", "gamma"], [y])]
        x = y
    io = [oh.make_tensor_value_info(n, TensorProto.FLOAT, [1, "S", width]) for n in ("x", "r")]
    out = oh.make_tensor_value_info(x, TensorProto.FLOAT, [1, "S", width])
    graph = oh.make_graph(nodes, "chain", io, [out], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


PAIRS = (("SkipLayerNormalization", "Add + LayerNormalization"),
         ("SkipSimplifiedLayerNormalization", "Add + RMSNorm (decomposed)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,128")
    parser.add_argument("--width", default="384,768")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    from qcompile.targets.ort_cpu.kernel_probe import cpu_signature

    print(f"`{cpu_signature()}`, {args.runs} interleaved runs, median µs per norm\n")
    print("| fused kernel | rows | width | threads | fused µs | loose µs | fused / loose |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for fused, loose in PAIRS:
        for width in ints(args.width):
            models = {form: chain(form, width) for form in (fused, loose)}
            for rows in ints(args.rows):
                feed = {n: rng.standard_normal((1, rows, width)).astype(np.float32) for n in ("x", "r")}
                for threads in ints(args.threads):
                    so = ort.SessionOptions()
                    so.intra_op_num_threads = threads
                    so.log_severity_level = 3  # the forms share one initializer list; unused ones are dropped
                    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    sessions = {f: ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
                                for f, m in models.items()}
                    times: dict[str, list[float]] = {f: [] for f in sessions}
                    for _ in range(args.runs):
                        for form, session in sessions.items():
                            start = time.perf_counter()
                            session.run(None, feed)
                            times[form].append(time.perf_counter() - start)
                    a, b = (1e6 * float(np.median(times[f])) / CHAIN for f in (fused, loose))
                    print(f"| {fused} | {rows} | {width} | {threads} | {a:.1f} | {b:.1f} | {a / b:.2f}× |")


if __name__ == "__main__":
    main()
