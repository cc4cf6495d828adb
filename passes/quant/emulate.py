"""Emulating a low-precision (float16/bfloat16) model in float32, to verify it on ONNX Runtime CPU.

ORT's CPU provider has no float16/bfloat16 kernels for most ops. :func:`emulate_low_precision`
returns a copy in which every node (other than Cast and Constant) that reads or writes a float16 or
bfloat16 tensor computes in float32 instead:

    y: L = Op(x: L, w: L)    ->    y = Cast(Op(Cast(x, FLOAT), Cast(w, FLOAT)), to=L)

Its low-type inputs are widened (exact: float16 and bfloat16 are subsets of float32), and each of
its low-type outputs is rounded back to L by a Cast that keeps the value's name, so every tensor is
rounded to L exactly where the real model stores it in L. What differs is the arithmetic inside a
node: it runs in float32. That is TensorRT's fp16 storage / fp32 accumulation model (MatMul, Conv,
reductions and normalisations accumulate in FP32 on tensor cores), an approximation of a real
low-precision engine, not bit-exact: an engine may also round inside a kernel (e.g. elementwise ops
computed in fp16) or fuse nodes and skip a storage rounding. Q/DQ nodes with low-type scales are
wrapped like any other: their scale and data are widened to float32.

Run the result with ORT's graph optimizations disabled (``ORT_DISABLE_ALL``): a Cast pair
FLOAT -> L -> FLOAT is the rounding being emulated, and an optimizer may treat it as redundant.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.passes.quant.mixed_precision import (
    LOW_DTYPES,
    Names,
    infer_dtypes,
    is_default_domain,
    make_cast,
    set_dtype,
)

#: Nodes left as they are: ORT CPU casts between float32 and float16/bfloat16, and holds constants of any type.
UNWRAPPED = frozenset({"Cast", "Constant"})


def emulate_low_precision(model: ir.Model) -> ir.Model:
    """A copy of ``model`` computing in float32 with float16/bfloat16 storage rounding (module docstring).

    The input model is not modified (the copy shares no nodes or values with it; initializer tensors
    are shared, never written)."""
    copy = model.clone()
    dtypes = infer_dtypes(copy)
    names = Names(copy)
    for graph in list(copy.graphs()):
        widened: dict[ir.Value, ir.Value] = {}
        for node in list(graph):
            if is_default_domain(node) and node.op_type in UNWRAPPED:
                continue
            _wrap(graph, node, dtypes, widened, names)
    return copy


def _wrap(graph: ir.Graph, node: ir.Node, dtypes: dict[ir.Value, ir.DataType],
          widened: dict[ir.Value, ir.Value], names: Names) -> None:
    """Widen ``node``'s low-type inputs, compute in float32, round its low-type outputs back."""
    low_inputs = [(i, v) for i, v in enumerate(node.inputs) if v is not None and dtypes.get(v) in LOW_DTYPES]
    low_outputs = [v for v in node.outputs if dtypes.get(v) in LOW_DTYPES]
    if not (low_inputs or low_outputs):
        return
    for index, value in low_inputs:
        wide = widened.get(value)
        if wide is None:
            cast = make_cast(value, ir.DataType.FLOAT, names, "fp32")
            graph.insert_before(node, cast)
            wide = cast.outputs[0]
            dtypes[wide] = ir.DataType.FLOAT
            widened[value] = wide
        node.replace_input_with(index, wide)
    _widen_attributes(node)
    for value in low_outputs:
        _round_output(graph, node, value, dtypes, names)


def _widen_attributes(node: ir.Node) -> None:
    """Attributes that name or hold the low type: DequantizeLinear's output_dtype, ConstantOfShape's value."""
    if not is_default_domain(node):
        return
    if node.op_type == "DequantizeLinear" and ir.DataType(node.attributes.get_int("output_dtype", 0)) in LOW_DTYPES:
        node.attributes["output_dtype"] = ir.AttrInt64("output_dtype", int(ir.DataType.FLOAT))
    attr = node.attributes.get("value") if node.op_type == "ConstantOfShape" else None
    if attr is not None and attr.value.dtype in LOW_DTYPES:
        wide = ir.Tensor(attr.value.numpy().astype(np.float32))
        node.attributes["value"] = ir.AttrTensor("value", wide)


def _round_output(graph: ir.Graph, node: ir.Node, value: ir.Value, dtypes: dict[ir.Value, ir.DataType],
                  names: Names) -> None:
    """``value`` becomes the node's float32 result; a Cast to its low type takes its name and its readers."""
    low = dtypes[value]
    uses = value.uses()
    outputs = [k for k, out in enumerate(graph.outputs) if out is value]
    original = value.name
    value.name = names.fresh(f"{original}_fp32")
    set_dtype(value, ir.DataType.FLOAT)
    dtypes[value] = ir.DataType.FLOAT
    cast = make_cast(value, low, names, "rounded")
    rounded = cast.outputs[0]
    rounded.name = original
    dtypes[rounded] = low
    graph.insert_after(node, cast)
    for user, index in uses:
        user.replace_input_with(index, rounded)
    for k in outputs:
        graph.outputs[k] = rounded


__all__ = ["emulate_low_precision"]
