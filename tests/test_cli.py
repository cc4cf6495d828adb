"""The CLI through click's runner and as a subprocess: JSON outputs, exit codes, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

import qcompile
from conftest import ReluToSigmoid, model_from_text
from qcompile.cli import main

TEXT = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[batch, 8] x) => (float[batch, 8] y) {
  c = Constant <value = float[8] {1, 2, 3, 4, 5, 6, 7, 8}> ()
  d = Add(c, c)
  a = Identity(x)
  r = Relu(a)
  s = Relu(a)
  t = Add(r, s)
  y = Add(t, d)
}"""


@pytest.fixture()
def small_model(tmp_path) -> Path:
    path = tmp_path / "small.onnx"
    qcompile.save(model_from_text(TEXT), path)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_for_every_command():
    for command in ([], ["inspect"], ["optimize"], ["bench"], ["compare"], ["zoo"], ["zoo", "list"], ["zoo", "export"],
                    ["demo"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_inspect_json(small_model):
    result = invoke("inspect", small_model, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["opsets"] == {"ai.onnx": 17}
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]
    assert data["outputs"][0]["name"] == "y"
    assert data["op_histogram"]["Relu"] == 2 and data["nodes"] == 7
    assert data["external_data"]["tensors"] == 0
    assert data["parameters"] == 0


def test_optimize_writes_verified_smaller_model(small_model, tmp_path):
    out = tmp_path / "opt.onnx"
    result = invoke("optimize", small_model, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verified"] and data["nodes_after"] < data["nodes_before"]
    assert all(p["verified"] in (True, None) for p in data["passes"])
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    import onnxruntime as ort

    ref = ort.InferenceSession(str(small_model)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_optimize_with_named_passes(small_model, tmp_path):
    out = tmp_path / "opt.onnx"
    result = invoke("optimize", small_model, "-o", out, "--passes", "identity,cse", "--json")
    data = json.loads(result.stdout)
    assert [p["name"] for p in data["passes"]][:2] == ["identity", "cse"]


def test_optimize_unknown_pass_is_usage_error(small_model, tmp_path):
    out = tmp_path / "opt.onnx"
    result = CliRunner().invoke(main, ["optimize", str(small_model), "-o", str(out), "--passes", "bogus"])
    assert result.exit_code == 2 and "unknown pass 'bogus'" in result.output
    assert not out.exists()


def test_bench_json_side_by_side(small_model, tmp_path):
    other = tmp_path / "other.onnx"
    invoke("optimize", small_model, "-o", other)
    result = invoke("bench", small_model, other, "--runs", "5", "--batch", "4", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["feed_shapes"] == {"x": [4, 8]}
    first, second = data["results"]
    assert first["speedup_vs_baseline"] == 1.0 and second["speedup_vs_baseline"] > 0
    for key in ("min_ms", "median_ms", "p90_ms", "mean_ms", "stdev_ms", "throughput", "runs"):
        assert key in first
    assert first["runs"] == 5 and first["items_per_run"] == 4


def test_compare_json_and_data_file(small_model, tmp_path):
    other = tmp_path / "other.onnx"
    invoke("optimize", small_model, "-o", other)
    data_file = tmp_path / "feeds.npz"
    np.savez(data_file, x=np.random.default_rng(0).standard_normal((3, 2, 8)).astype(np.float32))
    result = invoke("compare", small_model, other, "--data", data_file, "--json", "--max-rel-l2", "1e-6")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["samples"] == 3 and data["passed"]
    y = data["outputs"]["y"]
    assert y["rel_l2"] == 0.0 and y["cosine"] == pytest.approx(1.0) and y["sqnr_db"] == "inf"


def test_compare_gate_fails_with_exit_1(small_model, tmp_path):
    changed = model_from_text(TEXT.replace("y = Add(t, d)", "y = Sub(t, d)"))
    other = tmp_path / "changed.onnx"
    qcompile.save(changed, other)
    result = CliRunner().invoke(main, ["compare", str(small_model), str(other), "--max-rel-l2", "1e-3"])
    assert result.exit_code == 1 and "exceeds" in result.output


def test_compare_bad_data_names_the_input(small_model, tmp_path):
    data_file = tmp_path / "feeds.npz"
    np.savez(data_file, x=np.zeros((2, 8), dtype=np.int64))
    result = CliRunner().invoke(main, ["compare", str(small_model), str(small_model), "--data", str(data_file)])
    assert result.exit_code == 2 and "'x'" in result.output and "dtype" in result.output


def test_zoo_list_json():
    data = json.loads(invoke("zoo", "list", "--json").output)
    names = {e["name"]: e for e in data}
    assert {"minilm", "smollm2", "digits_cnn", "resnet18", "resnet50", "mobilenet_v2", "gpt_synth"} <= set(names)
    assert names["minilm"]["real_weights"] and not names["resnet18"]["real_weights"]


@pytest.mark.parametrize("option, message", [
    ("width", "bad --option"),               # no "="
    ("width=wide", "bad --option"),          # an integer option given a word
    ("colour=red", "has no option 'colour'"),
])
def test_zoo_export_bad_option_exits_2_and_writes_nothing(tmp_path, option, message):
    out = tmp_path / "gpt.onnx"
    result = invoke("zoo", "export", "gpt_synth", "-o", str(out), "--option", option)
    assert result.exit_code == 2 and message in result.output and not out.exists()


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good = ir.to_proto(model_from_text(TEXT)).SerializeToString()
    files = {
        "missing": tmp_path / "missing.onnx",
        "empty": tmp_path / "empty.onnx",
        "truncated": tmp_path / "truncated.onnx",
        "text": tmp_path / "text.onnx",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good[: len(good) - 7])
    files["text"].write_text("hello, I am a text file and not a model\n")
    import onnx

    bad = onnx.load_from_string(good)
    bad.graph.node[3].input[0] = "nowhere"
    files["checker"] = tmp_path / "checker.onnx"
    files["checker"].write_bytes(bad.SerializeToString())
    escaping = onnx.load_from_string(ir.to_proto(model_from_text(
        '<ir_version: 9, opset_import: ["" : 17]> g (float[4] x) => (float[4] y) '
        '<float[4] w = {1, 2, 3, 4}> { y = Add(x, w) }'
    )).SerializeToString())
    tensor = escaping.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    sub = tmp_path / "sub"
    sub.mkdir()
    files["escaping"] = sub / "escaping.onnx"
    files["escaping"].write_bytes(escaping.SerializeToString())
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "text", "checker", "escaping"])
def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, kind):
    path = _bad_inputs(tmp_path)[kind]
    before = path.read_bytes() if path.exists() else None
    out = tmp_path / "out.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "qcompile", "optimize", str(path), "-o", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(path) in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert (path.read_bytes() if path.exists() else None) == before


def test_output_equal_to_input_is_refused(small_model):
    before = small_model.read_bytes()
    result = CliRunner().invoke(main, ["optimize", str(small_model), "-o", str(small_model)])
    assert result.exit_code == 2 and "overwrite the input" in result.output
    assert small_model.read_bytes() == before


@pytest.mark.parametrize("command", ["optimize", "quantize", "zoo export"])
def test_missing_output_folder_is_refused_before_any_work(small_model, tmp_path, monkeypatch, command):
    """Exit 2 naming the folder, and before loading or exporting anything (not after minutes of GPTQ)."""
    from qcompile import modelio

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(modelio, "load", no_work)
    missing = tmp_path / "missing"
    args = {"optimize": ["optimize", str(small_model)], "quantize": ["quantize", str(small_model), "--calib", "random"],
            "zoo export": ["zoo", "export", "minilm"]}[command]
    result = CliRunner().invoke(main, [*args, "-o", str(missing / "m.onnx")])
    assert result.exit_code == 2, result.output
    assert "output folder does not exist" in result.output and str(missing) in result.output
    assert not missing.exists()


def test_pass_failing_verification_is_rolled_back_with_a_warning(small_model, tmp_path, monkeypatch):
    from qcompile import passes

    monkeypatch.setitem(passes.PASSES, "relu-to-sigmoid", ReluToSigmoid)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["optimize", str(small_model), "-o", str(out), "--passes",
                                       "relu-to-sigmoid,identity", "--json"])
    assert result.exit_code == 0, result.output
    assert "warning: pass 'relu-to-sigmoid' was rolled back" in result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["rolled_back"] == ["relu-to-sigmoid"]
    ops = [n.op_type for n in qcompile.load(out).graph]
    assert "Sigmoid" not in ops and "Relu" in ops and "Identity" not in ops


def test_strict_makes_a_failing_pass_exit_3_naming_it_and_writes_nothing(small_model, tmp_path, monkeypatch):
    from qcompile import passes

    monkeypatch.setitem(passes.PASSES, "relu-to-sigmoid", ReluToSigmoid)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["optimize", str(small_model), "-o", str(out), "--passes", "relu-to-sigmoid",
                                       "--strict"])
    assert result.exit_code == 3
    assert "'relu-to-sigmoid' changed the model's semantics" in result.output and "qcompile bug" in result.output
    assert not out.exists() and "Traceback" not in result.output


def test_an_unexpected_exception_is_exit_3_without_traceback_unless_debug(small_model, tmp_path, monkeypatch):
    import qcompile.pipeline

    def broken(*args, **kwargs):
        raise ValueError("negative dimensions are not allowed")

    monkeypatch.setattr(qcompile.pipeline, "optimize_with_stats", broken)
    monkeypatch.delenv("QCOMPILE_DEBUG", raising=False)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["optimize", str(small_model), "-o", str(out)])
    assert result.exit_code == 3 and not out.exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "internal error in qcompile: ValueError: negative dimensions" in lines[0]
    assert "qcompile bug" in lines[0] and "--debug" in lines[0]
    monkeypatch.setenv("QCOMPILE_DEBUG", "")  # restored (unset) after the test: --debug sets it in-process
    debug = CliRunner().invoke(main, ["--debug", "optimize", str(small_model), "-o", str(out)])
    assert debug.exit_code == 3 and "Traceback" in debug.output


def test_console_script_subprocess_inspect(small_model):
    exe = Path(sys.executable).with_name("qcompile")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "qcompile"]
    proc = subprocess.run([*command, "inspect", str(small_model), "--json"], capture_output=True, text=True,
                          timeout=120, cwd=small_model.parent)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["nodes"] == 7


MATMUL_TEXT = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[batch, 16] x) => (float[batch, 8] y) <float[16, 32] w1 = {W1}, float[32, 8] w2 = {W2}> {
  h = MatMul(x, w1)
  r = Relu(h)
  y = MatMul(r, w2)
}"""


@pytest.fixture()
def matmul_model(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    text = MATMUL_TEXT.replace("W1", ", ".join(f"{v:.4f}" for v in rng.standard_normal(16 * 32) * 0.2))
    text = text.replace("W2", ", ".join(f"{v:.4f}" for v in rng.standard_normal(32 * 8) * 0.2))
    path = tmp_path / "mm.onnx"
    qcompile.save(model_from_text(text), path)
    return path


def test_quantize_json_report(matmul_model, tmp_path):
    out = tmp_path / "mm.int8.onnx"
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((8, 4, 16)).astype(np.float32))
    result = invoke("quantize", matmul_model, "-o", out, "--calib", data, "--method", "minmax", "--runs", "3",
                    "--batch", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] and out.is_file()
    assert report["plan"]["quantized_nodes"] == 2 and report["calibration"]["samples"] == 8
    assert report["speedup"] > 0 and len(report["latency"]["results"]) == 2
    assert report["recipe"]["name"] == "int8" and report["recipe"]["method"] == "minmax"
    assert "kernel_int8_speed_ratios" in report


def test_quantize_speed_gate_exits_1_and_writes_nothing(matmul_model, tmp_path):
    out = tmp_path / "mm.int8.onnx"
    result = CliRunner().invoke(main, ["quantize", str(matmul_model), "-o", str(out), "--calib", "random",
                                       "--runs", "3", "--min-speedup", "1000"])
    assert result.exit_code == 1 and "below --min-speedup" in result.output, result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_quantize_empty_calibration_folder_is_usage_error(matmul_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["quantize", str(matmul_model), "-o", str(tmp_path / "o.onnx"),
                                       "--calib", str(empty)])
    assert result.exit_code == 2 and "no .npz files" in result.output


def test_quantize_recipes_and_recipe_files(matmul_model, tmp_path):
    saved = tmp_path / "w4.toml"
    out = tmp_path / "mm.w4.onnx"
    result = invoke("quantize", matmul_model, "-o", out, "--recipe", "w4-weight-only", "--algorithm", "rtn",
                    "--block-size", "16", "--include-embeddings", "--save-recipe", saved, "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantized_matmuls"] == 1  # the LM head (graph output) stays float by default
    assert report["quantized_embeddings"] == 0  # asked for, but this model has no Gather
    assert report["recipe"]["bits"] == 4 and report["recipe"]["block_size"] == 16
    text = saved.read_text()
    assert 'algorithm = "rtn"' in text and "block_size = 16" in text and "include_embeddings = true" in text
    again = tmp_path / "mm.again.onnx"
    result = invoke("quantize", matmul_model, "-o", again, "--recipe-file", saved, "--runs", "2", "--json")
    assert json.loads(result.stdout)["recipe"] == report["recipe"]
    assert again.read_bytes() == out.read_bytes()  # the file reproduces the run


def test_quantize_gptq_recipe_needs_calibration(matmul_model, tmp_path):
    result = CliRunner().invoke(main, ["quantize", str(matmul_model), "-o", str(tmp_path / "o.onnx"),
                                       "--recipe", "w4-weight-only"])
    assert result.exit_code == 2 and "needs calibration data" in result.output


def test_bad_recipe_file_is_usage_error(matmul_model, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('bits = 3\n')
    result = CliRunner().invoke(main, ["quantize", str(matmul_model), "-o", str(tmp_path / "o.onnx"),
                                       "--recipe-file", str(bad)])
    assert result.exit_code == 2 and "bits 3" in result.output
