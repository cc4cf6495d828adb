"""Model I/O: every bad input is one clear error; saves are atomic; external data round-trips."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qcompile
from conftest import model_from_text, run_ort
from qcompile.errors import ExternalDataError, InvalidModelError, ModelLoadError, OutputPathError

TEXT = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[2, 64] x) => (float[2, 32] y) <float[64, 32] w = {WEIGHTS}> {
  y = MatMul(x, w)
}"""


def weighted_model() -> ir.Model:
    values = ", ".join(f"{v:.4f}" for v in np.random.default_rng(0).standard_normal(64 * 32))
    return model_from_text(TEXT.replace("WEIGHTS", values))


def write_external(tmp_path: Path, location: str) -> Path:
    """A model whose weight points at ``location`` as external data."""
    proto = ir.to_proto(weighted_model())
    tensor = proto.graph.initializer[0]
    data = onnx.numpy_helper.to_array(tensor).tobytes()
    (tmp_path / "w.bin").write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        qcompile.load(tmp_path / "nope.onnx")


def test_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        qcompile.load(tmp_path / "e.onnx")


def test_truncated_protobuf(tmp_path):
    blob = ir.to_proto(weighted_model()).SerializeToString()
    (tmp_path / "t.onnx").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelLoadError, match="truncated|not ONNX|no ONNX model"):
        qcompile.load(tmp_path / "t.onnx")


def test_text_file_named_onnx(tmp_path):
    (tmp_path / "notes.onnx").write_text("this is not a model, just some notes\n" * 5)
    with pytest.raises(ModelLoadError):
        qcompile.load(tmp_path / "notes.onnx")


def test_checker_failure(tmp_path):
    proto = ir.to_proto(weighted_model())
    proto.graph.node[0].input[0] = "does_not_exist"
    path = tmp_path / "bad.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InvalidModelError, match="checker"):
        qcompile.load(path)


@pytest.mark.parametrize("location", ["../w.bin", "/etc/passwd", "sub/../../w.bin"])
def test_external_data_escaping_folder(tmp_path, location):
    inner = tmp_path / "inner"
    inner.mkdir()
    path = write_external(inner, location)
    (tmp_path / "w.bin").write_bytes((inner / "w.bin").read_bytes())
    with pytest.raises(ExternalDataError, match="escapes|absolute"):
        qcompile.load(path)


def test_external_data_missing_and_truncated(tmp_path):
    path = write_external(tmp_path, "w.bin")
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[:100])
    with pytest.raises(ExternalDataError, match="shorter"):
        qcompile.load(path)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ExternalDataError, match="not found"):
        qcompile.load(path)


def test_external_data_round_trip_with_low_threshold(tmp_path):
    model = weighted_model()
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    expected = run_ort(model, {"x": x})[0]
    out = tmp_path / "ext.onnx"
    qcompile.save(model, out, external_data=True, size_threshold_bytes=16)
    assert (tmp_path / "ext.onnx.data").stat().st_size == 64 * 32 * 4
    assert out.stat().st_size < 2000  # weights are not in the protobuf
    loaded = qcompile.load(out)
    weight = loaded.graph.initializers["w"].const_value
    assert isinstance(weight, ir.ExternalTensor)  # memory-mapped, not copied in
    # Re-save elsewhere (reads from the mmapped data) and run it.
    again = tmp_path / "again.onnx"
    qcompile.save(loaded, again, external_data=True, size_threshold_bytes=16)
    import onnxruntime as ort

    got = ort.InferenceSession(str(again), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # And inline again.
    inline = tmp_path / "inline.onnx"
    qcompile.save(qcompile.load(again), inline, external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    np.testing.assert_allclose(run_ort(qcompile.load(inline), {"x": x})[0], expected, rtol=1e-6)


def test_save_refuses_to_overwrite_input(tmp_path):
    path = tmp_path / "m.onnx"
    qcompile.save(weighted_model(), path)
    before = path.read_bytes()
    model = qcompile.load(path)
    with pytest.raises(OutputPathError, match="overwrite the input"):
        qcompile.save(model, path)
    assert path.read_bytes() == before


def test_save_refuses_data_file_in_use(tmp_path):
    path = tmp_path / "m.onnx"
    qcompile.save(weighted_model(), path, external_data=True, size_threshold_bytes=16)
    os.rename(path, tmp_path / "renamed.onnx")
    model = qcompile.load(tmp_path / "renamed.onnx")
    with pytest.raises(OutputPathError, match="external data"):
        qcompile.save(model, path, external_data=True)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    qcompile.save(weighted_model(), path)
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError):
        qcompile.save(weighted_model(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp files left


def test_convert_opset_preserves_numerics():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[2, 8] x) => (float[2, 1] y) {
      y = ReduceMean <axes = [-1]> (x)
    }""")
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    expected = run_ort(model, {"x": x})[0]
    qcompile.convert_opset(model, 18)
    assert model.opset_imports[""] == 18
    node = next(n for n in model.graph if n.op_type == "ReduceMean")
    assert len(node.inputs) == 2  # axes moved to an input in opset 18
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], expected, rtol=1e-6)


# --- inline weights memory-mapped in place (qcompile/wire.py) ---------------------------------------

TWO_WEIGHTS = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[2, 64] x) => (float[2, 32] y) <float[64, 32] w = {W}, float[32] b = {B}, float[2] unused = {1.0, 2.0}> {
  h = MatMul(x, w)
  y = Add(h, b)
}"""


def two_weight_model() -> ir.Model:
    rng = np.random.default_rng(1)
    fmt = lambda a: ", ".join(f"{v:.5f}" for v in a)  # noqa: E731
    text = TWO_WEIGHTS.replace("{W}", "{" + fmt(rng.standard_normal(64 * 32)) + "}")
    return model_from_text(text.replace("{B}", "{" + fmt(rng.standard_normal(32)) + "}"))


def save_raw(model: ir.Model, path: Path) -> Path:
    """Save with every initializer in raw_data (as exporters write them; the text parser does not)."""
    proto = ir.to_proto(model)
    raw = [onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name) for t in proto.graph.initializer]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(raw)
    onnx.save(proto, path)
    return path


@pytest.fixture
def map_everything(monkeypatch):
    """Map inline weights of files of any size (the default only maps files over 64 MiB)."""
    from qcompile import modelio

    monkeypatch.setattr(modelio, "MAP_INLINE_MIN_FILE_BYTES", 1)


def test_inline_weights_are_mapped_in_place_and_read_back_exactly(tmp_path, map_everything):
    from qcompile.wire import map_inline_weights

    path = save_raw(two_weight_model(), tmp_path / "m.onnx")
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    proto, mapped, external = map_inline_weights(path)
    assert (mapped, external) == (1, 0)  # only w has >= 1 KB of raw_data; b and the 2 floats stay inline
    model = qcompile.load(path)
    w = model.graph.initializers["w"].const_value
    assert isinstance(w, ir.ExternalTensor) and Path(w.path).resolve() == path.resolve()
    for name, array in reference.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)
    assert not qcompile.modelio.has_external_data(model)  # its own bytes, not a separate data file
    out = qcompile.save(model, tmp_path / "copy.onnx")
    assert not (tmp_path / "copy.onnx.data").exists()
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(onnx.load(out), {"x": x})[0], run_ort(onnx.load(path), {"x": x})[0])


def test_mapped_symlinked_model_reads_its_target(tmp_path, map_everything):
    real_dir, link_dir = tmp_path / "store", tmp_path / "work"
    real_dir.mkdir(), link_dir.mkdir()
    save_raw(two_weight_model(), real_dir / "m.onnx")
    (link_dir / "m.onnx").symlink_to(real_dir / "m.onnx")
    model = qcompile.load(link_dir / "m.onnx")
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(),
                                  two_weight_model().graph.initializers["w"].const_value.numpy())


def test_mapping_keeps_bad_files_bad(tmp_path, map_everything):
    blob = ir.to_proto(weighted_model()).SerializeToString()
    (tmp_path / "t.onnx").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelLoadError, match="truncated|not ONNX|no ONNX model"):
        qcompile.load(tmp_path / "t.onnx")
    (tmp_path / "x.onnx").write_bytes(b"\xff" * 4096)
    with pytest.raises(ModelLoadError):
        qcompile.load(tmp_path / "x.onnx")


def test_runtime_shares_the_models_arrays_and_skips_dead_nodes(tmp_path, map_everything, monkeypatch):
    from qcompile import execute, modelio
    from qcompile.runtimes import SharedWeightsModel

    monkeypatch.setattr(modelio, "SHARE_MIN_BYTES", 1024)
    path = save_raw(two_weight_model(), tmp_path / "m.onnx")
    model = qcompile.load(path)
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    # a dead branch: its output feeds nothing the graph returns
    h = next(iter(model.graph)).outputs[0]
    model.graph.append(ir.node("Relu", [h]))
    with modelio.runnable(model, share_weights=True) as payload:
        assert isinstance(payload, SharedWeightsModel)
        assert np.shares_memory(payload.weights["w"], model.graph.initializers["w"].const_value.numpy())
        proto = onnx.load_from_string(payload.proto)
        assert [n.op_type for n in proto.graph.node] == ["MatMul", "Add"]
        assert "unused" not in {t.name for t in proto.graph.initializer}
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    with execute.loaded(model) as runtime:
        got = runtime.run({"x": x})["y"]
    np.testing.assert_allclose(got, run_ort(onnx.load(path), {"x": x})[0], rtol=1e-6)


def test_placeholder_weights_fail_loudly_if_a_runtime_reads_them(tmp_path, monkeypatch):
    """A runtime that reads a placeholder instead of the shared array must fail, never see zeros."""
    import onnxruntime as ort

    from qcompile import modelio

    monkeypatch.setattr(modelio, "SHARE_MIN_BYTES", 1024)
    model = two_weight_model()
    with modelio._inlined(model, share=True) as shared:
        proto = ir.serde.serialize_model(model)
    assert list(shared) == ["w"]
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / modelio._PLACEHOLDER).touch()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    with pytest.raises(Exception, match="(?i)external|length|size|offset"):
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
