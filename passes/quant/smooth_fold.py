"""SmoothQuant scale folding (Xiao et al., 2023): move activation outliers into the weights.

For an activation X [.., K] consumed only by MatMul/Gemm nodes with constant weights W_i [K, N_i]:

    s_j = max|X_j|^alpha / max_i max_n |W_i[j, n]|^(1 - alpha)          (per input channel j)
    Y_i = X W_i = (X diag(1/s)) (diag(s) W_i)

1/s is folded into X's producer, so the model computes exactly the same function:

    LayerNormalization(x, g, b)  ->  LayerNormalization(x, g/s, b/s)
    Mul(x, g)   (g constant [K], e.g. decomposed RMSNorm)  ->  Mul(x, g/s)

and s into every consumer's weight rows (Q, K and V share one activation, hence one s).

Where 1/s cannot be folded — X also feeds a residual Add (post-LN BERT), or its producer is not one of
the above (GELU) — an explicit ``Mul(X, 1/s)`` is inserted on the MatMul branch only, which keeps the
other consumers untouched at the price of one elementwise op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.passes.irutil import add_initializer, weight_kn


@dataclass
class SmoothGroup:
    """One activation, the node that produces it, and the MatMul/Gemm nodes that consume it."""

    activation: str
    producer: str | None
    consumers: list[str] = field(default_factory=list)
    fold: bool = True  # False: insert Mul(X, 1/s) before the consumers instead


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _producer_ok(node: ir.Node, k: int) -> bool:
    if node.op_type == "LayerNormalization":
        scale = _const(node.inputs[1])
        bias = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        axis = node.attributes.get_int("axis", -1)
        return (axis == -1 and scale is not None and scale.shape == (k,) and (bias is None or bias.shape == (k,))
                and len(node.inputs[1].uses()) == 1 and (bias is None or len(node.inputs[2].uses()) == 1))
    if node.op_type == "Mul":
        g = next((_const(v) for v in node.inputs if _const(v) is not None), None)
        shared = any(v.const_value is not None and len(v.uses()) > 1 for v in node.inputs)
        return g is not None and g.shape == (k,) and not shared
    return False


def find_groups(model: ir.Model) -> list[SmoothGroup]:
    """Activations feeding constant-weight MatMul/Gemm nodes (each owning its weight, one K).

    Node names are made unique first: groups refer to nodes by name.
    """
    common_passes.NameFixPass()(model)
    values = [v for v in model.graph.inputs] + [v for node in model.graph for v in node.outputs]
    groups = []
    for x in values:
        if x.dtype not in (ir.DataType.FLOAT, None):
            continue
        uses = list(x.uses())
        consumers = [u for u, index in uses if index == 0 and weight_kn(u) is not None
                     and len(u.inputs[1].uses()) == 1 and u.inputs[1] is not x]
        if not consumers:
            continue
        k = weight_kn(consumers[0]).shape[0]
        if any(weight_kn(c).shape[0] != k for c in consumers):
            continue
        producer = x.producer()
        fold = (producer is not None and len(consumers) == len(uses) and not x.is_graph_output()
                and _producer_ok(producer, k))
        groups.append(SmoothGroup(x.name, producer.name if producer is not None else None,
                                  [c.name for c in consumers], fold))
    return groups


def weight_row_absmax(model: ir.Model, group: SmoothGroup) -> np.ndarray:
    """max_i max_n |W_i[j, n]| over the group's consumers, per input channel j."""
    nodes = {n.name: n for n in model.graph}
    return np.max([np.abs(weight_kn(nodes[c])).max(axis=1) for c in group.consumers], axis=0)


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)


class SmoothQuantPass(ir.passes.InPlacePass):
    """Fold per-channel smoothing scales (computed by the core from calibration) into the graph."""

    name = "smoothquant"

    def __init__(self, groups: list[SmoothGroup], scales: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.groups = groups
        self.scales = scales

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = {n.name: n for n in model.graph}
        values = {v.name: v for v in model.graph.inputs}
        values.update({v.name: v for n in model.graph for v in n.outputs})
        modified = False
        for group in self.groups:
            s = self.scales.get(group.activation)
            if s is None:
                continue
            consumers = [nodes[name] for name in group.consumers]
            if group.fold:
                self._fold_into_producer(nodes[group.producer], s)
            else:
                self._insert_mul(model.graph, values[group.activation], consumers, s)
            for node in consumers:
                w = _const(node.inputs[1])
                transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
                _set_const(node.inputs[1], w * (s[None, :] if transposed else s[:, None]))
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _fold_into_producer(producer: ir.Node, s: np.ndarray) -> None:
        if producer.op_type == "LayerNormalization":
            _set_const(producer.inputs[1], _const(producer.inputs[1]) / s)
            if len(producer.inputs) > 2 and producer.inputs[2] is not None:
                _set_const(producer.inputs[2], _const(producer.inputs[2]) / s)
        else:  # Mul by a constant vector
            g = next(v for v in producer.inputs if v.const_value is not None)
            _set_const(g, _const(g) / s)

    @staticmethod
    def _insert_mul(graph: ir.Graph, x: ir.Value, consumers: list[ir.Node], s: np.ndarray) -> None:
        base = x.name.replace("/", "_").strip("_") or "x"
        inv = add_initializer(graph, f"{base}_smooth_inv_scale", (1.0 / s).astype(np.float32))
        mul = ir.node("Mul", [x, inv], name=f"{base}_SmoothQuant_Mul")
        mul.outputs[0].name = f"{base}_smoothed"
        mul.outputs[0].dtype = ir.DataType.FLOAT
        producer = x.producer()
        if producer is not None:
            graph.insert_after(producer, mul)
        else:
            graph.insert_before(next(iter(graph)), mul)
        for node in consumers:
            node.replace_input_with(0, mul.outputs[0])
