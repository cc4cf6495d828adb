"""Annotations on values: the target's annotators write frozen specs into value.meta, the plan is
their ordered view, and a spec per value lets one model mix quantized types."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from conftest import floats, model_from_text, run_ort
from qcompile.calibrate import collect_ranges
from qcompile.calibration import IterableReader
from qcompile.passes.quant.annotate import QuantPolicy, annotate, plan_quantization, read_plan, set_spec
from qcompile.passes.quant.qdq import QDQLoweringPass
from qcompile.quant.qparams import quantize_bias, weight_codes
from qcompile.quant.spec import FLOAT_REASON_KEY, QUANTIZED_KEY, SPEC_KEY, DerivedSpec, QuantSpec, SharedSpec
from qcompile.static_int8 import shared_qparams

RNG = np.random.default_rng(0)


def two_branches() -> ir.Model:
    """Two Gemms (with biases) whose outputs meet in a Concat, then a MatMul; a Softmax at the end."""
    w1, w2 = floats(RNG.standard_normal(8 * 6) * 0.3), floats(RNG.standard_normal(8 * 6) * 0.3)
    b = floats(RNG.standard_normal(6) * 0.1)
    w3 = floats(RNG.standard_normal(12 * 4) * 0.3)
    return model_from_text(f"""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[2, 8] x) => (float[2, 4] y)
      <float[8, 6] w1 = {{{w1}}}, float[8, 6] w2 = {{{w2}}}, float[6] b = {{{b}}}, float[12, 4] w3 = {{{w3}}}> {{
      a = Gemm(x, w1, b)
      c = Gemm(x, w2, b)
      j = Concat <axis = 1> (a, c)
      h = MatMul(j, w3)
      y = Softmax(h)
    }}""")


POLICY = QuantPolicy("test", keep_float=frozenset(), weight_dtype="int8")


def values(model: ir.Model) -> dict[str, ir.Value]:
    found = {v.name: v for v in model.graph.inputs}
    found.update({v.name: v for n in model.graph for v in n.outputs})
    found.update(model.graph.initializers)
    return found


def test_specs_live_on_values_and_nodes_and_read_back_as_the_plan():
    model = two_branches()
    decided = plan_quantization(model, POLICY)
    plan = annotate(model, POLICY)
    v = values(model)
    assert v["x"].meta[SPEC_KEY] == QuantSpec("uint8", False)
    assert v["w1"].meta[SPEC_KEY] == QuantSpec("int8", True, 1, role="weight")  # Gemm without transB: axis 1
    roots = {v[name].meta[SPEC_KEY].value for name in ("a", "c") if isinstance(v[name].meta[SPEC_KEY], SharedSpec)}
    assert len(roots) == 1 and isinstance(v["j"].meta[SPEC_KEY], (QuantSpec, SharedSpec))  # one Concat scale group
    biases = [d for _, d in v["b"].meta["qcompile.quant.bias"]]
    assert {d.consumer for d in biases} == {n.name for n in model.graph if n.op_type == "Gemm"}
    assert all(isinstance(d, DerivedSpec) and d.activation == "x" for d in biases)  # one per consumer
    gemms = [n for n in model.graph if n.op_type in ("Gemm", "MatMul")]
    assert all(n.meta.get(QUANTIZED_KEY) for n in gemms)
    assert (plan.activations, list(plan.weights), list(plan.biases), plan.quantized_nodes) == \
        (decided.activations, list(decided.weights), list(decided.biases), decided.quantized_nodes)
    assert sorted(map(sorted, plan.shared)) == sorted(map(sorted, [g for g in decided.shared if len(g) > 1]))


def test_reannotating_replaces_the_old_specs_and_names_why_a_node_stays_float():
    model = two_branches()
    annotate(model, POLICY)
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    plan = annotate(model, POLICY, float_reasons={matmul.name: "measured too noisy"})
    assert matmul.name not in plan.quantized_nodes and plan.kept_float[matmul.name] == "measured too noisy"
    assert matmul.meta[FLOAT_REASON_KEY] == "measured too noisy" and QUANTIZED_KEY not in matmul.meta
    assert SPEC_KEY not in values(model)["w3"].meta  # its weight is no longer annotated


def test_one_model_mixes_activation_types_because_each_value_carries_its_own():
    """Re-annotate one activation as symmetric int8: the lowering gives it an int8 zero point 0 while
    the others keep uint8 with their zero points, and the mixed model runs close to float."""
    model = two_branches()
    feeds = [{"x": RNG.standard_normal((2, 8)).astype(np.float32)} for _ in range(8)]
    reference = run_ort(model, feeds[0])[0]
    annotate(model, POLICY)
    set_spec(model, values(model)["h"], QuantSpec("int8", True))  # the MatMul's output, before the Softmax
    plan = read_plan(model)
    assert plan.activations[-1] == "h"
    ranges = collect_ranges(model, plan.activations, IterableReader(feeds), method="minmax").ranges
    qparams = shared_qparams(model, plan, ranges)
    assert qparams["h"].dtype == "int8" and int(qparams["h"].zero_point) == 0
    assert qparams["x"].dtype == "uint8"
    QDQLoweringPass(qparams, weight_codes(), quantize_bias)(model)
    zero_dtypes = {n.inputs[0].name: n.inputs[2].const_value.numpy().dtype for n in model.graph
                   if n.op_type == "QuantizeLinear"}
    assert zero_dtypes["h"] == np.int8 and zero_dtypes["x"] == np.uint8
    got = run_ort(model, feeds[0])[0]
    assert np.abs(got - reference).max() < 0.05
