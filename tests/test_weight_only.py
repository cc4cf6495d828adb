"""Weight-only block quantization: MatMulNBits and blocked DequantizeLinear outputs run in ONNX
Runtime and match a numpy dequantised reference; packing; LM head option; GPTQ beats RTN on a
real layer's calibration activations."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompile.passes.quant.nbits import WeightOnlyConfig, WeightOnlyPass
from qcompile.quant.algorithms.gptq import gptq
from qcompile.quant.algorithms.rtn import block_codes, rtn
from qcompile.quant.dtypes import pack
from qcompile.weight_only import quantize_weights

K, N = 96, 48
RNG = np.random.default_rng(0)
W = (RNG.standard_normal((K, N)) * 0.1).astype(np.float32)
HEAD = (RNG.standard_normal((N, 24)) * 0.1).astype(np.float32)


def model(opset: int) -> ir.Model:
    w = ", ".join(f"{v:.6f}" for v in W.ravel())
    head = ", ".join(f"{v:.6f}" for v in HEAD.ravel())
    return ir.from_proto(onnx.parser.parse_model(f"""
    <ir_version: 10, opset_import: ["" : {opset}]>
    g (float[2, 5, {K}] x) => (float[2, 5, 24] logits)
      <float[{K}, {N}] w = {{{w}}}, float[{N}, 24] head = {{{head}}}> {{
      h = MatMul(x, w)
      r = Relu(h)
      logits = MatMul(r, head)
    }}"""))


def run(m: ir.Model, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    # ORT fuses DQ -> MatMul into MatMulNBits with int8 activations by default (accuracy level 4);
    # level 0 keeps float activations so the result can be compared with the numpy reference.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _lowering(cfg: WeightOnlyConfig) -> WeightOnlyPass:
    return WeightOnlyPass(cfg, block_codes(cfg.bits, cfg.block_size, cfg.symmetric))


@pytest.mark.parametrize("fmt, opset", [("matmulnbits", 17), ("dq", 21)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [32, 64])
def test_outputs_match_numpy_dequantised_reference(fmt, opset, bits, symmetric, block):
    m = model(opset)
    cfg = WeightOnlyConfig(bits=bits, block_size=block, symmetric=symmetric, format=fmt)
    lowering = _lowering(cfg)
    lowering(m)
    ir.passes.common.RemoveUnusedNodesPass()(m)
    assert len(lowering.quantized) == 1  # the LM head (feeds the graph output) is skipped by default
    ops = [n.op_type for n in m.graph]
    assert ("MatMulNBits" in ops) is (fmt == "matmulnbits") and ("DequantizeLinear" in ops) is (fmt == "dq")
    x = RNG.standard_normal((2, 5, K)).astype(np.float32)
    reference = np.maximum(x @ rtn(W, bits, block, symmetric).dequantize(), 0) @ HEAD
    np.testing.assert_allclose(run(m, x), reference, rtol=1e-4, atol=1e-4)
    error = np.abs(reference - np.maximum(x @ W, 0) @ HEAD).max()
    assert error < (0.5 if bits == 4 else 0.05)


def test_lm_head_included_when_asked():
    m = model(17)
    lowering = _lowering(WeightOnlyConfig(include_lm_head=True, block_size=32))
    lowering(m)
    assert len(lowering.quantized) == 2
    assert m.graph.outputs[0].name == "logits"
    # the replaced graph output keeps its declared type: the saved model passes the checker
    assert m.graph.outputs[0].dtype == ir.DataType.FLOAT and m.graph.outputs[0].shape == [2, 5, 24]
    onnx.checker.check_model(ir.to_proto(m))


@pytest.mark.parametrize("fmt, opset", [("matmulnbits", 17), ("dq", 21)])
def test_lm_head_in_its_own_blocks_and_bits(fmt, opset):
    """--lm-head-block 16 --lm-head-bits 8 under a W4 block-32 recipe: the body keeps 4 bits in blocks of
    32, the head takes 8 bits in blocks of 16; both match the numpy reference of those codes."""
    m = model(opset)
    cfg = WeightOnlyConfig(bits=4, block_size=32, format=fmt, include_lm_head=True, lm_head_bits=8,
                           lm_head_block_size=16)
    w, w_head = (m.graph.initializers[n].const_value.numpy() for n in ("w", "head"))  # as parsed: ties alike
    _lowering(cfg)(m)
    blocks = sorted(n.attributes.get_int("block_size") for n in m.graph if n.op_type in ("MatMulNBits",
                                                                                          "DequantizeLinear"))
    assert blocks == [16, 32]
    x = RNG.standard_normal((2, 5, K)).astype(np.float32)
    body, head = rtn(w, 4, 32, True).dequantize(), rtn(w_head, 8, 16, True).dequantize()
    np.testing.assert_allclose(run(m, x), np.maximum(x @ body, 0) @ head, rtol=1e-4, atol=1e-4)


VOCAB, DIM = 40, 80  # 80 is not a multiple of the 32/64 blocks: the last block per row is partial
TABLE = (RNG.standard_normal((VOCAB, DIM)) * 0.1).astype(np.float32)


def embedding_model(opset: int) -> ir.Model:
    table = ", ".join(f"{v:.6f}" for v in TABLE.ravel())
    return ir.from_proto(onnx.parser.parse_model(f"""
    <ir_version: 10, opset_import: ["" : {opset}]>
    g (int64[1, 7] ids) => (float[1, 7, {DIM}] y) <float[{VOCAB}, {DIM}] table = {{{table}}}> {{
      e = Gather <axis = 0> (table, ids)
      y = Relu(e)
    }}"""))


@pytest.mark.parametrize("fmt, opset", [("matmulnbits", 17), ("dq", 21)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64])
def test_embedding_rows_match_numpy_dequantised_reference(fmt, opset, bits, block):
    m = embedding_model(opset)
    lowering = _lowering(WeightOnlyConfig(bits=bits, block_size=block, format=fmt, include_embeddings=True))
    lowering(m)
    ir.passes.common.RemoveUnusedNodesPass()(m)
    assert len(lowering.embeddings) == 1
    ops = [n.op_type for n in m.graph]
    assert ("GatherBlockQuantized" in ops) is (fmt == "matmulnbits") and ("DequantizeLinear" in ops) is (fmt == "dq")
    assert "table" not in m.graph.initializers  # the float table is gone
    ids = RNG.integers(0, VOCAB, (1, 7)).astype(np.int64)
    deq = rtn(TABLE.T, bits, block, symmetric=True).dequantize().T  # blocks along each row
    session = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    # ORT: q*s - zp*s
    np.testing.assert_allclose(session.run(None, {"ids": ids})[0], np.maximum(deq[ids], 0), rtol=1e-5, atol=1e-6)
    assert np.abs(deq - TABLE).max() < (0.05 if bits == 4 else 0.003)


def tied_model() -> ir.Model:
    """Embedding table E [V, D] and LM head W = E^T (tied), both outputs exposed."""
    table = ", ".join(f"{v:.6f}" for v in TABLE.ravel())
    head = ", ".join(f"{v:.6f}" for v in TABLE.T.ravel())
    return ir.from_proto(onnx.parser.parse_model(f"""
    <ir_version: 10, opset_import: ["" : 17]>
    g (int64[1, 7] ids) => (float[1, 7, {DIM}] e, float[1, 7, {VOCAB}] logits)
      <float[{VOCAB}, {DIM}] table = {{{table}}}, float[{DIM}, {VOCAB}] head = {{{head}}}> {{
      e = Gather <axis = 0> (table, ids)
      logits = MatMul(e, head)
    }}"""))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits, block", [(4, 16), (4, 32), (8, 64)])  # D = 80: whole blocks (16), or padded
@pytest.mark.parametrize("head_block", [False, True])  # the head's block from lm_head_block_size, not block_size
def test_tied_table_gathers_the_heads_codes(symmetric, bits, block, head_block):
    m = tied_model()
    cfg = WeightOnlyConfig(bits=bits, block_size=128 if head_block else block, symmetric=symmetric,
                           include_lm_head=True, include_embeddings=True,
                           lm_head_block_size=block if head_block else None)
    weight = m.graph.initializers["head"].const_value.numpy()  # as parsed (6 decimals): ties round alike
    lowering = _lowering(cfg)
    lowering(m)
    ir.passes.common.RemoveUnusedNodesPass()(m)
    ops = [n.op_type for n in m.graph]
    assert ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1
    assert "table" not in m.graph.initializers and "head" not in m.graph.initializers
    gather = next(n for n in m.graph if n.op_type == "GatherBlockQuantized")
    matmul = next(n for n in m.graph if n.op_type == "MatMulNBits")
    assert gather.inputs[2] is matmul.inputs[2]  # one set of codes: the head's scales (and zero points)
    assert matmul.attributes.get_int("block_size") == gather.attributes.get_int("block_size") == block
    assert (len(gather.inputs) > 3) is (not symmetric) and (symmetric or gather.inputs[3].producer().inputs[0]
                                                             is matmul.inputs[3])
    deq_head = rtn(weight, bits, block, symmetric).dequantize()  # [D, V]
    ids = RNG.integers(0, VOCAB, (1, 7)).astype(np.int64)
    so = ort.SessionOptions()
    session = ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=["CPUExecutionProvider"])
    e, logits = session.run(None, {"ids": ids})
    np.testing.assert_allclose(e, deq_head.T[ids], rtol=1e-5, atol=1e-6)  # the rows are the head's columns
    # the head is the one it would be untied: the same kernel on the same codes, bit for bit
    head = ", ".join(f"{v:.6f}" for v in TABLE.T.ravel())
    head_only = ir.from_proto(onnx.parser.parse_model(f"""
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[1, 7, {DIM}] e) => (float[1, 7, {VOCAB}] logits) <float[{DIM}, {VOCAB}] head = {{{head}}}> {{
      logits = MatMul(e, head)
    }}"""))
    _lowering(cfg)(head_only)
    alone = ort.InferenceSession(ir.to_proto(head_only).SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(logits, alone.run(None, {"e": e})[0])


def test_embeddings_left_alone_by_default():
    m = embedding_model(17)
    lowering = _lowering(WeightOnlyConfig())
    assert not lowering(m).modified and [n.op_type for n in m.graph] == ["Gather", "Relu"]


def test_pack_low_bits_first():
    codes = np.array([[1, 2, 15, 0]], dtype=np.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x0F]]
    assert pack(codes, 8).tolist() == codes.tolist()


def test_rtn_symmetric_uses_the_full_signed_range():
    bq = rtn(W, 4, 32, True)
    assert bq.codes.min() == 0  # each block's extreme maps to code 0 (= -8) ...
    blocks = W.T.reshape(N, K // 32, 32)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    deq = bq.dequantize().T.reshape(N, K // 32, 32)
    got = np.take_along_axis(deq, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, extreme, rtol=1e-6)  # ... and is reconstructed exactly


def test_quantize_weights_pipeline_rtn():
    result = quantize_weights(model(17), WeightOnlyConfig(bits=4, block_size=32), optimize=False)
    assert result.quantized and result.to_json()["quantized_matmuls"] == 1
    # no accuracy level given: the one measured faster on this CPU is chosen and emitted
    from qcompile.models.base import cache_root
    from qcompile.targets.ort_cpu.kernel_probe import fastest_accuracy_level

    level = fastest_accuracy_level(4, 32, cache_root() / "probe")
    node = next(n for n in result.model.graph if n.op_type == "MatMulNBits")
    assert result.config.accuracy_level == level == node.attributes.get_int("accuracy_level")


def test_gptq_beats_rtn_on_real_calibration_activations(minilm_path):
    """The FFN up-projection of MiniLM's first layer, with its real input activations."""
    import qcompile
    from qcompile.calibrate import tapped
    from qcompile.models import minilm

    m = qcompile.optimize(minilm_path)
    node = next(n for n in m.graph if n.op_type == "MatMul" and "layer.0/intermediate" in n.name)
    w = node.inputs[1].const_value.numpy()
    xs = []
    with tapped(m, [node.inputs[0].name]) as runtime:
        for feed in minilm.ENTRY.calibration(48):
            xs.append(runtime.run(feed, outputs=[node.inputs[0].name])[node.inputs[0].name].reshape(-1, w.shape[0]))
    x = np.concatenate(xs)
    calib, held_out = x[: len(x) // 2], x[len(x) // 2 :]
    h = calib.T @ calib
    y = held_out @ w
    for bits, block in ((4, 128), (4, 32)):
        e_rtn = np.linalg.norm(y - held_out @ rtn(w, bits, block, True).dequantize())
        e_plain = np.linalg.norm(
            y - held_out @ gptq(w, h, bits, block, True, act_order=False, search=False).dequantize())
        e_gptq = np.linalg.norm(y - held_out @ gptq(w, h, bits, block, True).dequantize())
        assert e_plain < 0.8 * e_rtn, (bits, block, e_plain / e_rtn)
        # act order (static groups) and the clipping search lower the held-out error further
        assert e_gptq < 0.96 * e_plain, (bits, block, e_gptq / e_plain)


def test_awq_beats_rtn_on_real_calibration_activations(minilm_path):
    """AWQ's alpha, chosen on half of MiniLM's real FFN inputs, lowers the other half's output error."""
    import qcompile
    from qcompile.calibrate import tapped
    from qcompile.models import minilm
    from qcompile.quant.algorithms.awq import ALPHA_GRID, awq_scales, group_error

    m = qcompile.optimize(minilm_path)
    node = next(n for n in m.graph if n.op_type == "MatMul" and "layer.0/intermediate" in n.name)
    w = node.inputs[1].const_value.numpy().astype(np.float32)
    xs = []
    with tapped(m, [node.inputs[0].name]) as runtime:
        for feed in minilm.ENTRY.calibration(48):
            xs.append(runtime.run(feed, outputs=[node.inputs[0].name])[node.inputs[0].name].reshape(-1, w.shape[0]))
    x = np.concatenate(xs).astype(np.float32)
    calib, held_out = x[: len(x) // 2], x[len(x) // 2 :]
    mean_abs = np.abs(calib).mean(axis=0)
    errors = {a: group_error(calib, [w], awq_scales(mean_abs, a), 4, 128, True) for a in ALPHA_GRID}
    alpha = min(errors, key=errors.get)
    assert alpha > 0
    e_rtn = group_error(held_out, [w], awq_scales(mean_abs, 0.0), 4, 128, True)
    e_awq = group_error(held_out, [w], awq_scales(mean_abs, alpha), 4, 128, True)
    assert e_awq < 0.9 * e_rtn, (alpha, e_awq / e_rtn)


def test_awq_scales_fold_into_layernorm_and_beat_rtn_end_to_end():
    """LayerNorm -> MatMul with planted outlier channels: AWQ folds 1/s into the LayerNorm (the
    scaled FP32 model is verified equivalent) and its W4 model is closer to FP32 than RTN's."""
    from qcompile.calibration import IterableReader

    k, n = 128, 64
    rng = np.random.default_rng(5)
    gamma = np.ones(k, dtype=np.float32)
    gamma[rng.choice(k, 6, replace=False)] = 25.0  # outlier input channels
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    fmt = lambda a: ", ".join(f"{v:.6f}" for v in np.ravel(a))  # noqa: E731
    text = f"""
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[1, 16, {k}] x) => (float[1, 16, {n}] y)
      <float[{k}] gamma = {{{fmt(gamma)}}}, float[{k}] beta = {{{fmt(np.zeros(k))}}},
       float[{k}, {n}] w = {{{fmt(w)}}}> {{
      h = LayerNormalization <axis = -1> (x, gamma, beta)
      z = MatMul(h, w)
      y = Relu(z)
    }}"""
    feeds = [{"x": rng.standard_normal((1, 16, k)).astype(np.float32)} for _ in range(12)]
    held_out = [{"x": rng.standard_normal((1, 16, k)).astype(np.float32)} for _ in range(4)]
    config = WeightOnlyConfig(bits=4, block_size=32, format="matmulnbits", accuracy_level=0)
    reference = ir.from_proto(onnx.parser.parse_model(text))
    results = {}
    for algorithm in ("rtn", "awq"):
        m = ir.from_proto(onnx.parser.parse_model(text))
        result = quantize_weights(m, config, algorithm=algorithm, reader=IterableReader(feeds), optimize=False)
        results[algorithm] = result.model
    report = result.to_json()["awq"]  # the AWQ run's: one group, a non-zero alpha
    assert report["groups"] == 1 and list(report["alphas"].values())[0] > 0
    ln = next(node for node in results["awq"].graph if node.op_type == "LayerNormalization")
    assert not np.allclose(ln.inputs[1].const_value.numpy(), gamma)  # 1/s folded into the LayerNorm scale

    def session(model):
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])

    ref = session(reference)
    errors = {}
    for algorithm, model in results.items():
        s = session(model)
        errors[algorithm] = sum(float(np.sum((ref.run(None, f)[0] - s.run(None, f)[0]) ** 2)) for f in held_out)
    assert errors["awq"] < 0.7 * errors["rtn"], errors
