"""Every FP32 pass on small graphs: the structure it produces, the no-change case, and numerics."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import floats, model_from_text, op_types, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.passes import make_pass

RNG = np.random.default_rng(0)


def apply(name: str, model):
    result = make_pass(name)(model)
    return result.model, result.modified


def assert_same_outputs(before, after, feeds, rtol=1e-5, atol=1e-6):
    for a, b in zip(run_ort(before, feeds), run_ort(after, feeds)):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)


def clone(model):
    import onnx_ir as ir

    return ir.from_proto(ir.to_proto(model))


def test_constant_folding_folds_constant_subgraph():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
      a = Constant <value = float[4] {1, 2, 3, 4}> ()
      b = Constant <value = float[4] {10, 20, 30, 40}> ()
      c = Add(a, b)
      d = Mul(c, c)
      y = Add(x, d)
    }""")
    ref = clone(model)
    out, modified = apply("constant-folding", model)
    assert modified
    assert op_types(out).count("Add") == 1 and "Mul" not in op_types(out)
    feeds = {"x": RNG.standard_normal(4).astype(np.float32)}
    assert_same_outputs(ref, out, feeds)
    _, again = apply("constant-folding", out)
    assert not again


def test_dead_code_removes_unused_nodes():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
      unused = Sigmoid(x)
      unused2 = Relu(unused)
      y = Relu(x)
    }""")
    out, modified = apply("dead-code", model)
    assert modified and op_types(out) == ["Relu"]
    _, again = apply("dead-code", out)
    assert not again


def test_cse_merges_identical_nodes():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
      a = Relu(x)
      b = Relu(x)
      y = Add(a, b)
    }""")
    ref = clone(model)
    out, modified = apply("cse", model)
    assert modified and op_types(out).count("Relu") == 1
    assert_same_outputs(ref, out, {"x": RNG.standard_normal(4).astype(np.float32)})


def test_identity_removed_but_graph_output_kept():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
      a = Identity(x)
      b = Relu(a)
      y = Identity(b)
    }""")
    ref = clone(model)
    out, modified = apply("identity", model)
    assert modified and "Identity" not in op_types(out)
    assert [v.name for v in out.graph.outputs] == ["y"]
    assert_same_outputs(ref, out, {"x": RNG.standard_normal(4).astype(np.float32)})


def test_no_op_removes_add_zero_and_mul_one():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
      z = Constant <value = float {0}> ()
      o = Constant <value = float {1}> ()
      a = Add(x, z)
      b = Mul(o, a)
      y = Relu(b)
    }""")
    ref = clone(model)
    out, modified = apply("no-op", model)
    assert modified and op_types(out) == ["Relu"]
    assert_same_outputs(ref, out, {"x": RNG.standard_normal((2, 3)).astype(np.float32)})


def test_no_op_keeps_broadcasting_add():
    # x + zeros[2, 3] broadcasts x [3] up to [2, 3]: removing it would change the output shape.
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[3] x) => (float[2, 3] y) {
      z = Constant <value = float[2, 3] {0, 0, 0, 0, 0, 0}> ()
      y = Add(x, z)
    }""")
    out, modified = apply("no-op", model)
    assert not modified and op_types(out) == ["Constant", "Add"]


def test_dedup_initializers():
    w = floats(RNG.standard_normal(16))
    model = model_from_text(f"""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) <float[16] w1 = {{{w}}}, float[16] w2 = {{{w}}}, int64[1] s = {{4}}> {{
      a = ReduceSum <keepdims = 0> (w1)
      b = ReduceSum <keepdims = 0> (w2)
      c = Add(a, b)
      y = Add(x, c)
    }}""")
    ref = clone(model)
    out, modified = apply("dedup-initializers", model)
    assert modified and len(out.graph.initializers) == 2
    assert_same_outputs(ref, out, {"x": RNG.standard_normal(4).astype(np.float32)})


def test_dedup_compares_whole_tensors_not_just_the_sampled_bytes():
    """Large tensors equal in their sampled start/middle/end bytes but not elsewhere stay apart."""
    from qcompile.passes.cleanup import DeduplicateInitializersPass

    size = 8 * DeduplicateInitializersPass.SAMPLE_BYTES  # float32: 32 KB each
    base = RNG.standard_normal(size).astype(np.float32)
    near = base.copy()
    near[size // 8] += 1.0  # outside the three sampled windows
    graph = ir.Graph([ir.Value(name="x", shape=ir.Shape([size]), type=ir.TensorType(ir.DataType.FLOAT))], [], nodes=[])
    x = graph.inputs[0]
    total = x
    for name, array in (("a", base), ("b", base.copy()), ("c", near)):
        value = ir.Value(name=name, shape=ir.Shape([size]), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        node = ir.node("Add", [total, value])
        graph.append(node)
        total = node.outputs[0]
    total.name, total.dtype, total.shape = "y", ir.DataType.FLOAT, ir.Shape([size])
    graph.outputs.append(total)
    model = ir.Model(graph, ir_version=9)
    model.opset_imports[""] = 17
    ref = clone(model)
    out, modified = apply("dedup-initializers", model)
    assert modified and sorted(out.graph.initializers) == ["a", "c"]
    assert_same_outputs(ref, out, {"x": RNG.standard_normal(size).astype(np.float32)})


def test_lift_constants_to_initializers():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
      c = Constant <value = float[3] {1, 2, 3}> ()
      y = Add(x, c)
    }""")
    out, modified = apply("lift-constants", model)
    assert modified and op_types(out) == ["Add"] and "c" in out.graph.initializers


def _conv_bn_text(channels: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    w = floats(rng.standard_normal(channels * 2 * 9))
    b = floats(rng.standard_normal(channels))
    gamma = floats(rng.uniform(0.5, 1.5, channels))
    beta = floats(rng.standard_normal(channels))
    mean = floats(rng.standard_normal(channels))
    var = floats(rng.uniform(0.2, 2.0, channels))
    c = channels
    return f"""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[1, 2, 6, 6] x) => (float[1, {c}, 6, 6] y)
      <float[{c}, 2, 3, 3] w = {{{w}}}, float[{c}] b = {{{b}}}, float[{c}] gamma = {{{gamma}}},
       float[{c}] beta = {{{beta}}}, float[{c}] mean = {{{mean}}}, float[{c}] var = {{{var}}}> {{
      h = Conv <pads = [1, 1, 1, 1]> (x, w, b)
      y = BatchNormalization <epsilon = 0.001> (h, gamma, beta, mean, var)
    }}"""


@settings(max_examples=15, deadline=None)
@given(channels=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_fuse_batchnorm_into_conv_matches_numerically(channels, seed):
    model = model_from_text(_conv_bn_text(channels, seed))
    ref = clone(model)
    out, modified = apply("fuse-batchnorm", model)
    assert modified and op_types(out) == ["Conv"]
    x = np.random.default_rng(seed).standard_normal((1, 2, 6, 6)).astype(np.float32)
    assert_same_outputs(ref, out, {"x": x}, rtol=1e-4, atol=1e-5)


def _gemm_text(a_shape, c_shape) -> str:
    rng = np.random.default_rng(1)
    k, n = a_shape[-1], 5
    w = floats(rng.standard_normal(k * n))
    c = floats(rng.standard_normal(int(np.prod(c_shape))))
    out_shape = list(np.broadcast_shapes(tuple(a_shape[:-1]) + (n,), tuple(c_shape)))
    a_dims = ", ".join(map(str, a_shape))
    c_dims = ", ".join(map(str, c_shape))
    o_dims = ", ".join(map(str, out_shape))
    return f"""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[{a_dims}] a) => (float[{o_dims}] y) <float[{k}, {n}] w = {{{w}}}, float[{c_dims}] c = {{{c}}}> {{
      m = MatMul(a, w)
      y = Add(m, c)
    }}"""


@pytest.mark.parametrize(
    "a_shape, c_shape, fused",
    [
        ([3, 4], [5], True),  # bias per column
        ([3, 4], [3, 5], True),  # full bias
        ([3, 4], [1, 5], True),
        ([2, 3, 4], [5], False),  # 3-D MatMul: Gemm is 2-D only
        ([1, 4], [4, 5], False),  # Add would broadcast M from 1 to 4: Gemm cannot
        ([3, 4], [2, 3, 5], False),  # rank-3 bias grows the output
    ],
)
def test_fuse_gemm_only_where_valid(a_shape, c_shape, fused):
    model = model_from_text(_gemm_text(a_shape, c_shape))
    ref = clone(model)
    make_pass("shape-inference")(model)
    out, modified = apply("fuse-gemm", model)
    assert modified is fused
    assert ("Gemm" in op_types(out)) is fused
    assert_same_outputs(ref, out, {"a": RNG.standard_normal(a_shape).astype(np.float32)})


def _layernorm_text(opset: int, eps: float = 1e-5) -> str:
    rng = np.random.default_rng(2)
    scale, bias = floats(rng.standard_normal(8)), floats(rng.standard_normal(8))
    if opset >= 18:
        reduce = 'ReduceMean({x}, axes)'
        axes = 'axes = Constant <value = int64[1] {-1}> ()\n'
    else:
        reduce = 'ReduceMean <axes = [-1]> ({x})'
        axes = ""
    return f"""
    <ir_version: 9, opset_import: ["" : {opset}]>
    g (float[2, 3, 8] x) => (float[2, 3, 8] y) <float[8] scale = {{{scale}}}, float[8] bias = {{{bias}}}> {{
      {axes}
      mean = {reduce.format(x="x")}
      d = Sub(x, mean)
      dd = Mul(d, d)
      var = {reduce.format(x="dd")}
      eps = Constant <value = float {{{eps}}}> ()
      ve = Add(var, eps)
      sd = Sqrt(ve)
      n = Div(d, sd)
      s = Mul(n, scale)
      y = Add(s, bias)
    }}"""


@pytest.mark.parametrize("opset", [17, 18])
def test_fuse_layernorm_from_decomposed_form(opset):
    model = model_from_text(_layernorm_text(opset))
    ref = clone(model)
    make_pass("default-attributes")(model)
    out, modified = apply("fuse-layernorm", model)
    assert modified
    assert [t for t in op_types(out) if t != "Constant"] == ["LayerNormalization"]
    node = next(n for n in out.graph if n.op_type == "LayerNormalization")
    assert node.attributes.get_float("epsilon") == pytest.approx(1e-5)
    assert len(node.inputs) == 3  # bias folded in
    x = RNG.standard_normal((2, 3, 8)).astype(np.float32) * 3 + 1
    assert_same_outputs(ref, out, {"x": x}, rtol=1e-4, atol=1e-5)


def test_fuse_layernorm_skips_opset_below_17():
    text = _layernorm_text(17).replace('"" : 17', '"" : 16')
    model = model_from_text(text)
    make_pass("default-attributes")(model)
    _, modified = apply("fuse-layernorm", model)
    assert not modified


GELU_ERF = """
    <ir_version: 9, opset_import: ["" : {opset}]>
    g (float[2, 16] x) => (float[2, 16] y) {{
      s = Constant <value = float {{1.4142135}}> ()
      d = Div(x, s)
      e = Erf(d)
      one = Constant <value = float {{1.0}}> ()
      e1 = Add(e, one)
      m = Mul(x, e1)
      half = Constant <value = float {{0.5}}> ()
      y = Mul(m, half)
    }}"""

GELU_TANH = """
    <ir_version: 9, opset_import: ["" : {opset}]>
    g (float[2, 16] x) => (float[2, 16] y) {{
      three = Constant <value = float {{3.0}}> ()
      p = Pow(x, three)
      c = Constant <value = float {{0.044715}}> ()
      t2 = Mul(c, p)
      t3 = Add(x, t2)
      k = Constant <value = float {{0.7978845608}}> ()
      t4 = Mul(k, t3)
      t5 = Tanh(t4)
      one = Constant <value = float {{1.0}}> ()
      t6 = Add(t5, one)
      half = Constant <value = float {{0.5}}> ()
      t7 = Mul(half, t6)
      y = Mul(x, t7)
    }}"""


@pytest.mark.parametrize(
    "text, opset, expected",
    [
        (GELU_ERF, 17, ("com.microsoft", "Gelu")),
        (GELU_ERF, 20, ("", "Gelu")),
        (GELU_TANH, 17, ("com.microsoft", "FastGelu")),
        (GELU_TANH, 20, ("", "Gelu")),
    ],
)
def test_fuse_gelu(text, opset, expected):
    model = model_from_text(text.format(opset=opset))
    ref = clone(model)
    out, modified = apply("fuse-gelu", model)
    assert modified
    fused = [(n.domain, n.op_type) for n in out.graph if n.op_type != "Constant"]
    assert fused == [expected]
    x = RNG.standard_normal((2, 16)).astype(np.float32) * 2
    assert_same_outputs(ref, out, {"x": x}, rtol=1e-4, atol=1e-5)


def test_fuse_gelu_leaves_other_erf_alone():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
      e = Erf(x)
      y = Mul(x, e)
    }""")
    _, modified = apply("fuse-gelu", model)
    assert not modified


def test_topo_sort_and_clear_shapes():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
      a = Relu(x)
      y = Sigmoid(a)
    }""")
    make_pass("shape-inference")(model)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert relu.outputs[0].shape is not None
    out, modified = apply("clear-shapes", model)
    assert modified and relu.outputs[0].shape is None
    assert out.graph.outputs[0].shape is not None  # graph outputs keep their shapes
    nodes = list(out.graph)
    out.graph.remove(nodes[0])
    out.graph.append(nodes[0])  # Relu now after its user
    out, modified = apply("topo-sort", out)
    assert modified and op_types(out) == ["Relu", "Sigmoid"]
