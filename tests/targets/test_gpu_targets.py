"""GPU targets on a machine without a GPU: placement checked structurally against every explicit-Q/DQ
rule (targets/explicit_qdq.py) on real models, FP8 / INT4 / FP16 written as TensorRT takes them, the
results run on ONNX Runtime CPU (FP16 emulated) within stated bounds, and unavailable runtimes refused
in one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile import modelio, specs, targets
from qcompile.calibration import IterableReader, resolve_reader
from qcompile.cli import main
from qcompile.errors import InputSpecError
from qcompile.passes.quant.emulate import emulate_low_precision
from qcompile.passmanager import VerifyOptions
from qcompile.targets.explicit_qdq import COMPUTE_OPS, placement_violations

RNG = np.random.default_rng(7)
GPU_TARGETS = ("tensorrt", "ort-trt", "ort-cuda", "migraphx")


@pytest.fixture(scope="module")
def resnet18_path():
    from qcompile.models import cached_export, get_entry

    return cached_export(get_entry("resnet18"))


@pytest.fixture(scope="module")
def gpt_path():
    from qcompile.models import cached_export, get_entry

    return cached_export(get_entry("gpt_synth"))


def reader_for(path, n: int = 4, spec: str = "random"):
    return resolve_reader(spec, specs.input_specs(modelio.load(path)), n)


def quantize(path, target="tensorrt", recipe="int8", calib="random", samples=4, **changes):
    return qcompile.quantize(path, reader_for(path, samples, calib), recipe=recipe, target=target, samples=samples,
                             **changes)


def producer(value):
    node = value.producer() if value is not None else None
    return node.op_type if node is not None else None


def io_types(model) -> dict:
    return {v.name: v.dtype for v in (*model.graph.inputs, *model.graph.outputs)}


# --- declarations ------------------------------------------------------------------------------------------

def test_gpu_targets_declare_what_they_run():
    trt = targets.get("tensorrt")
    assert trt.device == "gpu" and trt.high_precision == "fp16" and not trt.contrib_ops and trt.strict_check
    assert {"int8", "fp8", "int4", "fp16"} <= trt.precisions and not trt.accepts("matmulnbits")
    assert targets.get("ort-trt").precisions == trt.precisions and targets.get("ort-trt").runtime == "ort-trt"
    assert "int8" not in targets.get("ort-cuda").precisions and targets.get("ort-cuda").accepts("matmulnbits")
    assert "int4" not in targets.get("migraphx").precisions
    for name in GPU_TARGETS:
        assert "fuse-gelu" not in targets.get(name).passes or targets.get(name).contrib_ops
    with pytest.raises(InputSpecError, match="does not run int8"):
        targets.get("ort-cuda").require_precision("int8")


def test_ort_cuda_refuses_static_qdq_naming_the_alternatives(resnet18_path):
    with pytest.raises(InputSpecError, match="choose --precision from: fp32, fp16, bf16, int4"):
        quantize(resnet18_path, target="ort-cuda")


# --- placement on real models ------------------------------------------------------------------------------

def test_resnet18_int8_follows_every_rule_and_fuses_residuals(resnet18_path):
    result = quantize(resnet18_path, high_precision="fp32", min_sqnr_db=None)
    model = result.model
    assert placement_violations(model) == []
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert convs and all(producer(n.inputs[0]) == producer(n.inputs[1]) == "DequantizeLinear" for n in convs)
    assert all(len(n.inputs) < 3 or n.inputs[2].const_value is not None for n in convs)  # float biases
    adds = [n for n in model.graph if n.op_type == "Add"]
    assert adds and all(sorted(map(producer, n.inputs)) == ["Conv", "DequantizeLinear"] for n in adds)
    weights = [n.inputs[0] for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value]
    assert weights and {w.dtype.name for w in weights} == {"INT8"}
    assert result.accuracy.worst().sqnr_db > 20  # what ORT CPU computes of TensorRT's INT8 graph


def test_resnet18_fp16_default_keeps_io_fp32_and_feeds_dq_straight_into_convs(resnet18_path):
    source = modelio.load(resnet18_path)
    result = quantize(resnet18_path)
    model = result.model
    assert placement_violations(model) == []
    assert io_types(model) == io_types(source)  # FP32 inputs and outputs, same names
    assert int(model.opset_imports[""]) >= 19  # FP16 Q/DQ scales
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert all(n.inputs[0].producer().inputs[1].dtype.name == "FLOAT16" for n in convs)  # no Cast in between
    assert sum(n.op_type == "Cast" for n in model.graph) <= 2 * (len(model.graph.inputs) + len(model.graph.outputs))
    assert result.details.high_precision.converted
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_minilm_int8_quantizes_linear_layers_only_and_keeps_norms_softmax_masks_high_precision(minilm_path):
    result = quantize(minilm_path, calib="zoo:minilm", samples=8)
    model = result.model
    assert placement_violations(model) == []
    quantized = [n for n in model.graph if n.op_type in COMPUTE_OPS and producer(n.inputs[0]) == "DequantizeLinear"]
    assert len(quantized) >= 12
    for node in model.graph:
        if node.op_type in ("LayerNormalization", "Softmax", "Where", "ReduceMean"):
            assert all(producer(v) != "DequantizeLinear" for v in node.inputs if v is not None), node.name
    # attention MatMuls stay float unless asked for
    attention = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is None
                 and producer(n.inputs[1]) != "DequantizeLinear"]
    assert attention
    # run as ORT CPU computes it (FP16 emulated): MiniLM's hidden states within a cosine of the FP32 model's
    assert result.accuracy.worst().cosine > 0.99


def test_minilm_attention_int8_on_request(minilm_path):
    result = quantize(minilm_path, calib="zoo:minilm", samples=4, quantize_attention=True, high_precision="fp32",
                      min_sqnr_db=None)
    model = result.model
    assert placement_violations(model) == []
    attention = [n for n in model.graph if n.op_type == "MatMul" and producer(n.inputs[1]) == "DequantizeLinear"
                 and n.inputs[1].producer().inputs[0].const_value is None]
    assert attention


def yolo_style() -> onnx.ModelProto:
    """A YOLOv8-shaped detector: Conv+SiLU stem, a residual bottleneck, SPPF (three MaxPools, Concat),
    an upsampling path (Resize, Concat), and a head that Reshapes and Transposes."""
    inits, nodes = [], []

    def conv(name, x, cin, cout, k=3, s=1, act=True):
        w = numpy_helper.from_array((RNG.standard_normal((cout, cin, k, k)) * (2 / (cin * k * k)) ** 0.5)
                                    .astype(np.float32), f"{name}.w")
        b = numpy_helper.from_array((RNG.standard_normal(cout) * 0.1).astype(np.float32), f"{name}.b")
        inits.extend([w, b])
        nodes.append(helper.make_node("Conv", [x, w.name, b.name], [f"{name}.c"], name=name, pads=[k // 2] * 4,
                                      strides=[s, s]))
        if not act:
            return f"{name}.c"
        nodes.append(helper.make_node("Sigmoid", [f"{name}.c"], [f"{name}.s"]))
        nodes.append(helper.make_node("Mul", [f"{name}.c", f"{name}.s"], [f"{name}.y"]))
        return f"{name}.y"

    a = conv("stem", "images", 3, 8, s=2)
    b = conv("down", a, 8, 16, s=2)
    r = conv("bneck2", conv("bneck1", b, 16, 16), 16, 16, act=False)
    nodes.append(helper.make_node("Add", [b, r], ["res"]))
    pools = ["res"]
    for i in range(3):
        nodes.append(helper.make_node("MaxPool", [pools[-1]], [f"pool{i}"], kernel_shape=[5, 5], pads=[2] * 4))
        pools.append(f"pool{i}")
    nodes.append(helper.make_node("Concat", pools, ["sppf"], axis=1))
    s = conv("sppf.cv", "sppf", 64, 16, k=1)
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"))
    nodes.append(helper.make_node("Resize", [s, "", "scales"], ["up"], mode="nearest"))
    nodes.append(helper.make_node("Concat", ["up", a], ["cat"], axis=1))
    h = conv("head", conv("neck", "cat", 24, 16), 16, 6, k=1, act=False)
    inits.append(numpy_helper.from_array(np.array([1, 6, -1], dtype=np.int64), "flat"))
    nodes.append(helper.make_node("Reshape", [h, "flat"], ["flat6"]))
    nodes.append(helper.make_node("Transpose", ["flat6"], ["output0"], perm=[0, 2, 1]))
    graph = helper.make_graph(nodes, "yolo_style", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                  [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 256, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_yolo_style_detector_no_pairs_around_pooling_concat_resize(tmp_path, precision):
    path = tmp_path / "yolo.onnx"
    onnx.save(yolo_style(), path)
    feeds = [{"images": RNG.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(4)]
    result = qcompile.quantize(path, IterableReader(feeds), recipe=precision, target="tensorrt", min_sqnr_db=None,
                               verify_options=VerifyOptions(each_pass=False, feeds=feeds[:2]))
    model = result.model
    assert placement_violations(model) == []
    for node in model.graph:
        if node.op_type in ("MaxPool", "Concat", "Resize", "Reshape", "Transpose", "Sigmoid"):
            assert all(producer(v) != "DequantizeLinear" for v in node.inputs if v is not None), node.name
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert all(producer(n.inputs[0]) == "DequantizeLinear" for n in convs)
    stored = {n.inputs[0].dtype.name for n in model.graph if n.op_type == "DequantizeLinear"
              and n.inputs[0].const_value is not None}
    assert stored == {"INT8" if precision == "int8" else "FLOAT8E4M3FN"}
    assert result.accuracy.worst().cosine > 0.98


def test_decoder_w8a8_smoothquant_fp8_and_int4_weight_only(gpt_path):
    for recipe in ("w8a8-smoothquant", "fp8", "w4-weight-only"):
        result = quantize(gpt_path, recipe=recipe, calib="zoo:gpt_synth", samples=4)
        model = result.model
        assert placement_violations(model) == [], recipe
        dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
        assert dqs, recipe
        if recipe == "fp8":
            assert int(model.opset_imports[""]) >= 19
            zeros = [n.inputs[2] for n in model.graph if n.op_type == "QuantizeLinear"]
            assert {z.dtype.name for z in zeros} == {"FLOAT8E4M3FN"}
            scales = [n.inputs[1].const_value.numpy() for n in dqs]
            assert all(s.dtype == np.float16 for s in scales)  # FP16 high precision: scales in FP16
        if recipe == "w4-weight-only":
            assert int(model.opset_imports[""]) >= 21
            assert {n.attributes.get_int("block_size", 0) for n in dqs} == {128}
            assert {n.inputs[0].dtype.name for n in dqs} == {"INT4"}
            assert all(not np.any(n.inputs[2].const_value.numpy()) for n in dqs)  # symmetric: zero points 0
        assert result.accuracy.worst().sqnr_db > 15, recipe


def test_tensorrt_refuses_asymmetric_int4_blocks(gpt_path):
    with pytest.raises(InputSpecError, match="symmetric weight blocks only"):
        quantize(gpt_path, recipe="w4-weight-only", calib="zoo:gpt_synth", symmetric=False)


@pytest.mark.slow
def test_smollm2_w8a8_smoothquant_placement():
    from qcompile.models import cached_export, get_entry

    path = cached_export(get_entry("smollm2"))
    result = quantize(path, recipe="w8a8-smoothquant", calib="zoo:smollm2", samples=2)
    assert placement_violations(result.model) == []
    assert result.plan.quantized_nodes


def test_the_placement_check_catches_ort_cpu_style_qdq(resnet18_path):
    problems = placement_violations(quantize(resnet18_path, target="ort-cpu", min_sqnr_db=None).model)
    assert any("zero point" in p for p in problems) and any("INT32" in p for p in problems)


def test_fp16_recipe_checked_against_fp32_and_the_reference_evaluator(tmp_path, digits_path):
    result = qcompile.quantize(digits_path, recipe="fp16", target="tensorrt")
    model = result.model
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)
    assert any(v.dtype.name == "FLOAT16" for v in model.graph.initializers.values())
    feed = {"image": RNG.random((3, 1, 8, 8), dtype=np.float32) * 16}
    from onnx.reference import ReferenceEvaluator

    fp32 = ReferenceEvaluator(ir.to_proto(modelio.load(digits_path))).run(None, feed)[0]
    fp16 = ReferenceEvaluator(ir.to_proto(model)).run(None, feed)[0]
    with qcompile.execute.loaded(emulate_low_precision(model)) as runtime:
        emulated = runtime.run(feed)["logits"]
    # ~10 roundings to FP16 on the longest path, u = 2^-11 each: 10 u = 4.9e-3 relative L2 at most
    bound = 10 * 2.0 ** -11
    for got in (fp16, emulated):
        assert np.linalg.norm(got - fp32) / np.linalg.norm(fp32) < bound
    assert result.details.high_precision.high_precision == "fp16"


# --- the CLI -----------------------------------------------------------------------------------------------

def test_compile_for_absent_runtimes_exits_2_naming_what_is_missing(tmp_path, resnet18_path):
    runner = CliRunner()
    for target, needle in (("tensorrt", "tensorrt"), ("ort-trt", "onnxruntime-gpu"), ("ort-cuda", "onnxruntime-gpu"),
                           ("migraphx", "ROCm")):
        out = tmp_path / f"{target}.out"
        result = runner.invoke(main, ["compile", str(resnet18_path), "--target", target, "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert needle in result.output and len(result.output.strip().splitlines()) == 1
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir()]  # nothing written, no temp folder left


def test_compile_ort_targets_from_one_calibration_pass(tmp_path, digits_path):
    out = tmp_path / "built"
    result = CliRunner().invoke(main, ["compile", str(digits_path), "--target", "ort-cpu,onnx-qdq", "--precision",
                                       "int8", "--calib", "zoo:digits_cnn", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [t["target"] for t in report["targets"]] == ["ort-cpu", "onnx-qdq"]
    for entry in report["targets"]:
        model = Path(entry["artifact"])
        session = json.loads(Path(entry["session_json"]).read_text())
        assert model.is_file() and session["providers"][0][0] == "CPUExecutionProvider"
        onnx.checker.check_model(str(model))


def test_statistics_are_computed_once_for_targets_sharing_a_graph(resnet18_path):
    from qcompile.calibrate import StatisticsCache

    cache = StatisticsCache()
    first = qcompile.quantize(resnet18_path, reader_for(resnet18_path), target="tensorrt", statistics=cache,
                              high_precision="fp32")
    second = qcompile.quantize(resnet18_path, reader_for(resnet18_path), target="ort-trt", statistics=cache,
                               high_precision="fp32")
    assert not any("reused" in n for n in first.notes) and any("reused" in n for n in second.notes)
    assert second.calibration.ranges == {k: first.calibration.ranges[k] for k in second.calibration.ranges}
    a = [t.numpy() for t in (v.const_value for v in first.model.graph.initializers.values())]
    b = [t.numpy() for t in (v.const_value for v in second.model.graph.initializers.values())]
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_quantize_for_a_gpu_target_writes_the_model_and_claims_no_timing(tmp_path, digits_path):
    out = tmp_path / "d.trt.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["quantize", str(digits_path), "--target", "tensorrt", "--calib", "zoo:digits_cnn",
                                  "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "not timed" in result.output and out.is_file()
    # the recipe's budget is scored on ORT CPU, which has no native FP16: the guard decides, and says so
    assert "accuracy budget not measured: the float part runs in fp16" in " ".join(result.output.split())
    gated = runner.invoke(main, ["quantize", str(digits_path), "--target", "tensorrt", "--calib", "zoo:digits_cnn",
                                 "--min-speedup", "1.2", "-o", str(tmp_path / "g.onnx")])
    assert gated.exit_code == 2 and "--min-speedup needs tensorrt's runtime" in gated.output
    assert not (tmp_path / "g.onnx").exists()


@pytest.mark.parametrize("which", ["minilm", "resnet18"])
def test_compile_every_target_artifact_or_exit_2(tmp_path, which, minilm_path, resnet18_path):
    source = str(minilm_path if which == "minilm" else resnet18_path)
    runner = CliRunner()
    for target in targets.names():
        out = tmp_path / target / "model.onnx"
        out.parent.mkdir()
        result = runner.invoke(main, ["compile", source, "--target", target, "-o", str(out)])
        if targets.get(target).device == "gpu":  # no GPU runtime on this machine
            assert result.exit_code == 2 and "error: " in result.output and not out.exists(), result.output
        else:
            assert result.exit_code == 0, result.output
            assert out.is_file() and json.loads(Path(f"{out}.session.json").read_text())["runtime"] == "ort-cpu"


def tiny(op: str) -> onnx.ModelProto:
    """x -> op(W) -> y for ConvTranspose (weight [Cin, Cout, k, k]) or Gemm with transB (weight [N, K])."""
    if op == "ConvTranspose":
        w = numpy_helper.from_array(RNG.standard_normal((4, 6, 3, 3)).astype(np.float32), "w")
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct")
        x, y = [1, 4, 5, 5], [1, 6, 7, 7]
    else:
        w = numpy_helper.from_array(RNG.standard_normal((6, 4)).astype(np.float32), "w")
        node = helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=1)
        x, y = [2, 4], [2, 6]
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op, axis", [("ConvTranspose", 1), ("Gemm", 0)])
def test_weights_per_output_channel_on_the_ops_own_axis(tmp_path, op, axis):
    path = tmp_path / f"{op}.onnx"
    onnx.save(tiny(op), path)
    shape = [1, 4, 5, 5] if op == "ConvTranspose" else [2, 4]
    feeds = [{"x": RNG.standard_normal(shape).astype(np.float32)} for _ in range(4)]
    result = qcompile.quantize(path, IterableReader(feeds), target="tensorrt", min_sqnr_db=None,
                               high_precision="fp32", verify_options=VerifyOptions(each_pass=False, feeds=feeds[:2]))
    weight_dq = [n for n in result.model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value]
    assert len(weight_dq) == 1 and weight_dq[0].attributes.get_int("axis", 1) == axis
    assert weight_dq[0].inputs[1].const_value.size == 6  # one scale per output channel
    assert placement_violations(result.model) == []


def test_compile_tensorrt_writes_an_engine_and_its_json_through_the_api(tmp_path, monkeypatch, digits_path):
    """With a TensorRT that checks every call (tests/runtimes/fakes: strongly typed, no precision flags),
    `compile` quantizes for TensorRT, builds the engine from the target-ready ONNX and writes the
    engine and its JSON only; the ONNX it was built from stays behind in the temporary folder."""
    import sys

    from qcompile.runtimes import gpu_timing

    fakes = Path(__file__).resolve().parents[1] / "runtimes" / "fakes"
    for name in [m for m in sys.modules if m.split(".")[0] in ("tensorrt", "cuda", "migraphx")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(fakes))
    monkeypatch.setenv("FAKE_TENSORRT_FLAVOUR", "11")
    monkeypatch.setattr(gpu_timing, "nvidia_driver_missing", lambda *a, **k: None)
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out" / "digits.trt"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["compile", str(digits_path), "--target", "tensorrt", "--precision", "int8",
                                       "--calib", "zoo:digits_cnn", "--profile", "batch=1:1:8", "-o", str(out),
                                       "--json"])
    try:
        assert result.exit_code == 0, result.output
        info = json.loads(Path(f"{out}.json").read_text())
        assert out.is_file() and info["cache_key"] and "STRONGLY_TYPED" in json.dumps(info)
        assert sorted(p.name for p in out.parent.iterdir()) == ["digits.trt", "digits.trt.json"]
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in ("tensorrt", "cuda", "migraphx")]:
            del sys.modules[name]
