"""The failure classes real users' models hit (issue 10), each rebuilt small: the command succeeds, or
fails with the exit code of whose fault it is, one line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompile.cli import main


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def report_of(result) -> dict:
    return json.loads(result.output[result.output.index("{\n"):])


def ort_outputs(path: Path, feed: dict) -> list:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def conv_weights(seed: int, out_c: int, in_c: int, k: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((out_c, in_c, k, k)) * 0.3).astype(np.float32)


def detector(opset: int = 17, constant_weights: bool = False) -> onnx.ModelProto:
    """[N, 3, H, W] -> Conv -> pool by 32 -> upsample by 32 -> + skip: runs only for H, W multiples of 32."""
    w = conv_weights(0, 8, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Resize", ["p", "roi", "scales"], ["u"], mode="nearest"),
        helper.make_node("Add", ["u", "r"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array([1, 1, 32, 32], np.float32), "scales"),
             numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    if constant_weights:  # paddle2onnx style: weights in Constant nodes
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph(nodes, "detector",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_symbolic_image_model_is_verified_on_a_size_it_takes(tmp_path):
    path = save(detector(), tmp_path / "det.onnx")
    result = run_cli("optimize", path, "-o", tmp_path / "out.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert report_of(result)["verification_feeds"] == "image 224x224"
    quantized = run_cli("quantize", path, "-o", tmp_path / "q.onnx", "--calib", "random", "--runs", "2")
    assert quantized.exit_code == 0, quantized.output


def test_model_at_opset_12_is_upgraded_before_per_channel_qdq(tmp_path, int8_kernels_win):
    # The recognizer's bug: per-channel DequantizeLinear (axis exists from opset 13) in an opset-12 graph.
    path = save(detector(opset=12, constant_weights=True), tmp_path / "rec.onnx")
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "-o", out, "--calib", "random", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    report = report_of(result)
    assert report["opset"] == {"before": 12, "after": 13, "action": "upgraded",
                               "reason": "per-channel Q/DQ needs opset 13"}
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert {o.domain: o.version for o in written.opset_import}[""] == 13
    dq = [n for n in written.graph.node
          if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert dq, "per-channel weights expected at opset 13"
    assert report["accuracy_vs_float"]["y"]["cosine"] > 0.99


def test_per_tensor_fallback_when_the_opset_cannot_be_raised(tmp_path, monkeypatch):
    import qcompile.static_int8 as quantize_module
    from qcompile.opsets import OpsetChange

    def refuse(model, minimum, feeds, why):
        return model, OpsetChange(12, 12, "failed", f"{why}: the converter has no adapter")

    monkeypatch.setattr(quantize_module, "ensure_opset", refuse)
    path = save(detector(opset=12), tmp_path / "rec.onnx")
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "-o", out, "--calib", "random", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    assert any("weights per tensor" in note for note in report_of(result)["notes"])
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert all(a.name != "axis" for n in written.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)


def test_original_model_that_runs_on_no_size_is_exit_2_and_says_how_to_size_it(tmp_path):
    c = numpy_helper.from_array(np.ones((1, 3, 1, 5), np.float32), "c")
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])], [c])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    result = run_cli("optimize", path, "-o", out)
    assert result.exit_code == 2 and not out.exists()
    line = result.output.strip().splitlines()[-1]
    assert "original model did not run" in line and "--dim" in line and "--data" in line
    given = tmp_path / "feeds.npz"
    np.savez(given, x=np.zeros((1, 3, 4, 5), np.float32))
    assert run_cli("optimize", path, "-o", out, "--data", given).exit_code == 0


def test_network_inside_an_if_gets_an_input_length_it_takes(tmp_path):
    # A voice model: the network lives in a branch; frames of 64 samples need a length multiple of 64.
    then_graph = helper.make_graph(
        [helper.make_node("Reshape", ["audio", "frames"], ["framed"]),
         helper.make_node("ReduceMean", ["framed"], ["y_then"], axes=[2], keepdims=0)],
        "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["a", "b"])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["audio"], ["y_else"])], "else", [],
                                   [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["a", "b"])])
    nodes = [helper.make_node("ReduceSum", ["audio"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "minus_inf"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    inits = [numpy_helper.from_array(np.array([1, -1, 64], np.int64), "frames"),
             numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf")]
    graph = helper.make_graph(nodes, "voice", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])], inits)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), tmp_path / "voice.onnx")
    result = run_cli("optimize", path, "-o", tmp_path / "out.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert report_of(result)["verification_feeds"] == "length 64"


def lstm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    hidden, features = 8, 4
    inits = [numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, features)) * 0.3).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32), "R")]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], hidden_size=hidden),
             helper.make_node("Squeeze", ["h", "axes"], ["y"])]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes"))
    graph = helper.make_graph(nodes, "lstm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_lstm_model_quantizes_with_nothing_to_measure(tmp_path):
    path = save(lstm_model(), tmp_path / "lstm.onnx")
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "-o", out, "--calib", "random", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    assert any("nothing to quantize" in note for note in report_of(result)["notes"])
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def zipmap_classifier() -> onnx.ModelProto:
    """skl2onnx's shape: a linear classifier's probabilities leave through ZipMap (a sequence of maps)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "coef"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "intercept")]
    nodes = [helper.make_node("Gemm", ["x", "coef", "intercept"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
             helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                              classlabels_int64s=[0, 1, 2])]
    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                               helper.make_value_info("output_probability", seq_map)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])


def test_zipmap_output_passes_through_optimize_and_quantize(tmp_path):
    path = save(zipmap_classifier(), tmp_path / "clf.onnx")
    feed = {"x": np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)}
    expected = ort_outputs(path, feed)
    for command in (["optimize", path, "-o", tmp_path / "opt.onnx"],
                    ["quantize", path, "-o", tmp_path / "q.onnx", "--calib", "random", "--runs", "2"]):
        result = run_cli(*command)
        assert result.exit_code == 0, result.output
        written = onnx.load(str(command[3]))
        onnx.checker.check_model(written, full_check=True)
        assert [o.name for o in written.graph.output] == ["label", "output_probability"]
        assert written.graph.output[1].type.WhichOneof("value") == "sequence_type"
        label, probabilities = ort_outputs(command[3], feed)
        assert len(probabilities) == 5 and sorted(probabilities[0]) == [0, 1, 2]
        if command[0] == "optimize":
            np.testing.assert_array_equal(label, expected[0])
            for got, want in zip(probabilities, expected[1]):
                assert got == pytest.approx(want, rel=1e-5)


def test_map_typed_input_is_refused_in_one_line(tmp_path):
    map_type = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    nodes = [helper.make_node("DictVectorizer", ["x"], ["y"], domain="ai.onnx.ml", int64_vocabulary=[0, 1])]
    graph = helper.make_graph(nodes, "dv", [helper.make_value_info("x", map_type)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    path = save(model, tmp_path / "dv.onnx")
    result = run_cli("optimize", path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2 and "map-typed" in result.output and "Traceback" not in result.output


def test_model_with_nothing_to_quantize_says_so_and_writes_the_float_model(tmp_path):
    # A tree ensemble (ai.onnx.ml): no MatMul/Gemm/Conv anywhere.
    tree = helper.make_node(
        "TreeEnsembleRegressor", ["x"], ["y"], domain="ai.onnx.ml", n_targets=1,
        nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[0, 0, 0],
        nodes_values=[0.5, 0.0, 0.0], nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"],
        nodes_truenodeids=[1, 0, 0], nodes_falsenodeids=[2, 0, 0],
        target_treeids=[0, 0], target_nodeids=[1, 2], target_ids=[0, 0], target_weights=[-1.0, 1.0])
    graph = helper.make_graph([tree], "trees", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 3)])
    path = save(model, tmp_path / "trees.onnx")
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "-o", out, "--calib", "random", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    report = report_of(result)
    assert any("nothing to quantize" in note for note in report["notes"])
    assert report["accuracy_vs_float"]["y"]["rel_l2"] == 0.0
    feed = {"x": np.array([[0.2, 0.0], [0.9, 1.0]], np.float32)}
    np.testing.assert_array_equal(ort_outputs(out, feed)[0], ort_outputs(path, feed)[0])


def test_quantized_output_that_fails_to_run_is_exit_3_naming_the_lowering(tmp_path, monkeypatch, int8_kernels_win):
    from qcompile.passes.quant import qdq

    original = qdq.QDQLoweringPass.call

    def corrupt(self, model):
        result = original(self, model)
        for node in model.graph:
            if node.op_type == "DequantizeLinear":
                node.op_type, node.domain = "NoSuchKernel", "com.example"
                model.opset_imports["com.example"] = 1
                break
        return result

    monkeypatch.setattr(qdq.QDQLoweringPass, "call", corrupt)
    path = save(detector(), tmp_path / "det.onnx")
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "-o", out, "--calib", "random", "--runs", "2")
    assert result.exit_code == 3 and not out.exists()
    assert "qdq-lowering" in result.output and "qcompile bug" in result.output


def custom_domain_model() -> onnx.ModelProto:
    """A user's own domain between standard ops: onnxruntime-extensions' Inverse, then a MatMul."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Inverse", ["x"], ["inv"], domain="ai.onnx.contrib"),
             helper.make_node("MatMul", ["inv", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("ai.onnx.contrib", 1)])


def test_custom_domain_nodes_are_black_boxes_run_through_the_users_library(tmp_path, monkeypatch):
    from onnxruntime_extensions import get_library_path

    from qcompile.runtimes.ort import CUSTOM_OP_LIBRARIES_ENV

    monkeypatch.setenv(CUSTOM_OP_LIBRARIES_ENV, "")  # restored (unset) after the test; the CLI sets it in-process
    path = save(custom_domain_model(), tmp_path / "custom.onnx")
    out = tmp_path / "out.onnx"
    without = run_cli("optimize", path, "-o", out)
    assert without.exit_code == 2 and "cannot load the original model" in without.output and not out.exists()
    library = get_library_path()
    for command in (["optimize", path, "-o", out], ["quantize", path, "-o", tmp_path / "q.onnx", "--calib", "random",
                                                    "--runs", "2"]):
        result = run_cli("--custom-op-library", library, *command)
        assert result.exit_code == 0, result.output
        written = onnx.load(str(command[3]))
        assert [(n.domain, n.op_type) for n in written.graph.node if n.domain == "ai.onnx.contrib"] == [
            ("ai.onnx.contrib", "Inverse")]


def test_an_inf_in_one_calibration_row_does_not_poison_gptq_or_the_sqnr_guard(tmp_path):
    # Additive attention masks put -inf into activations; row statistics must skip such rows whole.
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array((rng.standard_normal((64, 128)) * 0.1).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((128, 64)) * 0.1).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], [w1, w2])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mlp.onnx")
    calib = rng.standard_normal((8, 16, 64)).astype(np.float32)
    calib[2, 5, 7] = -np.inf
    np.savez(tmp_path / "calib.npz", x=calib)
    clean = {"x": rng.standard_normal((16, 64)).astype(np.float32)}
    expected = ort_outputs(path, clean)[0]
    for recipe in ("w4-weight-only", "int8"):
        out = tmp_path / f"{recipe}.onnx"
        result = run_cli("quantize", path, "-o", out, "--recipe", recipe, "--calib", tmp_path / "calib.npz",
                         "--runs", "2", "--json")
        assert result.exit_code == 0, result.output
        if recipe == "int8":  # the SQNR guard measured finite figures and kept both MatMuls in INT8
            report = report_of(result)
            assert report["plan"]["quantized_nodes"] == 2, report["plan"]
        got = ort_outputs(out, clean)[0]
        cosine = float((got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected))
        assert cosine > 0.99, (recipe, cosine)


def test_zipmap_after_an_ml_op_whose_output_inference_cannot_type(tmp_path):
    # skl2onnx's LogisticRegression: LinearClassifier -> Normalizer -> ZipMap, no value_info for the probabilities.
    nodes = [helper.make_node("LinearClassifier", ["x"], ["label", "scores"], domain="ai.onnx.ml",
                              coefficients=[0.5, -0.2, 0.1, 0.3, -0.4, 0.2], intercepts=[0.1, -0.1],
                              classlabels_ints=[0, 1], multi_class=0, post_transform="LOGISTIC"),
             helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml",
                              classlabels_int64s=[0, 1])]
    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(nodes, "logreg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                               helper.make_value_info("probabilities", seq_map)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    path = save(model, tmp_path / "logreg.onnx")
    for command in (["optimize", path, "-o", tmp_path / "opt.onnx"],
                    ["quantize", path, "-o", tmp_path / "q.onnx", "--calib", "random", "--runs", "2"]):
        result = run_cli(*command)
        assert result.exit_code == 0, result.output
        onnx.checker.check_model(onnx.load(str(command[3])), full_check=True)


def test_paddle_minus_one_dims_and_stacked_scalar_inputs(tmp_path):
    # paddle2onnx writes unknown dims as -1; silero-vad takes a scalar int64 sample rate.
    nodes = [helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "srf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3]),
                                           helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=np.ones((2, 5, 3), np.float32), sr=np.array([16000, 8000], np.int64))  # two samples stacked
    result = run_cli("optimize", path, "-o", tmp_path / "out.onnx", "--data", data)
    assert result.exit_code == 0, result.output


def _text_pipeline(path: Path) -> None:
    """skl2onnx's conversion of a ColumnTransformer (scaled numbers, one-hot categories given as text)
    and a logistic regression: a model with a string input."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(0)
    numbers, cats = rng.normal(size=(60, 2)), np.array([["red", "green", "blue"][i % 3] for i in range(60)])
    rows = np.concatenate([numbers.astype(object), cats[:, None]], axis=1)
    pipe = make_pipeline(ColumnTransformer([("num", StandardScaler(), [0, 1]), ("cat", OneHotEncoder(), [2])]),
                         LogisticRegression()).fit(rows, np.arange(60) % 3)
    onnx.save(convert_sklearn(pipe, initial_types=[("num", FloatTensorType([None, 2])),
                                                   ("cat", StringTensorType([None, 1]))],
                              options={id(pipe.steps[-1][1]): {"zipmap": False}}), path)


def test_a_model_with_a_text_input_takes_text_from_an_npz(tmp_path):
    """Text comes as numpy str arrays (an .npz never holds object arrays: those are never unpickled),
    turned into the object arrays ORT takes; without data the message says how to give it."""
    path = tmp_path / "pipe.onnx"
    _text_pipeline(path)
    cats = np.array([["red"], ["blue"], ["green"]])
    data = tmp_path / "data.npz"
    np.savez(data, num=np.random.default_rng(1).normal(size=(4, 3, 2)).astype(np.float32), cat=np.stack([cats] * 4))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(3):
        np.savez(calib / f"{i}.npz", num=np.random.default_rng(i).normal(size=(3, 2)).astype(np.float32),
                 cat=np.char.encode(cats, "utf-8"))  # bytes work too
    out = tmp_path / "out.onnx"
    assert run_cli("optimize", path, "-o", out, "--data", data).exit_code == 0
    quantized = run_cli("quantize", path, "-o", tmp_path / "q.onnx", "--calib", calib, "--data", data)
    assert quantized.exit_code == 0, quantized.output
    feed = {"num": np.zeros((3, 2), np.float32), "cat": cats.astype(object)}
    np.testing.assert_allclose(ort_outputs(out, feed)[1], ort_outputs(path, feed)[1], rtol=1e-6)
    no_data = run_cli("optimize", path, "-o", tmp_path / "nd.onnx")
    assert no_data.exit_code == 2 and "numpy str array" in no_data.output and not (tmp_path / "nd.onnx").exists()


def caffe2_style_classifier() -> onnx.ModelProto:
    """What Caffe2's exporter wrote (the onnx wheel's backend/test/data/light models): IR 3, opset 9,
    every weight also a graph input, a BatchNorm to fold, and one unused initializer-input."""
    rng = np.random.default_rng(3)
    w = conv_weights(1, 8, 3, 3)
    inits = {"w": w, "bn_s": rng.uniform(0.5, 1.5, 8), "bn_b": rng.standard_normal(8), "bn_m": rng.standard_normal(8),
             "bn_v": rng.uniform(0.5, 1.5, 8), "fc": rng.standard_normal((8, 4)), "unused_queue": np.zeros((1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["b"]),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    tensors = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in tensors]
    graph = helper.make_graph(nodes, "caffe2", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)


def test_weights_listed_as_graph_inputs_are_weights(tmp_path, int8_kernels_win):
    # light_zfnet512 from the onnx wheel: an unused initializer-input made the "original" fail to run
    # (exit 2, blaming the input); every light model: nothing folded, nothing quantized.
    path = save(caffe2_style_classifier(), tmp_path / "c2.onnx")
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    out = tmp_path / "opt.onnx"
    result = run_cli("optimize", path, "-o", out)
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out))
    assert [i.name for i in written.graph.input] == ["x"]
    assert "BatchNormalization" not in {n.op_type for n in written.graph.node}  # folded into the Conv
    np.testing.assert_allclose(ort_outputs(out, feed)[0], ort_outputs(path, feed)[0], rtol=1e-4, atol=1e-5)
    quantized = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "-o", quantized, "--calib", "random", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    assert report_of(result)["plan"]["quantized_nodes"] == 2  # the Conv and the MatMul


def quantize_matrix_model(tmp_path: Path, nodes: list, inits: list, k: int, n: int, *args: str) -> tuple[dict, Path]:
    """Build x [N, k] -> ``nodes`` -> y [N, n] (opset 17), quantize it with random calibration; the
    report and the written model's path."""
    graph = helper.make_graph(nodes, "matrix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], inits)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "-o", out, "--calib", "random", "--runs", "2", "--json", *args)
    assert result.exit_code == 0, result.output
    return report_of(result), out


def test_weights_a_constant_subgraph_computes_are_quantized(tmp_path, int8_kernels_win):
    # fp16-stored weights cast up, a transposed weight, a ConstantOfShape weight (the light models'):
    # constant folding keeps them (size limits, ConstantOfShape preserved); quantization folds them.
    rng = np.random.default_rng(5)
    w16 = (rng.standard_normal((32, 64)) * 0.2).astype(np.float16)
    wt = (rng.standard_normal((16, 64)) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["w16"], ["w1"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Transpose", ["wt"], ["w2"], perm=[1, 0]),
        helper.make_node("MatMul", ["r", "w2"], ["h2"]),
        helper.make_node("ConstantOfShape", ["shape3"], ["w3"],
                         value=numpy_helper.from_array(np.array([0.02], np.float32))),
        helper.make_node("MatMul", ["h2", "w3"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w16, "w16"), numpy_helper.from_array(wt, "wt"),
             numpy_helper.from_array(np.array([16, 8], np.int64), "shape3")]
    report, out = quantize_matrix_model(tmp_path, nodes, inits, 32, 8, "--min-sqnr", "-1")
    assert report["plan"]["quantized_nodes"] == 3
    written = onnx.load(str(out))
    assert {n.op_type for n in written.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert not {"Cast", "Transpose", "ConstantOfShape"} & {n.op_type for n in written.graph.node}


def test_a_weight_that_is_already_dequantized_is_not_quantized_again(tmp_path):
    codes = np.random.default_rng(6).integers(-127, 128, (16, 8)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["codes", "scale"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(np.array(0.01, np.float32), "scale")]
    report, _ = quantize_matrix_model(tmp_path, nodes, inits, 16, 8)
    assert list(report["plan"]["kept_float"].values()) == ["weight is not an FP32 constant"]


_LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
_LIGHT_SLOW = {"light_vgg19", "light_densenet121", "light_zfnet512", "light_bvlc_alexnet", "light_inception_v2"}


@pytest.mark.parametrize("name", [pytest.param(p.stem, marks=[pytest.mark.slow] if p.stem in _LIGHT_SLOW else [])
                                  for p in sorted(_LIGHT.glob("light_*.onnx"))])
def test_caffe2_exports_in_the_onnx_wheel_optimize_and_quantize(tmp_path, name, int8_kernels_win):
    # Models qcompile was not written against (Caffe2's exporter, IR 3, opset 9, weights as graph inputs
    # computed by ConstantOfShape): before, optimize changed nothing, quantize quantized nothing and two
    # of them were refused (exit 2) for an unused initializer-input.
    source = _LIGHT / f"{name}.onnx"
    original = onnx.load(str(source))
    real_inputs = [i.name for i in original.graph.input if i.name not in {t.name for t in original.graph.initializer}]
    out = tmp_path / "opt.onnx"
    result = run_cli("optimize", source, "-o", out)
    assert result.exit_code == 0, result.output
    assert [i.name for i in onnx.load(str(out)).graph.input] == real_inputs
    quantized = run_cli("quantize", source, "-o", tmp_path / "q.onnx", "--calib", "random", "--min-sqnr", "-1",
                        "--runs", "2", "--json")
    assert quantized.exit_code == 0, quantized.output
    plan = report_of(quantized)["plan"]
    # every weighted node INT8 (identical 0.02-filled Convs may merge first: cse), none kept float
    assert plan["kept_float"] == {} and plan["quantized_nodes"] > 0


def test_a_one_element_default_input_stays_a_knob_from_ir_4(tmp_path):
    # torch's keep_initializers_as_inputs at IR 7: the weight becomes a weight, the scalar default
    # (how a threshold is exported to be fed) stays an input that a feed can still override.
    w = numpy_helper.from_array(conv_weights(2, 4, 3, 3), "w")
    t = numpy_helper.from_array(np.array([0.5], np.float32), "threshold")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Greater", ["c", "threshold"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]),
              helper.make_tensor_value_info("threshold", TensorProto.FLOAT, [1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.BOOL, [1, 4, 6, 6])]
    graph = helper.make_graph(nodes, "knob", inputs, outputs, [w, t])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=7),
                tmp_path / "knob.onnx")
    out = tmp_path / "opt.onnx"
    result = run_cli("optimize", path, "-o", out)
    assert result.exit_code == 0, result.output
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["x", "threshold"]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for threshold in (None, np.array([-0.5], np.float32)):
        feed = {"x": x} if threshold is None else {"x": x, "threshold": threshold}
        np.testing.assert_array_equal(ort_outputs(out, feed)[0], ort_outputs(path, feed)[0])


def test_fold_weights_leaves_constants_upstream_of_an_activation_alone():
    # An activation-by-activation MatMul whose second input mixes in a ConstantOfShape mask: the mask
    # is not a weight's, so fold-weights leaves it to constant-folding (which keeps ConstantOfShape).
    import onnx_ir as ir

    from qcompile.passes.graph.folding import fold_weights

    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["mask"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["x", "mask"], ["k"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "kt"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "attention-like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
                              [numpy_helper.from_array(np.array([64, 64], np.int64), "shape")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert not fold_weights()(model).modified
    assert [n.op_type for n in model.graph] == ["ConstantOfShape", "Add", "Transpose", "MatMul"]


def test_a_model_quantized_before_is_said_to_be_so(tmp_path):
    # ddddocr's common_old.onnx (onnxruntime.quantization's dynamic INT8): no float weighted op is left.
    codes = np.random.default_rng(7).integers(-127, 128, (16, 8)).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"]),
             helper.make_node("Mul", ["accf", "s"], ["y"])]
    inits = [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(np.array(0.01, np.float32), "ws")]
    report, _ = quantize_matrix_model(tmp_path, nodes, inits, 16, 8)
    assert any("already quantized (DynamicQuantizeLinear, MatMulInteger)" in n for n in report["notes"])
