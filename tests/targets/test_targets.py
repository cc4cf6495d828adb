"""The target registry and the portable onnx-qdq target: one module plus one registry line each."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qcompile
from conftest import floats, model_from_text, run_ort
from qcompile import targets
from qcompile.calibration import IterableReader
from qcompile.errors import InputModelError, UnknownNameError
from qcompile.pipeline import Pipeline
from qcompile.recipes import preset

RNG = np.random.default_rng(0)


def test_registry_names_every_target_and_each_module_declares_it():
    assert targets.names() == ("ort-cpu", "onnx-qdq", "tensorrt", "ort-trt", "ort-cuda", "migraphx")
    for name in targets.names():
        target = targets.get(name)
        assert target.name == name and target.calibration_runtime == "ort-cpu"
        assert set(target.passes) <= set(qcompile.passes.PASSES)
        assert set(target.annotators) <= set(qcompile.passes.quant.annotate.ANNOTATORS)
    with pytest.raises(UnknownNameError, match="choose from: ort-cpu, onnx-qdq, tensorrt"):
        targets.get("tensorrt-42")


def test_onnx_qdq_declares_no_contrib_fusions_and_no_matmulnbits():
    target = targets.get("onnx-qdq")
    assert "fuse-gelu" not in target.passes and "fuse-gelu" in targets.get("ort-cpu").passes
    assert not target.accepts("matmulnbits") and target.accepts("blocked-dq")
    assert target.min_opset >= 13 and target.strict_check and not target.contrib_ops


def mlp(opset: int = 13) -> ir.Model:
    """Conv -> Relu -> flatten -> Gemm -> Erf-GELU -> MatMul: a Conv, a Gemm, a GELU ORT would fuse."""
    w1, b1 = floats(RNG.standard_normal(4 * 3 * 3 * 3) * 0.3), floats(RNG.standard_normal(4) * 0.1)
    w2, w3 = floats(RNG.standard_normal(64 * 32) * 0.2), floats(RNG.standard_normal(32 * 8) * 0.2)
    return model_from_text(f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[1, 3, 4, 4] x) => (float[1, 8] y)
      <float[4, 3, 3, 3] w1 = {{{w1}}}, float[4] b1 = {{{b1}}}, float[64, 32] w2 = {{{w2}}},
       float[32, 8] w3 = {{{w3}}}, float sqrt2 = {{1.4142135}}, float one = {{1.0}}, float half = {{0.5}},
       int64[2] flat = {{1, 64}}> {{
      c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      r = Relu(c)
      f = Reshape(r, flat)
      h = MatMul(f, w2)
      d = Div(h, sqrt2)
      e = Erf(d)
      p = Add(e, one)
      m = Mul(h, p)
      g2 = Mul(m, half)
      y = MatMul(g2, w3)
    }}""")


def feeds(n: int) -> list[dict]:
    return [{"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)} for _ in range(n)]


def test_onnx_qdq_is_symmetric_int8_standard_onnx_that_passes_the_strict_checker_and_runs(tmp_path):
    model, calib = mlp(), feeds(8)
    reference = [run_ort(model, f)[0] for f in calib[:2]]  # before: the pipeline works in place
    result = Pipeline(preset("int8").with_(min_sqnr_db=None), "onnx-qdq").run(model, IterableReader(calib))
    assert result.target == "onnx-qdq" and result.plan.quantized_nodes
    path = tmp_path / "q.onnx"
    qcompile.save(result.model, path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # GELU left as standard ops
    assert proto.opset_import[0].version >= 13
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = inits[node.input[2]]
            assert zero.dtype in (np.int8, np.int32) and not zero.any(), node.name  # symmetric: zero points 0
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and inits.get(node.input[0]) is not None \
                and inits[node.input[0]].dtype == np.int8 and inits[node.input[0]].ndim == 4:
            assert {a.name: a.i for a in node.attribute}.get("axis", 1) == 0  # Conv weights per output channel
    for f, ref in zip(calib[:2], reference):
        got = run_ort(proto, f)[0]
        assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)) > 20  # INT8 of a shallow net


def test_onnx_qdq_raises_an_old_opset_to_13(tmp_path):
    result = Pipeline(preset("int8").with_(min_sqnr_db=None), "onnx-qdq").run(mlp(opset=11), IterableReader(feeds(4)))
    assert result.details.opset.after >= 13 and result.details.opset.action == "upgraded"


def test_onnx_qdq_weight_only_lowers_blocked_dq_not_matmulnbits():
    w = floats(RNG.standard_normal(128 * 16) * 0.1)
    model = model_from_text(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 128] x) => (float[2, 16] y) <float[128, 16] w = {{{w}}}> {{
      h = MatMul(x, w)
      y = Relu(h)
    }}""")
    result = Pipeline(preset("w8-weight-only").with_(include_lm_head=True), "onnx-qdq").run(model)
    ops = {n.op_type for n in result.model.graph}
    assert "MatMulNBits" not in ops and "DequantizeLinear" in ops
    assert any("blocked DequantizeLinear" in note for note in result.notes)


def test_onnx_qdq_refuses_a_model_with_contrib_ops_as_the_users_input():
    proto = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])]),
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)])
    model = ir.from_proto(proto)
    with pytest.raises(InputModelError, match="standard ONNX only; the model uses com.microsoft"):
        Pipeline(preset("int8"), "onnx-qdq").run(model, IterableReader(feeds(1)))
