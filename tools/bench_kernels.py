"""Kernel-level INT8 vs FP32 on ONNX Runtime CPU: which ops and shapes INT8 wins on this machine.

    python tools/bench_kernels.py [--runs 200] [--json-out FILE]

Each case is a one-op model, FP32 against its static QDQ form (u8 activations, s8 per-channel
weights; ORT fuses DQ -> op -> Q into QLinearConv / QLinearMatMul, or DQ -> MatMul into
MatMulIntegerToFloat when the output stays float), timed interleaved. The `ort-cpu` policy's
float-op list is decided from this table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.runtimes import OrtRuntime, RuntimeOptions, time_side_by_side

RNG = np.random.default_rng(0)


def _qdq(name: str, scale: float, zp: int, dtype: int) -> tuple[list, list]:
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
             helper.make_tensor(f"{name}_z", dtype, [], [zp])]
    nodes = [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]
    return nodes, inits


def _weight(name: str, w: np.ndarray, axis: int) -> tuple[list, list]:
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    scale = (np.abs(moved).max(axis=1) / 127.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s"),
             numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_z")]
    node = helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"], axis=axis)
    return [node], inits


def model(op: str, x_shape, w: np.ndarray, attrs: dict, quantized: bool, out_q: bool) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes, inits = [], []
    if not quantized:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node(op, ["x", "w"], ["y"], **attrs))
    else:
        n1, i1 = _qdq("x", 0.05, 128, TensorProto.UINT8)
        n2, i2 = _weight("w", w, 0 if op == "Conv" else 1)
        nodes += n1 + n2
        inits += i1 + i2
        out = "yf" if out_q else "y"
        nodes.append(helper.make_node(op, ["x_dq", "w_dq"], [out], **attrs))
        if out_q:
            n3, i3 = _qdq("yf", 0.05, 128, TensorProto.UINT8)
            nodes += n3
            inits += i3
            nodes.append(helper.make_node("Identity", ["yf_dq"], ["y"]))
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m.SerializeToString()


CASES = [
    ("MatMul M=1 384x1536", "MatMul", (1, 384), (384, 1536), {}),
    ("MatMul M=16 384x1536", "MatMul", (16, 384), (384, 1536), {}),
    ("MatMul M=128 384x1536", "MatMul", (128, 384), (384, 1536), {}),
    ("MatMul M=128 1536x384", "MatMul", (128, 1536), (1536, 384), {}),
    ("MatMul M=1024 384x384", "MatMul", (1024, 384), (384, 384), {}),
    ("Conv 3x3 64->64 56x56", "Conv", (1, 64, 56, 56), (64, 64, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("Conv 3x3 256->256 14x14", "Conv", (1, 256, 14, 14), (256, 256, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("Conv 1x1 64->256 56x56", "Conv", (1, 64, 56, 56), (256, 64, 1, 1), {}),
    ("Conv 7x7/2 3->64 224x224", "Conv", (1, 3, 224, 224), (64, 3, 7, 7), {"pads": [3, 3, 3, 3], "strides": [2, 2]}),
    ("Conv dw 3x3 144ch 56x56", "Conv", (1, 144, 56, 56), (144, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 144}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    rows = []
    print("| case | FP32 median ms | INT8 (float out) vs FP32 | INT8 (QDQ out) vs FP32 |\n|---|---|---|---|")
    for label, op, x_shape, w_shape, attrs in CASES:
        w = (RNG.standard_normal(w_shape) * 0.05).astype(np.float32)
        feed = {"x": RNG.uniform(-3, 3, x_shape).astype(np.float32)}
        runtimes = {}
        for name, quantized, out_q in (("fp32", False, False), ("int8_float_out", True, False), ("int8_qdq_out", True, True)):
            rt = OrtRuntime()
            rt.load(model(op, x_shape, w, attrs, quantized, out_q), RuntimeOptions(spin_wait=False))
            runtimes[name] = rt
        results = time_side_by_side({k: (lambda rt=rt: rt.run(feed)) for k, rt in runtimes.items()}, runs=args.runs, warmup=5)
        base = results["fp32"].median_ms
        row = {"case": label, "fp32_ms": base,
               "int8_float_out": base / results["int8_float_out"].median_ms,
               "int8_qdq_out": base / results["int8_qdq_out"].median_ms}
        rows.append(row)
        print(f"| {label} | {base:.3f} | {row['int8_float_out']:.2f}× | {row['int8_qdq_out']:.2f}× |", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
