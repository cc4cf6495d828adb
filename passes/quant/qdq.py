"""Lowering the annotations (passes/quant/annotate.py) to standard QDQ ONNX (opset 13+).

Weights (weights.py is folded in here, one plan, one lowering):
    W            -> DequantizeLinear(W_q: int8, s_w[C], 0, axis)           per channel (or tensor)
    bias b       -> DequantizeLinear(b_q: int32, s_x * s_w[C], 0, axis=0)
Activations:
    x            -> DequantizeLinear(QuantizeLinear(x, s_x, z_x), s_x, z_x)  on every consumer (or, where
                    the annotation names them, on the consumers that run quantized only)
Element types: int8/uint8, or float8e4m3fn (opset 19) for weights and activations alike.

The runtime sees ``DQ -> op -> Q`` and fuses it into an integer kernel. Graph outputs keep their
float values. The pass makes no decisions: the plan (quant_policy.py) and the activation
parameters (computed by the core from calibration) say everything; the codes come from qcompile.quant
through the caller.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import onnx_ir as ir

from qcompile.passes.graph.rewrite import allow_initializers
from qcompile.passes.irutil import add_initializer, drop_resident
from qcompile.passes.quant.annotate import QuantPlan, read_plan
from qcompile.quant.dtypes import qdtype
from qcompile.quant.spec import QParams

#: (weight name, W, axis, storage dtype) -> (codes as stored, parameters)
WeightCodesFn = Callable[[str, np.ndarray, "int | None", str], "tuple[np.ndarray, QParams]"]
#: (b, s_x, s_w) -> (int32 codes, parameters)
BiasCodesFn = Callable[[np.ndarray, np.ndarray, np.ndarray], "tuple[np.ndarray, QParams]"]


class QDQLoweringPass(ir.passes.InPlacePass):
    """Insert Q/DQ for activations and INT8/INT32 weights/biases according to a plan."""

    name = "qdq-lowering"

    def __init__(self, activation_qparams: Mapping[str, QParams], weight_codes: WeightCodesFn,
                 bias_codes: BiasCodesFn) -> None:
        """Lowers the annotations on the model (passes/quant/annotate.py); ``activation_qparams``: the
        parameters observed per annotated activation; ``weight_codes`` and ``bias_codes`` compute the
        stored codes (qcompile.quant), one weight at a time, so no second copy of the weights is held."""
        super().__init__()
        self.plan = QuantPlan()
        self.activation_qparams = activation_qparams
        self.weight_codes = weight_codes
        self.bias_codes = bias_codes
        self.weight_qparams: dict[str, QParams] = {}
        #: what was lowered, for the model's records (qcompile/records.py): float name -> DQ output name
        self.activation_dq: dict[str, str] = {}
        self.weight_dq: dict[str, str] = {}
        #: per weight, 10 log10(|W|^2 / |W - DQ(W_q)|^2): the weight's own quantization SQNR in dB
        self.weight_sqnr_db: dict[str, float] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.plan = read_plan(model)
        graph = model.graph
        nodes = {node.name: node for node in graph}
        values = {v.name: v for node in graph for v in node.outputs}
        values.update({v.name: v for v in graph.inputs})
        values.update(graph.initializers)
        modified = self._lower_weights(graph, nodes, values)
        modified |= self._lower_biases(graph, nodes, values)
        modified |= self._lower_activations(graph, values)
        allow_initializers(model)  # an IR < 4 model may not hold initializers that are not inputs
        return ir.passes.PassResult(model, modified)

    def _dq(self, graph: ir.Graph, base: str, q: np.ndarray, qp: QParams, before: ir.Node | None) -> ir.Value:
        q_val = add_initializer(graph, f"{base}_quantized", q)
        s_val = add_initializer(graph, f"{base}_scale", np.asarray(qp.scale, dtype=np.float32))
        z_val = add_initializer(graph, f"{base}_zero_point", np.asarray(qp.zero_point))
        attrs = {"axis": qp.axis} if qp.axis is not None else {}
        node = ir.node("DequantizeLinear", [q_val, s_val, z_val], attributes=attrs, name=f"{base}_DequantizeLinear")
        node.outputs[0].name = f"{base}_dequantized"
        node.outputs[0].dtype = ir.DataType.FLOAT
        node.outputs[0].shape = ir.Shape(q.shape)
        if before is not None:
            graph.insert_before(before, node)
        else:
            graph.insert_before(next(iter(graph)), node)
        return node.outputs[0]

    def _lower_weights(self, graph, nodes, values) -> bool:
        modified = False
        for spec in self.plan.weights.values():
            weight = values[spec.value]
            w = weight.const_value.numpy()
            q, qp = self.weight_codes(spec.value, w, spec.axis, spec.dtype)
            self.weight_sqnr_db[spec.value] = _sqnr_db(w, _dequantize(q, qp))
            drop_resident(weight.const_value)  # read once; a large model's pages need not stay resident
            self.weight_qparams[spec.value] = qp
            first = nodes[spec.consumers[0][0]]
            dq = self._dq(graph, spec.value, q, qp, first)
            self.weight_dq[spec.value] = dq.name
            for node_name, index in spec.consumers:
                nodes[node_name].replace_input_with(index, dq)
            modified = True
        return modified

    def _lower_biases(self, graph, nodes, values) -> bool:
        modified = False
        for spec in self.plan.biases.values():
            act = self.activation_qparams.get(spec.activation)
            wqp = self.weight_qparams.get(spec.weight)
            if act is None or wqp is None:
                continue
            bias = values[spec.value].const_value.numpy()
            q, qp = self.bias_codes(bias, act.scale, wqp.scale)
            node = nodes[spec.consumer[0]]
            dq = self._dq(graph, f"{spec.value}_{spec.consumer[0]}", q, qp, node)
            node.replace_input_with(spec.consumer[1], dq)
            modified = True
        return modified

    def _lower_activations(self, graph, values) -> bool:
        modified = False
        for name in self.plan.activations:
            value = values.get(name)
            qp = self.activation_qparams.get(name)
            if value is None or qp is None:
                continue
            readers = self.plan.consumers.get(name)
            uses = [(user, index) for user, index in value.uses()
                    if readers is None or (user.name, index) in set(readers)]
            if not uses:
                continue
            base = name.replace("/", "_").strip("_") or "x"
            scale = add_initializer(graph, f"{base}_act_scale", np.asarray(qp.scale, dtype=np.float32))
            zero = add_initializer(graph, f"{base}_act_zero_point", np.asarray(qp.zero_point))
            quant = ir.node("QuantizeLinear", [value, scale, zero], name=f"{base}_QuantizeLinear")
            quant.outputs[0].name = f"{base}_quantized"
            quant.outputs[0].dtype = ir.DataType[qdtype(qp.dtype).onnx]
            dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale, zero], name=f"{base}_DequantizeLinear")
            dequant.outputs[0].name = f"{base}_dequantized"
            dequant.outputs[0].dtype = ir.DataType.FLOAT
            producer = value.producer()
            if producer is not None:
                graph.insert_after(producer, [quant, dequant])
            else:
                first = next(iter(graph))
                graph.insert_before(first, [quant, dequant])
            for user, index in uses:
                user.replace_input_with(index, dequant.outputs[0])
            self.activation_dq[name] = dequant.outputs[0].name
            modified = True
        return modified


def _dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """(q - z) * s, with per-channel parameters broadcast along ``qp.axis``."""
    scale = np.asarray(qp.scale, dtype=np.float32)
    zero = np.asarray(qp.zero_point).astype(np.float32)
    if qp.axis is not None and scale.ndim == 1:
        shape = [1] * q.ndim
        shape[qp.axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q.astype(np.float32) - zero) * scale


def _sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    """In float32 (a dB figure; no float64 copy of a large weight)."""
    x, e = np.asarray(x, dtype=np.float32).ravel(), (np.asarray(x, dtype=np.float32) - y).ravel()
    signal, noise = float(x @ x), float(e @ e)
    return float("inf") if noise == 0.0 else (float("-inf") if signal == 0.0 else 10.0 * np.log10(signal / noise))
