"""How fast a decode step could get with a model's weight kernels: the bound that graph work can reach.

    python tools/decode_ceiling.py FP32.onnx QUANTIZED.onnx [QUANTIZED.onnx ...] [--dim sequence=1] [--runs 30]

For each model, its *weight kernels* are cut out into a graph of their own: every node of the graph
ORT runs (after its own fusions, e.g. quantize_dynamic's DynamicQuantizeLinear -> MatMulInteger ->
Mul into DynamicQuantizeMatMul) that reads a weight (MatMul/Gemm with a constant B, MatMulNBits,
DynamicQuantizeMatMul, MatMulIntegerToFloat), each fed its own one-token input [1, K], nothing else.
All models and their kernel graphs are timed interleaved, in wall-clock time (ORT's profiler inflates
small ops). The ceiling of a quantized
model is FP32 step / its weight kernels alone: the decode speed-up it would reach if everything
that is not a weight kernel (attention, norms, shape arithmetic) cost nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from qcompile import execute, modelio, specs
from qcompile.runtimes import RuntimeOptions, time_side_by_side

WEIGHT_OPS = {"MatMul", "Gemm", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}  # weight: input 1


def _reduction_dim(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> int | None:
    """K of a weight-reading node (its activation is [.., K]); None if it reads no constant weight."""
    b = node.input[1] if len(node.input) > 1 else ""
    if b not in weights:
        return None
    if node.op_type == "MatMulNBits":
        return next(a.i for a in node.attribute if a.name == "K")
    dims = list(weights[b].dims)
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return dims[-1]
    return dims[-2] if len(dims) >= 2 else None


def weight_kernels(model: onnx.ModelProto) -> onnx.ModelProto:
    """A graph of ``model``'s weight-reading nodes only, each on its own [1, K] float input."""
    weights = {t.name: t for t in model.graph.initializer}
    nodes, inputs, outputs, used = [], [], [], {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHT_OPS or (k := _reduction_dim(node, weights)) is None:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0] = f"x{i}"
        del copy.output[:]
        copy.output.append(f"y{i}")
        nodes.append(copy)
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
        used.update({name: weights[name] for name in copy.input[1:] if name in weights})
    graph = helper.make_graph(nodes, "weight_kernels", inputs, outputs, list(used.values()))
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def ort_optimized(path: str, out: Path) -> onnx.ModelProto:
    """The graph ORT runs for ``path`` on CPU (extended fusions; no CPU-specific layouts)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return onnx.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="the FP32 model first")
    parser.add_argument("--dim", dest="dims", action="append", default=[], metavar="NAME=N",
                        help="symbolic dims of the full models (default sequence=1)")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    dims = specs.parse_dims(args.dims or ["sequence=1"])
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        fns, counts = {}, {}
        for i, path in enumerate(args.models):
            kernels = weight_kernels(ort_optimized(path, Path(tmp) / f"optimized{i}.onnx"))
            counts[path] = len(kernels.graph.node)
            kernel_path = Path(tmp) / f"kernels{i}.onnx"
            onnx.save(kernels, kernel_path)
            for label, model_path in ((f"{path}", path), (f"{path} [weight kernels]", str(kernel_path))):
                runtime = stack.enter_context(execute.loaded(model_path, "ort-cpu", RuntimeOptions(spin_wait=False)))
                feed = specs.random_feed(specs.input_specs(modelio.load(model_path, check=False)), seed=0, dims=dims)
                fns[label] = lambda rt=runtime, feed=feed: rt.run(feed)
        results = time_side_by_side(fns, runs=args.runs, warmup=3, min_time_s=0.0)
    fp32 = results[args.models[0]].median_ms
    print(f"\n{', '.join(f'{k}={v}' for k, v in dims.items())}; medians of {args.runs} interleaved runs\n")
    print("| model | step ms | vs FP32 | weight kernels | their ms | ceiling (FP32 step / weight kernels) |")
    print("|---|---|---|---|---|---|")
    for path in args.models:
        step, kernels = results[path].median_ms, results[f"{path} [weight kernels]"].median_ms
        print(f"| {path} | {step:.2f} | {fp32 / step:.2f}× | {counts[path]} | {kernels:.2f} | {fp32 / kernels:.2f}× |")


if __name__ == "__main__":
    main()
