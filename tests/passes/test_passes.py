"""Every FP32 pass on small graphs: the structure it produces, the no-change case, and numerics."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import floats, model_from_text, op_types, run_ort
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
    from qcompile.passes.graph.cleanup import DeduplicateInitializersPass

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


# Regressions found by ONNX's node suite (tools/node_suite.py): subgraphs, sequences, evaluator bugs.

SCAN_SUM = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[2] initial, float[3,2] x) => (float[2] y, float[3,2] z) {
  y, z = Scan <num_scan_inputs = 1, body = body (float[2] sum_in, float[2] next)
                                                => (float[2] sum_out, float[2] scan_out) {
    sum_out = Add(sum_in, next)
    scan_out = Identity(sum_out)
  }> (initial, x)
}"""


def test_identity_keeps_scan_output_that_is_also_the_carried_state():
    # test_scan_sum: removing the Identity listed sum_out twice among the body's outputs (and
    # renamed it), and ONNX Runtime's Scan then returned other values for both outputs.
    model = model_from_text(SCAN_SUM)
    ref = clone(model)
    out, modified = apply("identity", model)
    body = next(n for n in out.graph if n.op_type == "Scan").attributes["body"].as_graph()
    assert not modified and [n.op_type for n in body] == ["Add", "Identity"]
    feeds = {"initial": np.zeros(2, np.float32), "x": RNG.standard_normal((3, 2)).astype(np.float32)}
    assert_same_outputs(ref, out, feeds)


def test_identity_keeps_two_graph_outputs_distinct():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y, float[4] z) {
      y = Relu(x)
      z = Identity(y)
    }""")
    out, modified = apply("identity", model)
    assert not modified and [v.name for v in out.graph.outputs] == ["y", "z"]


def test_identity_keeps_subgraph_output_taken_from_the_outer_scope():
    # A branch returning an outer value through Identity: onnx-ir renamed the outer value to the
    # branch output's name and returned it directly (the checker and ORT reject both).
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (bool c, float[4] x) => (float[4] y) {
      a = Relu(x)
      y = If(c) <then_branch = t () => (float[4] t_out) {
        t_out = Identity(a)
      }, else_branch = e () => (float[4] e_out) {
        e_out = Neg(a)
      }>
    }""")
    ref = clone(model)
    out, modified = apply("identity", model)
    assert not modified
    assert [n.outputs[0].name for n in out.graph] == ["a", "y"]
    for c in (True, False):
        assert_same_outputs(ref, out, {"c": np.array(c), "x": RNG.standard_normal(4).astype(np.float32)})


def test_identity_still_removed_inside_a_subgraph():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (bool c, float[4] x) => (float[4] y) {
      y = If(c) <then_branch = t () => (float[4] t_out) {
        i = Identity(x)
        t_out = Relu(i)
      }, else_branch = e () => (float[4] e_out) {
        e_out = Neg(x)
      }>
    }""")
    ref = clone(model)
    out, modified = apply("identity", model)
    then = next(iter(out.graph)).attributes["then_branch"].as_graph()
    assert modified and [n.op_type for n in then] == ["Relu"]
    assert_same_outputs(ref, out, {"c": np.array(True), "x": RNG.standard_normal(4).astype(np.float32)})


def test_constant_folding_leaves_a_node_its_evaluator_fails_on():
    # test_split_to_sequence_1: onnxscript's SplitToSequence evaluator reads `split_value.ndim`
    # when `split` is a scalar of unknown value; the pass crashed instead of leaving the node.
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[3,6] data, int64 split) => (seq(float[3,?]) s) {
      s = SplitToSequence <axis = 1> (data, split)
    }""")
    out, modified = apply("constant-folding", model)
    assert not modified and op_types(out) == ["SplitToSequence"]


def test_shape_inference_keeps_sequence_and_optional_types():
    # test_if_opt, test_sequence_map_*_expanded: onnx-ir's merge set only the element dtype, so an
    # untyped seq(tensor(float)) value became tensor(float) and ORT refused the model.
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
      zero = Constant <value = int64 {0}> ()
      s = SequenceConstruct(x, x)
      o = Optional(s)
      s2 = OptionalGetElement(o)
      y = SequenceAt(s2, zero)
    }""")
    ref = clone(model)
    out, modified = apply("shape-inference", model)
    types = {v.name: v.type for n in out.graph for v in n.outputs}
    assert modified
    assert isinstance(types["s"], ir.SequenceType) and isinstance(types["o"], ir.OptionalType)
    assert isinstance(types["y"], ir.TensorType) and out.graph.node(4).outputs[0].shape == ir.Shape([4])
    assert_same_outputs(ref, out, {"x": RNG.standard_normal(4).astype(np.float32)})


@pytest.mark.parametrize("name", ["fuse-gelu", "fuse-layernorm", "fuse-batchnorm", "fuse-gemm"])
def test_fusions_skip_models_without_their_ops(name):
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 20]>
    g (float[4] x) => (float[4] y) {
      y = Relu(x)
    }""")
    p = make_pass(name)
    result = p(model)
    assert not result.modified and p.count == 0


def test_fuse_layernorm_still_folds_a_bias_into_an_existing_layernorm():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[2,8] x) => (float[2,8] y) <float[8] scale = {1,2,3,4,5,6,7,8}, float[8] bias = {1,1,1,1,2,2,2,2}> {
      n = LayerNormalization <axis = -1> (x, scale)
      y = Add(n, bias)
    }""")
    ref = clone(model)
    out, modified = apply("fuse-layernorm", model)
    assert modified and op_types(out) == ["LayerNormalization"] and len(next(iter(out.graph)).inputs) == 3
    assert_same_outputs(ref, out, {"x": RNG.standard_normal((2, 8)).astype(np.float32)})


def test_cse_and_folding_reach_a_fixed_point_on_twin_graph_outputs():
    # y = Identity(x), z = Identity(y): folding rewrites z = Identity(x), and onnx-ir's CSE merged
    # it into y, putting z = Identity(y) back: both passes "modified" the model every sweep.
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y, float[2] z) {
      y = Identity(x)
      z = Identity(y)
    }""")
    ref = clone(model)
    out, modified = apply("constant-folding", model)
    assert modified
    out, modified = apply("cse", out)
    assert not modified and [v.name for v in out.graph.outputs] == ["y", "z"]
    assert all("_qcompile_cse_keep" not in n.attributes for n in out.graph)
    assert_same_outputs(ref, out, {"x": RNG.standard_normal(2).astype(np.float32)})


def test_dead_code_drops_unused_initializers_of_a_subgraph():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (bool c, float[2] x) => (float[2] y) {
      y = If(c) <then_branch = t () => (float[2] a) <float[2] unused = {1, 2}> { a = Relu(x) },
                 else_branch = e () => (float[2] b) { b = Neg(x) }>
    }""")
    out, modified = apply("dead-code", model)
    then = next(iter(out.graph)).attributes["then_branch"].as_graph()
    assert modified and not then.initializers


IR3 = """
<ir_version: 3, opset_import: ["" : 8]>
g (float[2] x) => (float[2] y) {
  a = Constant <value = float[2] {1, 2}> ()
  b = Constant <value = float[2] {3, 4}> ()
  c = Add(a, b)
  y = Mul(x, c)
}"""


@pytest.mark.parametrize("name", ["lift-constants", "constant-folding"])
def test_passes_that_add_initializers_raise_an_ir3_model_to_ir4(name):
    # Up to IR 3 an initializer must also be a graph input: the lifted or folded model failed the
    # checker (old opset-8/9 exports).
    import onnx

    model = model_from_text(IR3)
    ref = clone(model)
    out, modified = apply(name, model)
    assert modified and out.ir_version == 4 and out.graph.initializers
    onnx.checker.check_model(ir.to_proto(out), full_check=True)
    assert [v.name for v in out.graph.inputs] == ["x"]
    assert_same_outputs(ref, out, {"x": RNG.standard_normal(2).astype(np.float32)})


def test_ir3_model_without_new_initializers_keeps_its_ir_version():
    model = model_from_text("""
    <ir_version: 3, opset_import: ["" : 8]>
    g (float[2] x) => (float[2] y) {
      y = Relu(x)
    }""")
    out, _ = apply("constant-folding", model)
    assert out.ir_version == 3
