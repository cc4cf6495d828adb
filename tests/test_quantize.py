"""INT8 quantization: weight axes per op, shared scales, calibration readers, bad feeds, real models."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from conftest import floats, model_from_text, op_types, run_ort
from qcompile.calibration import IterableReader, iter_feeds, resolve_reader
from qcompile.errors import InputSpecError
from qcompile.passes.quant.annotate import QuantPolicy, annotate, plan_quantization
from qcompile.quant.qparams import fake_quantize, quantize_weight
from qcompile.specs import input_specs
from qcompile.static_int8 import quantize_static as quantize

RNG = np.random.default_rng(0)


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2))


def feeds_for(model: ir.Model, n: int, scale: float = 1.0) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{s.name: (rng.standard_normal([d if isinstance(d, int) else 2 for d in s.shape]) * scale).astype(np.float32)
             for s in input_specs(model)} for _ in range(n)]


def weights(*shape) -> str:
    return floats(RNG.standard_normal(shape) * 0.2)


CASES = {
    "Conv": ("float[1, 3, 8, 8] x", "float[1, 4, 8, 8] y", "float[4, 3, 3, 3] w = {W}, float[4] b = {B}",
             "y = Conv <pads = [1, 1, 1, 1]> (x, w, b)", (4, 3, 3, 3), 4, 0),
    "ConvTranspose": ("float[1, 3, 4, 4] x", "float[1, 5, 8, 8] y", "float[3, 5, 2, 2] w = {W}, float[5] b = {B}",
                      "y = ConvTranspose <strides = [2, 2]> (x, w, b)", (3, 5, 2, 2), 5, 1),
    "GemmTransB": ("float[2, 6] x", "float[2, 5] y", "float[5, 6] w = {W}, float[5] b = {B}",
                   "y = Gemm <transB = 1> (x, w, b)", (5, 6), 5, 0),
    "Gemm": ("float[2, 6] x", "float[2, 5] y", "float[6, 5] w = {W}, float[5] b = {B}",
             "y = Gemm (x, w, b)", (6, 5), 5, 1),
    "MatMul": ("float[2, 3, 6] x", "float[2, 3, 5] y", "float[6, 5] w = {W}", "y = MatMul(x, w)", (6, 5), None, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_weight_axis_per_op_and_numerics(case):
    inp, out, inits, body, w_shape, bias_n, axis = CASES[case]
    inits = inits.replace("{W}", "{" + weights(*w_shape) + "}")
    inits = inits.replace("{B}", "{" + (weights(bias_n) if bias_n else "") + "}")
    model = model_from_text(f'<ir_version: 9, opset_import: ["" : 17]> g ({inp}) => ({out}) <{inits}> {{ {body} }}')
    reference = ir.from_proto(ir.to_proto(model))
    data = feeds_for(model, 16)
    result = quantize(model, IterableReader(data), method="minmax", keep_float=(), optimize=False, min_sqnr_db=None)
    plan = result.plan
    assert plan.weights["w"].axis == axis
    weight_dtype = ir.DataType.from_numpy(np.dtype(result.policy.weight_dtype))  # int8, or uint8 where s8 saturates
    dq = [n for n in result.model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
          and n.inputs[0].dtype == weight_dtype]
    assert len(dq) == 1 and dq[0].attributes.get_int("axis") == axis
    assert dq[0].inputs[1].const_value.numpy().shape == (w_shape[axis],)
    if bias_n:
        bias_dq = [n for n in result.model.graph
                   if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT32]
        assert len(bias_dq) == 1  # INT32 bias with scale s_x * s_w
        first_q = [n for n in result.model.graph if n.op_type == "QuantizeLinear"][0]
        s_x = result.model.graph.initializers[first_q.inputs[1].name]
        s_w = dq[0].inputs[1].const_value.numpy()
        np.testing.assert_allclose(bias_dq[0].inputs[1].const_value.numpy(), s_x.const_value.numpy() * s_w, rtol=1e-6)
    for feed in data[:4]:
        assert sqnr(run_ort(reference, feed)[0], run_ort(result.model, feed)[0]) > 30


def test_per_tensor_option():
    model = model_from_text(f'<ir_version: 9, opset_import: ["" : 17]> g (float[2, 6] x) => (float[2, 5] y) '
                            f'<float[6, 5] w = {{{weights(6, 5)}}}> {{ y = MatMul(x, w) }}')
    result = quantize(model, IterableReader(feeds_for(model, 4)), per_channel=False, keep_float=(), optimize=False)
    assert result.plan.weights["w"].axis is None


def test_quantize_weight_reference():
    w = RNG.standard_normal((4, 3)).astype(np.float32)
    q, qp = quantize_weight(w, axis=1)
    np.testing.assert_allclose(qp.scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    np.testing.assert_allclose(q * qp.scale, w, atol=qp.scale.max() / 2 + 1e-7)
    qu, qpu = quantize_weight(w, axis=1, dtype="uint8")  # the same codes, stored as u8 with zero point 128
    assert qu.dtype == np.uint8 and (qpu.zero_point == 128).all()
    np.testing.assert_array_equal(qu.astype(np.int16) - 128, q)
    np.testing.assert_array_equal(fake_quantize(w, qpu), fake_quantize(w, qp))


def test_u8s8_saturation_probe_and_u8_weight_storage():
    """Where ORT's u8 x s8 kernels saturate (measured), the policy stores weights as u8 (exact)."""
    from qcompile.runtimes import OrtRuntime
    from qcompile.static_int8 import target_policy
    from qcompile.targets.ort_cpu.kernel_probe import _saturation_case, u8s8_saturates

    saturates = u8s8_saturates()
    policy, _ = target_policy("ort-cpu")
    assert policy.weight_dtype == ("uint8" if saturates else "int8")
    model, feed, exact = _saturation_case(policy.weight_dtype)
    runtime = OrtRuntime()
    runtime.load(model)
    y = next(iter(runtime.run(feed).values()))
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-4)  # the policy's weight storage is exact here
    model = model_from_text(f'<ir_version: 9, opset_import: ["" : 17]> g (float[2, 6] x) => (float[2, 5] y) '
                            f'<float[6, 5] w = {{{weights(6, 5)}}}> {{ y = MatMul(x, w) }}')
    result = quantize(model, IterableReader(feeds_for(model, 4)), keep_float=(), optimize=False)
    codes = next(n for n in result.model.graph
                 if n.op_type == "DequantizeLinear" and n.inputs[0].dtype in (ir.DataType.INT8, ir.DataType.UINT8)
                 and n.inputs[0].const_value is not None)
    assert codes.inputs[0].const_value.numpy().dtype == np.dtype(policy.weight_dtype)



ZEN2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: AMD EPYC\n" \
       "flags\t\t: fpu sse2 fma avx2 sha_ni\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"


def test_cpu_signature_names_the_core_and_keys_the_probe_cache(tmp_path, monkeypatch):
    """Two CPUs with the same AVX2-only flags are different INT8 machines (ORT's INT8 MatMul is 1.0x
    FP32 on a Zen 2 and 1.7x on a later core): the signature, and so the probe cache, tells them apart."""
    from qcompile.targets.ort_cpu import kernel_probe

    zen2 = kernel_probe.cpu_signature(ZEN2)
    assert "|AuthenticAMD-23-49|fma,avx2|" in zen2  # the first processor's block; only INT8-relevant flags
    later = kernel_probe.cpu_signature(ZEN2.replace("cpu family\t: 23", "cpu family\t: 25", 1))
    assert later != zen2
    arm = kernel_probe.cpu_signature("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
                                     "CPU part\t: 0xd0c\n")
    assert "|0x41-0xd0c|" in arm
    measured = []
    signature_of = kernel_probe.cpu_signature
    for info in (ZEN2, ZEN2, ZEN2.replace("model\t\t: 49", "model\t\t: 1", 1)):
        monkeypatch.setattr(kernel_probe, "cpu_signature", lambda info=info: signature_of(info))
        ratios = kernel_probe._cached("probe-test", tmp_path, False, ["case"],
                                      lambda: measured.append(1) or {"MatMul": float(len(measured))})
    assert len(measured) == 2 and ratios == {"MatMul": 2.0}  # measured once per core, not once per flag set


CONCAT = f"""
<ir_version: 9, opset_import: ["" : 17]>
g (float[1, 2, 6, 6] x) => (float[1, 4, 6, 6] y)
  <float[3, 2, 3, 3] w1 = {{{weights(3, 2, 3, 3)}}}, float[2, 2, 3, 3] w2 = {{{weights(2, 2, 3, 3)}}},
   float[4, 5, 1, 1] w3 = {{{weights(4, 5, 1, 1)}}}> {{
  a = Conv <pads = [1, 1, 1, 1]> (x, w1)
  b = Conv <pads = [1, 1, 1, 1]> (x, w2)
  s = Mul(b, b)
  c = Concat <axis = 1> (a, s)
  p = MaxPool <kernel_shape = [1, 1]> (c)
  y = Conv (p, w3)
}}"""


def test_concat_inputs_and_passthrough_share_one_scale():
    model = model_from_text(CONCAT)
    reference = ir.from_proto(ir.to_proto(model))
    result = quantize(model, IterableReader(feeds_for(model, 8, 3.0)), method="minmax", keep_float=(), optimize=False,
                      min_sqnr_db=None)
    graph = result.model.graph
    q_of = {n.inputs[0].name: n for n in graph if n.op_type == "QuantizeLinear"}
    assert {"a", "c", "p"} <= set(q_of)
    scales = {name: (graph.initializers[q_of[name].inputs[1].name].const_value.numpy().item(),
                     graph.initializers[q_of[name].inputs[2].name].const_value.numpy().item())
              for name in ("a", "c", "p")}
    assert scales["a"] == scales["c"] == scales["p"]
    feed = feeds_for(reference, 1, 3.0)[0]
    assert 25 < sqnr(run_ort(reference, feed)[0], run_ort(result.model, feed)[0]) < 80


def test_policy_keeps_float_classes_and_exclusions():
    model = model_from_text(CONCAT)
    plan = plan_quantization(model, QuantPolicy("t", keep_float=frozenset({"Conv1x1"})), frozenset({"Mul"}))
    assert len(plan.quantized_nodes) == 2
    assert any("Conv1x1" in reason for reason in plan.kept_float.values())


MASKED = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[1, 4, 8] x, float[1, 4, 8] mask) => (float[1, 4, 5] y) <float[8, 8] w1 = {W1}, float[8, 5] w2 = {W2}> {
  h = MatMul(x, w1)
  m = Add(h, mask)
  s = Softmax <axis = -1> (m)
  y = MatMul(s, w2)
}"""


def test_non_finite_mask_values_are_skipped_and_reported():
    model = model_from_text(MASKED.replace("W1", weights(8, 8)).replace("W2", weights(8, 5)))
    data = feeds_for(model, 6)
    for feed in data:
        feed["mask"][..., -2:] = -np.inf  # masked positions
    result = quantize(model, IterableReader(data), method="percentile", keep_float=(), optimize=False, min_sqnr_db=None)
    assert result.calibration.ranges  # softmax input stays float; what is observed is finite
    assert all(np.isfinite(v).all() for v in result.calibration.ranges.values())
    assert "m" not in result.plan.activations and "s" in result.plan.activations
    out = run_ort(result.model, data[0])[0]
    assert np.isfinite(out).all()


def test_observed_tensor_with_inf_is_counted():
    model = model_from_text(MASKED.replace("W1", weights(8, 8)).replace("W2", weights(8, 5)).replace(
        "s = Softmax <axis = -1> (m)", "s = Relu(m)"))
    data = feeds_for(model, 4)
    for feed in data:
        feed["mask"][..., 0] = -np.inf
        feed["mask"][..., 1] = np.inf
    from qcompile.calibrate import collect_ranges

    result = collect_ranges(model, ["s"], IterableReader(data), method="minmax")
    assert result.nonfinite["s"] == 4 * 4  # +inf survives the Relu: 4 rows x 4 samples
    assert np.isfinite(result.ranges["s"]).all()


def test_bad_feed_names_the_input():
    model = model_from_text(MASKED.replace("W1", weights(8, 8)).replace("W2", weights(8, 5)))
    bad = [{"x": np.zeros((1, 4, 8), np.float64), "mask": np.zeros((1, 4, 8), np.float32)}]
    with pytest.raises(InputSpecError, match="'x'.*float64"):
        quantize(model, IterableReader(bad), keep_float=(), optimize=False)


def test_empty_reader_is_a_clear_error():
    model = model_from_text(MASKED.replace("W1", weights(8, 8)).replace("W2", weights(8, 5)))
    with pytest.raises(InputSpecError, match="no samples"):
        list(iter_feeds(IterableReader([]), input_specs(model)))


def test_reader_specs(tmp_path, monkeypatch):
    model = model_from_text(MASKED.replace("W1", weights(8, 8)).replace("W2", weights(8, 5)))
    specs = input_specs(model)
    stacked = tmp_path / "calib.npz"
    np.savez(stacked, x=np.zeros((3, 1, 4, 8), np.float32), mask=np.zeros((3, 1, 4, 8), np.float32))
    assert len(list(iter_feeds(resolve_reader(str(stacked), specs, 10), specs))) == 3
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(2):
        np.savez(folder / f"{i}.npz", x=np.zeros((1, 4, 8), np.float32), mask=np.zeros((1, 4, 8), np.float32))
    assert len(list(iter_feeds(resolve_reader(str(folder), specs, 10), specs))) == 2
    (tmp_path / "my_calib.py").write_text(
        "import numpy as np\n"
        "def feeds():\n"
        "    return [{'x': np.ones((1, 4, 8), np.float32), 'mask': np.zeros((1, 4, 8), np.float32)}]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert len(list(iter_feeds(resolve_reader("my_calib:feeds", specs, 10), specs))) == 1
    assert len(list(iter_feeds(resolve_reader("random", specs, 5), specs))) == 5
    with pytest.raises(InputSpecError):
        resolve_reader("no_such_thing", specs, 1)


def test_ort_calibration_data_reader_works_unchanged():
    from onnxruntime.quantization import CalibrationDataReader

    model = model_from_text(MASKED.replace("W1", weights(8, 8)).replace("W2", weights(8, 5)))

    class UserReader(CalibrationDataReader):
        def __init__(self):
            self.data = iter(feeds_for(model, 5))

        def get_next(self):
            return next(self.data, None)

    result = quantize(model, UserReader(), keep_float=(), optimize=False)
    assert result.calibration.samples == 5
    assert "QuantizeLinear" in op_types(result.model)


def test_quantized_minilm_keeps_retrieval(minilm_path, tmp_path):
    from qcompile.models import minilm

    result = quantize(minilm_path, minilm.ENTRY.calibration(64))
    out = tmp_path / "minilm.int8.onnx"
    qcompile.save(result.model, out)
    assert len(result.plan.quantized_nodes) >= 20
    scores = minilm.evaluate(out, reference=minilm_path)
    assert scores["r_at_1"] >= 0.390
    assert scores["embedding_cosine"] >= 0.99


def test_attention_matmuls_stay_float_unless_asked(minilm_path, tmp_path):
    from qcompile.models import minilm

    def attention_matmuls(model: ir.Model) -> dict[str, ir.Node]:
        """MatMuls whose inputs are both computed (Q·Kᵀ, scores·V), found in the FP32 model."""
        return {n.name: n for n in model.graph if n.op_type == "MatMul"
                and all(v is not None and v.const_value is None and v.producer() is not None for v in n.inputs)}

    names = set(attention_matmuls(qcompile.load(minilm_path)))
    assert len(names) == 12  # Q·Kᵀ and scores·V in each of the 6 layers

    default = quantize(minilm_path, minilm.ENTRY.calibration(16), samples=16)
    # by default the attention stays float: fused into ONNX Runtime's MultiHeadAttention (fuse-attention)
    ops = [n.op_type for n in default.model.graph]
    assert ops.count("MultiHeadAttention") == 6 and not names & {n.name for n in default.model.graph}

    asked = quantize(minilm_path, minilm.ENTRY.calibration(64), quantize_attention=True)
    nodes = {n.name: n for n in asked.model.graph}
    for name in names:
        assert name in asked.plan.quantized_nodes
        assert [v.producer().op_type for v in nodes[name].inputs] == ["DequantizeLinear", "DequantizeLinear"]
    out = tmp_path / "minilm.int8-attention.onnx"
    qcompile.save(asked.model, out)
    scores = minilm.evaluate(out, reference=minilm_path)  # runs in ONNX Runtime
    assert scores["embedding_cosine"] >= 0.99
    assert scores["r_at_1"] >= 0.390


@pytest.mark.parametrize("case", ["MatMul", "GemmTransB", "Gemm"])
def test_sensitivity_sqnr_matches_a_numpy_reference_and_subsamples_evenly(case):
    """The sampler's SQNR equals 10 log10(|xW|^2 / |xW - fq(x) fq(W)|^2) on the rows it kept; with a
    multiply-add budget for half the columns, on every other output column."""
    from qcompile.passes.irutil import weight_kn
    from qcompile.sensitivity import SensitivitySampler
    from qcompile.static_int8 import shared_qparams, target_policy

    inp, out, inits, body, w_shape, bias_n, _ = CASES[case]
    inits = inits.replace("{W}", "{" + weights(*w_shape) + "}")
    inits = inits.replace("{B}", "{" + (weights(bias_n) if bias_n else "") + "}")
    model = model_from_text(f'<ir_version: 9, opset_import: ["" : 17]> g ({inp}) => ({out}) <{inits}> {{ {body} }}')
    policy, _ = target_policy("ort-cpu", keep_float=(), weight_dtype="int8")
    plan = annotate(model, policy, frozenset())
    node = next(iter(model.graph))
    w = weight_kn(node)
    sampler = SensitivitySampler(model, [node], {"w": plan.weights["w"].axis}, feeds=2)
    x_name = node.inputs[0].name
    sampler.samples[x_name].rows_per_feed = 1  # as if memory allowed one row per feed
    xs = [RNG.standard_normal((4, w.shape[0])).astype(np.float32) for _ in range(3)]
    for x in xs:  # as the calibration loop feeds them
        for statistic in sampler.statistics()[x_name]:
            statistic.update(x)
    ranges = {x_name: (float(min(x.min() for x in xs)), float(max(x.max() for x in xs)))}
    qparams = shared_qparams(model, plan, ranges)
    got = sampler.sqnr(qparams)[node.name]
    rows = np.stack([xs[0][0], xs[1][0]])  # first row of each of the first two feeds (1 evenly spaced row of 4)
    axis = plan.weights["w"].axis if node.op_type == "MatMul" else 1
    _, wq = quantize_weight(w, axis)
    w_fq = fake_quantize(w, wq)
    y = rows @ w
    expected = sqnr(y, fake_quantize(rows, qparams[x_name]) @ w_fq)
    assert got == pytest.approx(expected, abs=1e-3)
    assert 20 < got < 60
    sampler.max_macs = 2 * w.size // 2  # 2 rows x half the columns
    cols = np.unique(np.linspace(0, w.shape[1] - 1, -(-w.shape[1] // 2)).round().astype(np.int64))
    half = sqnr(y[:, cols], (fake_quantize(rows, qparams[x_name]) @ w_fq)[:, cols])
    assert sampler.sqnr(qparams)[node.name] == pytest.approx(half, abs=1e-3)
