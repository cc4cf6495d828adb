"""Mixed precision (passes/quant/mixed_precision.py) and its float32 emulation (passes/quant/emulate.py).

Numerics. A stored float16 tensor is its float32 value times (1 + d), |d| <= u = 2^-11 (bfloat16:
2^-8). The emulated model (fp16 storage, fp32 compute) rounds once per stored tensor: the graph
input's Cast, each converted weight, each node output. To first order the relative errors add up
along a path, each weighted by the output's condition number with respect to that tensor; the
models below are well-conditioned (weights ~ 1/sqrt(fan_in), O(1) activations and logits, random
signs), so that weight is <= 1 and

    rel L2(emulated, fp32) <= (stored tensors on the longest path) * u          (STORAGE bound)

ONNX's ReferenceEvaluator runs the real fp16 model natively in numpy float16: the same storage
roundings, but it also rounds inside composite ops (Softmax: subtract, exp, sum, divide; the
reference BatchNormalization: five elementwise steps) where the emulation computes in float32 and
rounds once. Each op on the path adds at most one differing output rounding plus its internal ones:

    rel L2(reference fp16, emulated) <= (ops on the path + internal roundings) * u   (KERNEL bound)

Over 40 seeds the measured errors stay 4x - 9x below these bounds (the tests run seed 7).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from conftest import run_ort
from graphgen import graphs
from qcompile.passes.quant.emulate import emulate_low_precision
from qcompile.passes.quant.mixed_precision import (
    DEFAULT_HEADROOM,
    FP16_MAX,
    MixedPrecisionPass,
    remove_redundant_casts,
)

U16 = 2.0**-11
U_BF16 = 2.0**-8
F, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
SEED = 7
RNG = np.random.default_rng(SEED)


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws its weights and feeds from its own seeded generator, whichever tests run."""
    global RNG
    RNG = np.random.default_rng(SEED)


# -- helpers ------------------------------------------------------------------------------------------

def make(nodes, inputs, outputs, inits=(), opset: int = 19, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def vi(name: str, shape, elem=F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def weight(name: str, shape, fan_in: int) -> onnx.TensorProto:
    return init(name, (RNG.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))


def convert(proto: onnx.ModelProto, dtype: str = "float16", check: bool = True, **options):
    """(converted model, the pass after its run, converted proto); the proto passed the full check."""
    mp = MixedPrecisionPass(dtype, **options)
    model = mp(ir.from_proto(proto)).model
    out = ir.to_proto(model)
    if check:
        onnx.checker.check_model(out, full_check=True)
    return model, mp, out


def casts(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Cast"]


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def rel_l2(a, b) -> float:
    """||a - b|| / ||b||; for an all-zero b, ||a - b|| (0 when a is zero too)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / (norm if norm > 0 else 1.0)


def assert_interface(proto: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """Graph inputs and outputs keep their names and FLOAT types."""
    for before, after in ((proto.graph.input, out.graph.input), (proto.graph.output, out.graph.output)):
        assert [v.name for v in after] == [v.name for v in before]
        assert [v.type.tensor_type.elem_type for v in after] == [v.type.tensor_type.elem_type for v in before]


def emulated(model: ir.Model, feeds) -> list[np.ndarray]:
    em = emulate_low_precision(model)
    onnx.checker.check_model(ir.to_proto(em), full_check=True)
    return run_ort(em, feeds)


def mlp() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "b1"], ["h2"], name="add1"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("MatMul", ["h3", "W2"], ["h4"], name="mm2"),
        helper.make_node("Add", ["h4", "b2"], ["h5"], name="add2"),
        helper.make_node("Softmax", ["h5"], ["y"], name="softmax", axis=-1),
    ]
    inits = [weight("W1", (16, 32), 16), init("b1", RNG.uniform(-0.1, 0.1, 32).astype(np.float32)),
             weight("W2", (32, 10), 32), init("b2", RNG.uniform(-0.1, 0.1, 10).astype(np.float32))]
    return make(nodes, [vi("x", ["N", 16])], [vi("y", ["N", 10])], inits)


def cnn(opset: int = 19) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "Wc1", "Bc1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "Wc2", "Bc2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wg", "Bg"], ["y"], name="gemm", transB=1),
    ]
    inits = [
        weight("Wc1", (4, 3, 3, 3), 27), init("Bc1", RNG.uniform(-0.1, 0.1, 4).astype(np.float32)),
        init("bn_s", RNG.uniform(0.5, 1.5, 4).astype(np.float32)),
        init("bn_b", RNG.uniform(-0.2, 0.2, 4).astype(np.float32)),
        init("bn_m", RNG.uniform(-0.2, 0.2, 4).astype(np.float32)),
        init("bn_v", RNG.uniform(0.5, 1.5, 4).astype(np.float32)),
        weight("Wc2", (8, 4, 3, 3), 36), init("Bc2", RNG.uniform(-0.1, 0.1, 8).astype(np.float32)),
        weight("Wg", (5, 8), 8), init("Bg", RNG.uniform(-0.1, 0.1, 5).astype(np.float32)),
    ]
    return make(nodes, [vi("x", [2, 3, 8, 8])], [vi("y", [2, 5])], inits, opset=opset)


# -- whole models -------------------------------------------------------------------------------------

def test_mlp_to_fp16():
    proto = mlp()
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    assert mp.kept_fp32 == {} and mp.converted == ["mm1", "add1", "relu", "mm2", "add2", "softmax"]
    assert len(casts(model)) == 2  # the input's and the output's
    assert all(model.graph.initializers[w].const_value.dtype == ir.DataType.FLOAT16 for w in ("W1", "b1", "W2", "b2"))
    feeds = {"x": RNG.standard_normal((4, 16)).astype(np.float32)}
    fp32 = run_ort(proto, feeds)[0]
    emu = emulated(model, feeds)[0]
    # stored tensors on the longest path: x, W1, h1, b1, h2, h3, W2, h4, b2, h5, y
    assert rel_l2(emu, fp32) <= 11 * U16
    real = ReferenceEvaluator(out).run(None, feeds)[0]
    # 6 ops, 3 internal roundings in the reference's Softmax (subtract, exp, sum -> then divide)
    assert real.dtype == np.float32 and rel_l2(real, emu) <= (6 + 3) * U16


def test_cnn_to_fp16():
    proto = cnn()
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    assert mp.kept_fp32 == {} and len(mp.converted) == 9
    assert len(casts(model)) == 2
    feeds = {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    fp32 = run_ort(proto, feeds)[0]
    emu = emulated(model, feeds)[0]
    # stored on the longest path: x, Wc1, Bc1, c1, 4 BN parameters, bn, (relu, pool: exact), Wc2, Bc2, c2,
    # (relu: exact), g, (flatten: exact), Wg, Bg, y -> 16
    assert rel_l2(emu, fp32) <= 16 * U16
    real = ReferenceEvaluator(out).run(None, feeds)[0]
    # 9 ops, 5 internal roundings in the reference BatchNormalization
    assert rel_l2(real, emu) <= (9 + 5) * U16


def test_bf16_mlp_through_emulation():
    proto = mlp()
    proto.opset_import[0].version = 21
    model, mp, out = convert(proto, "bfloat16")
    assert_interface(proto, out)
    assert mp.kept_fp32 == {} and len(casts(model)) == 2
    assert model.graph.initializers["W1"].const_value.dtype == ir.DataType.BFLOAT16
    assert node(model, "mm1").outputs[0].dtype == ir.DataType.BFLOAT16
    feeds = {"x": RNG.standard_normal((4, 16)).astype(np.float32)}
    assert rel_l2(emulated(model, feeds)[0], run_ort(proto, feeds)[0]) <= 11 * U_BF16  # as the fp16 MLP


def test_bf16_conv_needs_opset_22():
    model, mp, _ = convert(cnn(opset=19), "bfloat16")
    assert mp.kept_fp32["conv1"] == "Conv-11 accepts no bfloat16 for its float tensors"  # float16/float/double
    assert "MaxPool-12 accepts no bfloat16" in mp.kept_fp32["pool"]
    assert "neighbours are all FP32" in mp.kept_fp32["bn"]  # BatchNormalization-15 would, between FP32 convs
    assert mp.converted == ["flatten", "gemm"] and len(casts(model)) == 2  # Gemm-13 takes bfloat16
    proto = cnn(opset=22)
    model, mp, out = convert(proto, "bfloat16")
    assert mp.kept_fp32 == {} and len(casts(model)) == 2
    feeds = {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert rel_l2(emulated(model, feeds)[0], run_ort(proto, feeds)[0]) <= 16 * U_BF16


@pytest.mark.parametrize("build", [mlp, cnn, lambda: qdq_linear(19)], ids=["mlp", "cnn", "qdq"])
def test_second_run_changes_nothing(build):
    model, _, out = convert(build())
    again = MixedPrecisionPass()(model)
    assert not again.modified and ir.to_proto(again.model).SerializeToString() == out.SerializeToString()


def test_bad_options():
    with pytest.raises(ValueError, match="dtype"):
        MixedPrecisionPass("float8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="headroom"):
        MixedPrecisionPass(headroom=0.5)


def test_emulation_copies():
    model, _, out = convert(mlp())
    before = out.SerializeToString()
    emulate_low_precision(model)
    assert ir.to_proto(model).SerializeToString() == before


# -- casts --------------------------------------------------------------------------------------------

def test_chain_of_five_has_two_casts():
    ops = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs"]
    names = ["x", "a", "b", "c", "d", "y"]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]], name=op.lower()) for i, op in enumerate(ops)]
    proto = make(nodes, [vi("x", [3, 4])], [vi("y", [3, 4])])
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    assert mp.converted == [op.lower() for op in ops]
    assert [c.attributes.get_int("to") for c in casts(model)] == [F16, F]
    feeds = {"x": RNG.standard_normal((3, 4)).astype(np.float32)}
    assert rel_l2(emulated(model, feeds)[0], run_ort(proto, feeds)[0]) <= 6 * U16  # x and 5 outputs


def test_one_cast_per_value_and_output_read_inside():
    # h (fp16) is read by an FP32 ReduceSum twice and is also a graph output: one Cast serves all
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("ReduceSum", ["h"], ["s1"], name="rs1", keepdims=0),
        helper.make_node("ReduceSum", ["h"], ["s2"], name="rs2", keepdims=1),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    proto = make(nodes, [vi("x", [8, 16])], [vi("h", [8, 16]), vi("s1", []), vi("s2", [1, 1]), vi("y", [8, 16])],
                 [weight("W", (16, 16), 16)])
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    to_float = [c for c in casts(model) if c.attributes.get_int("to") == F]
    # one Cast for h (graph output h and both ReduceSums), one for y
    assert len(to_float) == 2 and node(model, "rs1").inputs[0] is node(model, "rs2").inputs[0]
    assert node(model, "rs1").inputs[0].name == "h"
    assert "long reduction" in mp.kept_fp32["rs1"]
    feeds = {"x": RNG.standard_normal((8, 16)).astype(np.float32)}
    (h, s1, s2, y), (h_ref, s1_ref, s2_ref, y_ref) = emulated(model, feeds), run_ort(proto, feeds)
    assert rel_l2(h, h_ref) <= 3 * U16 and rel_l2(y, y_ref) <= 3 * U16  # x, W, h (Relu: exact)
    # a sum of random-sign terms is ill-conditioned (|sum| << sum of |terms|): its error is bounded by
    # the terms' magnitudes, each off by <= 3u relatively (x, W, h)
    for s, s_ref in ((s1, s1_ref), (s2, s2_ref)):
        assert np.abs(s - s_ref).max() <= 3 * U16 * float(np.abs(h_ref).sum())


def test_graph_input_read_by_both_precisions():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="rs", keepdims=0)]
    proto = make(nodes, [vi("x", [2, 4])], [vi("y", [2, 4]), vi("s", [])], [weight("W", (4, 4), 4)])
    model, _, out = convert(proto)
    assert_interface(proto, out)
    assert node(model, "rs").inputs[0] is model.graph.inputs[0]  # FP32 reader: no Cast
    assert len(casts(model)) == 2


def test_cast_to_float_is_retargeted_and_round_trips_cancel():
    nodes = [
        helper.make_node("Cast", ["i"], ["xf"], name="to_float", to=F),  # int -> float feeding fp16: to=FLOAT16
        helper.make_node("MatMul", ["xf", "W"], ["h"], name="mm"),
        helper.make_node("Cast", ["h"], ["h16"], name="c16", to=F16),  # a round trip in the original model
        helper.make_node("Cast", ["h16"], ["h32"], name="c32", to=F),
        helper.make_node("Relu", ["h32"], ["y"], name="relu"),
    ]
    proto = make(nodes, [vi("i", [8, 16], TensorProto.INT64)], [vi("y", [8, 16])], [weight("W", (16, 16), 16)])
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    assert node(model, "to_float").attributes.get_int("to") == F16
    assert [n.op_type for n in model.graph] == ["Cast", "MatMul", "Relu", "Cast"]
    feeds = {"i": RNG.integers(-3, 4, (8, 16))}
    assert rel_l2(emulated(model, feeds)[0], run_ort(proto, feeds)[0]) <= 4 * U16


def test_remove_redundant_casts_keeps_lossy_round_trip():
    # float -> fp16 -> float rounds: it is not a no-op and stays; fp16 -> float -> fp16 is exact and goes
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=F16), helper.make_node("Cast", ["a"], ["b"], to=F),
        helper.make_node("Cast", ["b"], ["c"], to=F16), helper.make_node("Cast", ["c"], ["y"], to=F),
    ]
    model = ir.from_proto(make(nodes, [vi("x", [3])], [vi("y", [3])]))
    assert remove_redundant_casts(model)
    assert [c.attributes.get_int("to") for c in model.graph] == [F16, F]


def test_constants_and_constant_of_shape():
    nodes = [
        helper.make_node("Constant", [], ["k"], name="k", value=init("kv", np.full((16,), 0.5, np.float32))),
        helper.make_node("Mul", ["x", "k"], ["a"], name="mul"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], name="ones",
                         value=init("one", np.ones(1, np.float32))),
        helper.make_node("Add", ["a", "ones"], ["b"], name="add"),
        helper.make_node("MatMul", ["b", "W"], ["y"], name="mm"),
    ]
    proto = make(nodes, [vi("x", [8, 16])], [vi("y", [8, 16])], [weight("W", (16, 16), 16)])
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    assert {"k", "ones"} <= set(mp.converted)
    assert node(model, "ones").attributes["value"].value.dtype == ir.DataType.FLOAT16
    assert node(model, "shape").inputs[0] is model.graph.inputs[0]  # Shape reads either type: no Cast
    assert len(casts(model)) == 2
    feeds = {"x": RNG.standard_normal((8, 16)).astype(np.float32)}
    assert rel_l2(emulated(model, feeds)[0], run_ort(proto, feeds)[0]) <= 7 * U16


# -- FP32 by rule, by constant, by measurement -----------------------------------------------------------

def test_reduce_sum_stays_fp32_and_its_island_too():
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("ReduceSum", ["h", "axes"], ["s"], name="rs", keepdims=1),
        helper.make_node("Mul", ["s", "half"], ["m"], name="mul"),
        helper.make_node("ReduceMean", ["m", "axes"], ["y"], name="rm", keepdims=1),
    ]
    inits = [weight("W", (8, 8), 8), init("axes", np.array([1])), init("half", np.float32(0.5))]
    proto = make(nodes, [vi("x", [2, 8])], [vi("y", [2, 1])], inits)
    model, mp, out = convert(proto)
    assert "ReduceSum is a long reduction" in mp.kept_fp32["rs"]
    assert "long reduction" in mp.kept_fp32["rm"]
    assert "neighbours are all FP32" in mp.kept_fp32["mul"]  # between two FP32 reductions
    assert mp.converted == ["mm"] and len(casts(model)) == 2  # x -> fp16, h -> float
    assert model.graph.initializers["half"].const_value.dtype == ir.DataType.FLOAT
    feeds = {"x": RNG.standard_normal((2, 8)).astype(np.float32)}
    h = feeds["x"] @ numpy_helper.to_array(proto.graph.initializer[0])
    # y = sum(h) / 2 per row: a random-sign sum, so bounded by its terms: each off by <= 3u (x, W, h)
    error = np.abs(emulated(model, feeds)[0] - run_ort(proto, feeds)[0]).ravel()
    assert np.all(error <= 3 * U16 * 0.5 * np.abs(h).sum(axis=1))


def test_initializer_above_fp16_max_keeps_its_consumer_fp32():
    big = np.ones((4,), np.float32)
    big[2] = 1e5
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Mul", ["h", "big"], ["y"], name="scale")]
    proto = make(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], [weight("W", (4, 4), 4), init("big", big)])
    model, mp, out = convert(proto)
    assert "max |x| = 1e+05 > float16 max 65504" in mp.kept_fp32["scale"]
    assert model.graph.initializers["big"].const_value.dtype == ir.DataType.FLOAT
    assert node(model, "mm").outputs[0].dtype == ir.DataType.FLOAT16
    feeds = {"x": RNG.standard_normal((2, 4)).astype(np.float32)}
    assert np.all(np.isfinite(emulated(model, feeds)[0]))


def test_underflowing_initializer_keeps_its_consumer_fp32():
    tiny = (RNG.standard_normal((4, 4)) * 1e-6).astype(np.float32)  # fp16 subnormal: ~10% error each
    nodes = [helper.make_node("MatMul", ["x", "Wt"], ["h"], name="tiny"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    proto = make(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], [init("Wt", tiny), weight("W", (4, 4), 4)])
    _, mp, _ = convert(proto)
    assert "underflow" in mp.kept_fp32["tiny"] and "mm" in mp.converted


def test_measured_absmax_keeps_producer_and_consumers_fp32():
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["h"], ["s"], name="sigmoid"),
        helper.make_node("Add", ["r", "s"], ["a"], name="add"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2"),
    ]
    proto = make(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], [weight("W1", (4, 4), 4), weight("W2", (4, 4), 4)])
    _, plain, _ = convert(proto)
    assert plain.kept_fp32 == {}
    absmax = {"x": 3.0, "h": 1e6, "r": 1e6, "s": 1.0, "a": 1e6, "y": 10.0}
    model, mp, out = convert(proto, absmax=absmax)
    limit = FP16_MAX / DEFAULT_HEADROOM
    assert set(mp.kept_fp32) == {"mm1", "relu", "sigmoid", "add", "mm2"}
    assert all("measured" in mp.kept_fp32[n] for n in mp.kept_fp32)
    assert f"{limit:.4g}" in mp.kept_fp32["mm1"]
    # headroom 1e-6 -> the limit is 65504 itself: 1e6 still out of range; with absmax below it all convert
    _, mp_ok, _ = convert(proto, absmax={k: min(v, 1e4) for k, v in absmax.items()})
    assert mp_ok.kept_fp32 == {}
    _, mp_tight, _ = convert(proto, absmax={k: min(v, 1e4) for k, v in absmax.items()}, headroom=16.0)
    assert "mm1" in mp_tight.kept_fp32  # 1e4 > 65504 / 16
    _, mp_bf16, _ = convert(proto, "bfloat16", absmax=absmax)  # bf16: float32's range, no range check
    assert mp_bf16.kept_fp32 == {}


def test_keep_fp32_and_custom_domain():
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MyOp", ["r"], ["c"], name="custom", domain="com.example"),
        helper.make_node("Tanh", ["c"], ["y"], name="tanh"),
    ]
    graph = helper.make_graph(nodes, "g", [vi("x", [2, 4])], [vi("y", [2, 4])], [weight("W", (4, 4), 4)],
                              value_info=[vi("c", [2, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("com.example", 1)])
    _, mp, out = convert(proto, keep_fp32=frozenset({"relu"}), check=False)
    assert mp.kept_fp32["relu"].startswith("keep_fp32")
    assert "custom domain 'com.example'" in mp.kept_fp32["custom"]
    assert "neighbours are all FP32" in mp.kept_fp32["tanh"]
    assert mp.converted == ["mm"]
    onnx.checker.check_model(out)


def test_layernorm_and_resize_keep_their_float32_slots():
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln", "mean", "inv"], name="ln", axis=-1),
        helper.make_node("Resize", ["ln", "", "scales"], ["y"], name="resize", mode="nearest"),
    ]
    inits = [init("g", np.ones(4, np.float32)), init("b", np.zeros(4, np.float32)),
             init("scales", np.array([1, 1, 2, 2], np.float32))]
    proto = make(nodes, [vi("x", [1, 2, 3, 4])], [vi("y", [1, 2, 6, 8]), vi("mean", [1, 2, 3, 1])], inits)
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    assert mp.converted == ["ln", "resize"]
    assert model.graph.initializers["scales"].const_value.dtype == ir.DataType.FLOAT
    assert node(model, "ln").outputs[1].dtype == ir.DataType.FLOAT  # Mean: U (float/bfloat16 only)
    assert len(casts(model)) == 2
    feeds = {"x": RNG.standard_normal((1, 2, 3, 4)).astype(np.float32)}
    for got, want in zip(emulated(model, feeds), run_ort(proto, feeds)):
        assert rel_l2(got, want) <= 4 * U16  # x, g, b, ln (Resize nearest: exact)


# -- Q/DQ -----------------------------------------------------------------------------------------------

def qdq_linear(opset: int, scale: float = 2.0**-6) -> onnx.ModelProto:
    """x -> Q/DQ -> MatMul(., DQ(W)) -> Relu; scales powers of two (exact in fp16) unless ``scale`` says."""
    w = RNG.standard_normal((8, 8)).astype(np.float32) / np.sqrt(8)
    s_w = np.full(8, scale, np.float32)
    q = np.clip(np.round(w / s_w), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["Wq", "s_w", "z_w"], ["Wd"], name="dq_w", axis=1),
        helper.make_node("MatMul", ["xd", "Wd"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    inits = [init("s_x", np.float32(2.0**-4)), init("z_x", np.int8(0)), init("Wq", q), init("s_w", s_w),
             init("z_w", np.zeros(8, np.int8))]
    return make(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], inits, opset=opset)


def test_qdq_opset13_stays_fp32():
    proto = qdq_linear(13)
    model, mp, out = convert(proto)
    assert "opset >= 19" in mp.kept_fp32["dq_w"] and "opset >= 19" in mp.kept_fp32["q_x"]
    assert "DequantizeLinear" in mp.kept_fp32["mm"]  # a Cast after the DQ would split the fusion
    assert model.graph.initializers["s_w"].const_value.dtype == ir.DataType.FLOAT
    assert casts(model) == []


def test_qdq_opset19_scales_fp16_and_no_cast_before_compute():
    proto = qdq_linear(19)
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    assert mp.kept_fp32 == {}
    inits = model.graph.initializers
    assert inits["s_w"].const_value.dtype == ir.DataType.FLOAT16 == inits["s_x"].const_value.dtype
    assert inits["z_w"].const_value.dtype == ir.DataType.INT8 and inits["Wq"].const_value.dtype == ir.DataType.INT8
    mm = node(model, "mm")
    assert [v.producer().op_type for v in mm.inputs] == ["DequantizeLinear", "DequantizeLinear"]
    assert node(model, "q_x").inputs[0].producer().op_type == "Cast"  # the graph input's Cast
    assert len(casts(model)) == 2
    # x on the activation grid (multiples of s_x = 2^-4, exact in fp16) and power-of-two scales: the codes
    # and the dequantized values are exact in fp16, so only h is rounded (Relu of an fp16 value is exact)
    feeds = {"x": (RNG.integers(-30, 31, (2, 8)) * 2.0**-4).astype(np.float32)}
    fp32 = run_ort(proto, feeds)[0]
    emu = emulated(model, feeds)[0]
    assert rel_l2(emu, fp32) <= U16
    real = ReferenceEvaluator(out).run(None, feeds)[0]
    assert rel_l2(real, emu) <= 2 * U16  # 2 ops (Q/DQ exact here)


def test_dq_output_dtype_attribute_follows_opset23():
    proto = qdq_linear(23)
    dq = next(n for n in proto.graph.node if n.name == "dq_w")
    dq.attribute.append(helper.make_attribute("output_dtype", F))
    onnx.checker.check_model(proto, full_check=True)
    model, mp, out = convert(proto)
    assert mp.kept_fp32 == {} and node(model, "dq_w").attributes.get_int("output_dtype") == F16
    feeds = {"x": (RNG.integers(-30, 31, (2, 8)) * 2.0**-4).astype(np.float32)}
    assert rel_l2(emulated(model, feeds)[0], run_ort(proto, feeds)[0]) <= U16  # as at opset 19


def test_qdq_subnormal_scale_keeps_dq_and_compute_fp32():
    _, mp, _ = convert(qdq_linear(19, scale=1e-5))
    assert "subnormal" in mp.kept_fp32["dq_w"]
    assert "DequantizeLinear" in mp.kept_fp32["mm"]


# -- subgraphs and shared constants ------------------------------------------------------------------------

def test_shared_initializer_read_by_fp16_and_fp32_nodes():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("ReduceSum", ["W"], ["s"], name="rs", keepdims=0)]
    proto = make(nodes, [vi("x", [8, 16])], [vi("y", [8, 16]), vi("s", [])], [weight("W", (16, 16), 16)])
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    w = model.graph.initializers["W"]
    assert w.const_value.dtype == ir.DataType.FLOAT and node(model, "rs").inputs[0] is w
    copy = node(model, "mm").inputs[1]
    assert copy is not w and copy.const_value.dtype == ir.DataType.FLOAT16
    np.testing.assert_array_equal(copy.const_value.numpy(), w.const_value.numpy().astype(np.float16))
    feeds = {"x": RNG.standard_normal((8, 16)).astype(np.float32)}
    got, want = emulated(model, feeds), run_ort(proto, feeds)
    assert rel_l2(got[0], want[0]) <= 4 * U16 and got[1] == want[1]


def test_if_capturing_an_outer_value():
    then_branch = helper.make_graph([helper.make_node("Add", ["r", "one"], ["t"])], "then", [], [vi("t", [8, 16])],
                                    [init("one", np.float32(1.0))])
    else_branch = helper.make_graph([helper.make_node("Neg", ["r"], ["e"])], "else", [], [vi("e", [8, 16])])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("MatMul", ["z", "W2"], ["y"], name="mm2"),
    ]
    proto = make(nodes, [vi("x", [8, 16]), vi("cond", [], TensorProto.BOOL)], [vi("y", [8, 16])],
                 [weight("W", (16, 16), 16), weight("W2", (16, 16), 16)])
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    assert "subgraph" in mp.kept_fp32["if"] and {"mm", "relu", "mm2"} <= set(mp.converted)
    if_node = node(model, "if")
    captured = next(iter(if_node.attributes["then_branch"].value)).inputs[0]
    assert captured.producer().op_type == "Cast" and captured.dtype == ir.DataType.FLOAT
    assert captured.producer().inputs[0].dtype == ir.DataType.FLOAT16
    assert len(casts(model)) == 4  # x, r for the branches, z for mm2, y
    for cond in (True, False):
        feeds = {"x": RNG.standard_normal((8, 16)).astype(np.float32), "cond": np.array(cond)}
        # stored in fp16: x, W, h, z (Relu: exact; the branches compute in FP32), W2, y
        assert rel_l2(emulated(model, feeds)[0], run_ort(proto, feeds)[0]) <= 6 * U16


# -- random graphs ------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(graphs(max_ops=6))
def test_random_graphs(generated):
    """Any valid float32 graph: valid output, same interface, Casts only where the type changes, a second
    run changes nothing, and the emulated model runs and stays within the STORAGE bound in graphgen's
    terms: ``depth`` counts the rounding steps on the longest path (a length-K reduction K), and a path
    stores at most 2 depth + 1 tensors (each op's output and one constant operand, the input's Cast);
    with graphgen's factor 2 for the conditioning of random data (near-cancelling differences) and its
    floor of 16 steps that is 4 u max(depth, 16). Measured on 150 graphs: at most 0.9 u depth."""
    proto = generated.model
    model, mp, out = convert(proto)
    assert_interface(proto, out)
    assert not MixedPrecisionPass()(ir.from_proto(out)).modified
    dtypes = {v.name: v.dtype for v in model.graph.inputs}
    for n in model.graph:
        for v in n.outputs:
            dtypes[v.name] = v.dtype
    original = {n.name for n in proto.graph.node}
    for cast in casts(model):  # every Cast the pass inserted changes the type
        if cast.name in original:
            continue
        source = cast.inputs[0]
        src = source.dtype if source.dtype is not None else dtypes.get(source.name)
        assert src is None or src != ir.DataType(cast.attributes.get_int("to"))
    for feeds in generated.feeds:
        want = run_ort(proto, feeds)
        got = emulated(model, feeds)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert np.all(np.isfinite(g) | ~np.isfinite(w))
            if np.all(np.isfinite(w)):
                assert rel_l2(g, w) <= 4 * U16 * max(generated.depth, 16)
