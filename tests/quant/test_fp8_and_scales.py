"""FP8 E4M3 arithmetic against ONNX Runtime's own QuantizeLinear, and scales stored exactly in FP16/BF16."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qcompile.quant.qparams import activation_qparams, fake_quantize, quantize_weight, representable, to_fp8

RNG = np.random.default_rng(3)


def ort_fp8_qdq(x: np.ndarray, scale: float) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) in float8e4m3fn, as ONNX Runtime CPU computes it (opset 19)."""
    zero = numpy_helper.from_array(np.zeros((), dtype=ml_dtypes.float8_e4m3fn), "z")
    s = numpy_helper.from_array(np.array(scale, dtype=np.float32), "s")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "fp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], [s, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fp8_fake_quantize_matches_onnxruntime_bit_for_bit_and_saturates():
    x = (RNG.standard_normal(4096) * 3).astype(np.float32)
    x[:4] = [1e6, -1e6, 0.0, 1e-9]  # beyond ±448 s: saturated, never NaN
    qp = activation_qparams(-4.0, 4.0, "float8e4m3fn")
    assert np.isclose(qp.scale, 4.0 / 448) and qp.zero_point.dtype == ml_dtypes.float8_e4m3fn
    ours = fake_quantize(x, qp)
    np.testing.assert_array_equal(ours, ort_fp8_qdq(x, float(qp.scale)))
    assert ours[0] == np.float32(448 * qp.scale) and ours[1] == -ours[0]
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 on values in its normal range
    normal = np.abs(x[4:]) >= 2.0 ** -6 * float(qp.scale)
    inside = normal & (np.abs(x[4:]) <= 4.0)
    rel = np.abs(ours[4:][inside] - x[4:][inside]) / np.abs(x[4:][inside])
    assert rel.max() <= 2.0 ** -4


def test_fp8_weights_per_channel_use_the_whole_range():
    w = RNG.standard_normal((64, 16)).astype(np.float32) * np.linspace(0.01, 5, 16, dtype=np.float32)
    codes, qp = quantize_weight(w, 1, "float8e4m3fn")
    assert codes.dtype == ml_dtypes.float8_e4m3fn and qp.scale.shape == (16,)
    np.testing.assert_allclose(np.abs(codes.astype(np.float32)).max(axis=0), 448)
    assert np.array_equal(to_fp8(np.array([500.0, -500.0])).astype(np.float32), [448.0, -448.0])


def test_scales_rounded_up_to_values_fp16_and_bf16_hold_exactly():
    scale = np.array([5.03e-5, 1e-3, 0.3, 1e-9, 7.0], dtype=np.float32)
    for dtype, low in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        held = representable(scale, dtype)
        assert np.array_equal(held.astype(low).astype(np.float32), held) and np.all(held >= scale)
        assert np.all(held[:3] <= scale[:3] * (1 + 2.0 ** -6))  # one unit in the last place, at most
    w = RNG.standard_normal((32, 8)).astype(np.float32) * 1e-3
    codes, qp = quantize_weight(w, 1, "int8", "float16")
    assert np.array_equal(qp.scale.astype(np.float16).astype(np.float32), qp.scale)
    assert np.abs(codes).max() <= 127  # the scale only grew: no code clips
    np.testing.assert_allclose(codes * qp.scale, w, atol=float(qp.scale.max()) / 2 + 1e-9)
