"""Bad and hostile input, through the CLI: one clear line on stderr, exit 2 (the user's input is
wrong), no traceback, nothing written, the input untouched — and nothing allocated, unpickled or
read outside the model's folder on the way.

    tensors     raw_data or typed data shorter/longer than the dims imply, absurd dims (1e15
                elements), external data whose length disagrees, mapped inline weights likewise
    external    symbolic links and absolute locations: followed only while they stay inside the
                model's folder (absolute locations are always refused)
    nesting     subgraphs deeper than 16 levels, or deeper than protobuf parses (If 5000 deep)
    .npz        object arrays (never unpickled), headers claiming more than the file holds, files
                that are not zips of .npy arrays — for --data and --calib
    NaN / inf   NaN in a calibration input is refused (sample and input named); ±inf is skipped
                by the observers (ranges unpoisoned); a tensor with no finite value is refused
    readers     empty (folder, 0-sample .npz, empty callable), raising halfway (named, with the
                sample index), not a reader at all
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner, Result

import qcompile
from conftest import model_from_text
from qcompile.cli import main

ADD = ('<ir_version: 9, opset_import: ["" : 17]> g (float[4] x) => (float[4] y) '
       '<float[4] w = {1, 2, 3, 4}> { y = Add(x, w) }')

MATMUL = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[batch, 16] x) => (float[batch, 8] y) <float[16, 32] w1 = {W1}, float[32, 8] w2 = {W2}> {
  h = MatMul(x, w1)
  r = Relu(h)
  y = MatMul(r, w2)
}"""


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    """Tracebacks are asserted absent: a --debug run earlier in this process must not leak in."""
    monkeypatch.delenv("QCOMPILE_DEBUG", raising=False)


class Folders:
    """An input folder and an output folder; :meth:`unchanged` checks that a failed run wrote
    nothing in the output folder and changed nothing in the input folder."""

    def __init__(self, root: Path) -> None:
        self.inp, self.out = root / "in", root / "out"
        self.inp.mkdir()
        self.out.mkdir()
        self._before: dict[str, bytes] | None = None

    def snapshot(self) -> None:
        self._before = {str(p.relative_to(self.inp)): p.read_bytes() for p in self.inp.rglob("*") if p.is_file()}

    def unchanged(self) -> None:
        assert sorted(p.name for p in self.out.iterdir()) == []  # no output, no .tmp or .qcompile-* folder
        after = {str(p.relative_to(self.inp)): p.read_bytes() for p in self.inp.rglob("*") if p.is_file()}
        assert after == self._before


@pytest.fixture()
def folders(tmp_path) -> Folders:
    return Folders(tmp_path)


def refused(result_or_proc, *needles: str, code: int = 2) -> str:
    """Assert the run failed with ``code`` and one line on stderr holding every needle."""
    if isinstance(result_or_proc, subprocess.CompletedProcess):
        proc = result_or_proc
        rc, stderr, everything = proc.returncode, proc.stderr, proc.stdout + proc.stderr
    else:
        rc, stderr, everything = result_or_proc.exit_code, result_or_proc.stderr, result_or_proc.output
        assert result_or_proc.exception is None or isinstance(result_or_proc.exception, SystemExit)
    assert rc == code, stderr
    assert "Traceback" not in everything
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def optimize(folders: Folders, model: Path, *more):
    folders.snapshot()
    return cli("optimize", model, "-o", folders.out / "opt.onnx", *more)


def add_proto() -> onnx.ModelProto:
    """The Add model with its weight in raw_data (as exporters write it)."""
    proto = ir.to_proto(model_from_text(ADD))
    tensor = proto.graph.initializer[0]
    array = onnx.numpy_helper.to_array(tensor)
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    return proto


def save_proto(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


# --- tensors whose dims disagree with their data -------------------------------------------------

def _raw(proto, data: bytes, dims=None):
    tensor = proto.graph.initializer[0]
    tensor.raw_data = data
    if dims is not None:
        del tensor.dims[:]
        tensor.dims.extend(dims)
    return proto


@pytest.mark.parametrize("kind, needle", [
    ("short", "declares dims [4] (4 elements, 16 bytes) but holds 8 bytes"),
    ("long", "declares dims [4] (4 elements, 16 bytes) but holds 24 bytes"),
    ("absurd", "declares dims [100000, 100000, 100000] (1,000,000,000,000,000 elements"),
    ("negative", "negative dimension"),
    ("typed", "holds 2 values in float_data"),
    ("empty", "holds no data"),
])
def test_tensor_size_disagreeing_with_its_data_is_refused_before_reading(folders, kind, needle):
    proto = add_proto()
    raw = proto.graph.initializer[0].raw_data
    if kind == "short":
        _raw(proto, raw[:8])
    elif kind == "long":
        _raw(proto, raw + bytes(8))
    elif kind == "absurd":  # 4e15 bytes: reading it, or even allocating it, is not an option
        _raw(proto, raw, [10**5, 10**5, 10**5])
    elif kind == "negative":
        _raw(proto, raw, [-4])
    elif kind == "typed":
        proto.graph.initializer[0].CopyFrom(onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4],
                                                             float_data=[1.0, 2.0]))
    else:
        proto.graph.initializer[0].CopyFrom(onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[10**15]))
    model = save_proto(proto, folders.inp / f"{kind}.onnx")
    line = refused(optimize(folders, model), "tensor 'w'", needle, str(model))
    assert "re-export" in line
    folders.unchanged()


def test_mapped_inline_weights_are_checked_too(folders, monkeypatch):
    """Large files have their inline weights memory-mapped (qcompile/wire.py): the same check."""
    from qcompile import modelio

    monkeypatch.setattr(modelio, "MAP_INLINE_MIN_FILE_BYTES", 1)
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    w.raw_data = w.raw_data[:-1024]  # 7 KiB for 8 KiB of dims: still mapped (>= 1 KiB), but short
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])], [w])
    model = save_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
                       folders.inp / "mapped.onnx")
    refused(optimize(folders, model), "tensor 'w'", "8,192 bytes", "7,168 bytes long")
    folders.unchanged()


# --- external data: where it may live ------------------------------------------------------------

def external_model(folder: Path, location: str, *, data_at: Path | None = None, **fields: str) -> Path:
    """The Add model in ``folder`` with its weight as external data at ``location``; the bytes are
    written to ``data_at`` (default: the location inside the folder)."""
    proto = add_proto()
    tensor = proto.graph.initializer[0]
    data = tensor.raw_data
    target = data_at if data_at is not None else folder / location
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(len(data)), **fields}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return save_proto(proto, folder / "model.onnx")


def test_external_data_through_a_symlink_that_stays_inside_is_followed(folders):
    (folders.inp / "blobs").mkdir()
    external_model(folders.inp, "w.bin", data_at=folders.inp / "blobs" / "w.bin")
    (folders.inp / "w.bin").symlink_to(folders.inp / "blobs" / "w.bin")
    folders.snapshot()
    out = folders.out / "opt.onnx"
    result = cli("optimize", folders.inp / "model.onnx", "-o", out)
    assert result.exit_code == 0, result.output
    import onnxruntime as ort

    y = ort.InferenceSession(str(out)).run(None, {"x": np.zeros(4, np.float32)})[0]
    np.testing.assert_array_equal(y, [1, 2, 3, 4])


def test_a_symlinked_model_reads_data_next_to_the_link(folders):
    """As onnxruntime does: locations are relative to the path given, not the link's target."""
    store = folders.inp / "store"
    store.mkdir()
    external_model(store, "w.bin")
    (folders.inp / "model.onnx").symlink_to(store / "model.onnx")
    (folders.inp / "w.bin").symlink_to(store / "w.bin")
    result = cli("optimize", folders.inp / "model.onnx", "-o", folders.out / "opt.onnx")
    assert result.exit_code == 0, result.output
    (folders.inp / "w.bin").unlink()  # only the target's folder has it now
    refused(optimize(folders, folders.inp / "model.onnx"), "external data file 'w.bin' not found")


@pytest.mark.parametrize("case", ["file-link-out", "folder-link-out", "absolute-inside", "absolute-outside", "dotdot",
                                  "a-folder", "bad-offset", "negative-length", "wrong-length", "truncated"])
def test_external_data_that_escapes_or_lies_is_refused(folders, tmp_path, case):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    model_dir = folders.inp
    if case == "file-link-out":
        model = external_model(model_dir, "w.bin", data_at=outside / "w.bin")
        (model_dir / "w.bin").symlink_to(outside / "w.bin")
        needle = "escapes the model's folder"
    elif case == "folder-link-out":
        model = external_model(model_dir, "blobs/w.bin", data_at=outside / "w.bin")
        (model_dir / "blobs").symlink_to(outside)
        needle = "escapes the model's folder"
    elif case == "absolute-inside":  # even a path to the model's own folder: locations are relative
        model = external_model(model_dir, str(model_dir / "w.bin"), data_at=model_dir / "w.bin")
        needle = "is absolute or empty"
    elif case == "absolute-outside":
        model = external_model(model_dir, str(outside / "w.bin"), data_at=outside / "w.bin")
        needle = "is absolute or empty"
    elif case == "dotdot":
        model = external_model(model_dir, "../elsewhere/w.bin", data_at=outside / "w.bin")
        needle = "escapes the model's folder"
    elif case == "a-folder":
        model = external_model(model_dir, "w.bin", data_at=outside / "w.bin")
        (model_dir / "w.bin").mkdir()
        needle = "is not a regular file"
    elif case == "bad-offset":
        model = external_model(model_dir, "w.bin", offset="twelve")
        needle = "offset 'twelve' is not a non-negative integer"
    elif case == "negative-length":
        model = external_model(model_dir, "w.bin", length="-16")
        needle = "length '-16' is not a non-negative integer"
    elif case == "wrong-length":  # the dims need 16 bytes; the file has 16, the length claims 12
        model = external_model(model_dir, "w.bin", length="12")
        needle = "but its external data is 12 bytes long"
    else:  # the length is right, the file is short
        model = external_model(model_dir, "w.bin")
        (model_dir / "w.bin").write_bytes(bytes(8))
        needle = "shorter than the tensor needs"
    refused(optimize(folders, model), needle, str(model))
    folders.unchanged()


def test_absurd_dims_with_external_data_are_refused_by_the_file_size(folders):
    proto = onnx.load(external_model(folders.inp, "w.bin"), load_external_data=False)
    tensor = proto.graph.initializer[0]
    del tensor.dims[:]
    tensor.dims.extend([10**8, 10**7])
    del tensor.external_data[2]  # no length: the dims decide how much is read
    model = save_proto(proto, folders.inp / "model.onnx")
    refused(optimize(folders, model), "shorter than the tensor needs")
    folders.unchanged()


# --- nesting -------------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def nested_ifs(depth: int) -> bytes:
    """A model whose output comes from an If inside an If … ``depth`` deep, written straight in the
    protobuf wire format (building it through protobuf would itself hit the nesting limit)."""

    def value_info(name: str, elem_type: int) -> bytes:  # ValueInfoProto{name, type{tensor_type{elem_type, shape {}}}}
        return _field(1, name) + _field(2, _field(1, _int_field(1, elem_type) + _field(2, b"")))

    float_, bool_, graph_attr = 1, 9, 5
    identity = _field(1, "x") + _field(2, "o0") + _field(4, "Identity")
    leaf = _field(1, identity) + _field(2, "g0") + _field(12, value_info("o0", float_))
    graph = leaf
    for level in range(1, depth + 1):
        then_branch = _field(1, "then_branch") + _int_field(20, graph_attr) + _field(6, graph)
        else_branch = _field(1, "else_branch") + _int_field(20, graph_attr) + _field(6, leaf)
        node = (_field(1, "c") + _field(2, f"o{level}") + _field(4, "If") + _field(5, then_branch)
                + _field(5, else_branch))
        graph = _field(1, node) + _field(2, f"g{level}") + _field(12, value_info(f"o{level}", float_))
    graph += _field(11, value_info("c", bool_)) + _field(11, value_info("x", float_))
    return _int_field(1, 9) + _field(8, _field(1, "") + _int_field(2, 17)) + _field(7, graph)


def test_subgraphs_nested_5000_deep_are_refused_in_a_subprocess(folders):
    """No RecursionError, no crash of the protobuf parser: one line, exit 2."""
    model = folders.inp / "deep.onnx"
    model.write_bytes(nested_ifs(5000))
    folders.snapshot()
    proc = subprocess.run([sys.executable, "-m", "qcompile", "optimize", str(model), "-o", str(folders.out / "o.onnx")],
                          capture_output=True, text=True, timeout=300, cwd=folders.out.parent)
    refused(proc, "nests messages deeper than protobuf parses", "at most 16 levels", str(model))
    folders.unchanged()


def test_nesting_limit_is_16_subgraph_levels(folders):
    from qcompile.modelio import MAX_SUBGRAPH_DEPTH

    assert MAX_SUBGRAPH_DEPTH == 16
    ok = folders.inp / "ok.onnx"
    ok.write_bytes(nested_ifs(16))
    result = cli("inspect", ok, "--json")
    assert result.exit_code == 0, result.output
    deep = folders.inp / "deep.onnx"
    deep.write_bytes(nested_ifs(17))  # protobuf parses it; qcompile refuses it
    onnx.load_from_string(deep.read_bytes())
    refused(optimize(folders, deep), "subgraphs (If/Loop/Scan bodies) more than 16 levels deep")
    folders.unchanged()


# --- .npz files: --data and --calib --------------------------------------------------------------

@pytest.fixture()
def matmul(folders) -> Path:
    rng = np.random.default_rng(0)
    text = MATMUL.replace("W1", ", ".join(f"{v:.4f}" for v in rng.standard_normal(16 * 32) * 0.2))
    text = text.replace("W2", ", ".join(f"{v:.4f}" for v in rng.standard_normal(32 * 8) * 0.2))
    path = folders.inp / "mm.onnx"
    qcompile.save(model_from_text(text), path)
    return path


def calib(rng_seed: int = 1, n: int = 4) -> np.ndarray:
    return np.random.default_rng(rng_seed).standard_normal((n, 2, 16)).astype(np.float32)


def quantize(folders: Folders, model: Path, *more):
    folders.snapshot()
    return cli("quantize", model, "-o", folders.out / "q.onnx", "--runs", "1", *more)


class Boobytrap:
    """Unpickling this touches a file: proof that a loader unpickled what it was given."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def _hostile_npz(kind: str, folder: Path) -> tuple[Path, str]:
    path = folder / f"{kind}.npz"
    if kind == "object":
        array = np.empty(2, dtype=object)
        array[:] = [Boobytrap(folder / "unpickled"), Boobytrap(folder / "unpickled")]
        np.savez(path, x=array)  # numpy pickles object arrays
        return path, "holds Python objects (dtype object); qcompile never unpickles data"
    if kind == "huge-header":  # a header claiming 4e15 bytes in front of 64
        import io
        import zipfile

        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**7, 10**8)})
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", header.getvalue() + bytes(64))
        return path, "declares shape [10000000, 100000000] (4,000,000,000,000,000 bytes) but holds 64 bytes"
    if kind == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"x": Boobytrap(folder / "unpickled")}))
        return path, "not an .npz file"
    if kind == "npy":
        np.save(folder / "x.npy", calib())
        os.replace(folder / "x.npy", path)
        return path, "not an .npz file"
    if kind == "not-an-array":
        import zipfile

        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
        return path, "member 'notes.txt' is not a .npy array"
    raise AssertionError(kind)


NPZ_KINDS = ["object", "huge-header", "pickle", "npy", "not-an-array"]


@pytest.mark.parametrize("kind", NPZ_KINDS)
def test_hostile_npz_as_calibration_data(folders, matmul, kind):
    path, needle = _hostile_npz(kind, folders.inp)
    refused(quantize(folders, matmul, "--calib", path), needle, str(path))
    assert not (folders.inp / "unpickled").exists()
    folders.unchanged()


@pytest.mark.parametrize("kind", NPZ_KINDS)
def test_hostile_npz_as_data(folders, matmul, kind):
    path, needle = _hostile_npz(kind, folders.inp)
    refused(optimize(folders, matmul, "--data", path), needle, str(path))
    folders.snapshot()
    refused(cli("compare", matmul, matmul, "--data", path), needle)
    assert not (folders.inp / "unpickled").exists()
    folders.unchanged()


# --- NaN and inf in calibration data -------------------------------------------------------------

def test_a_feed_of_nan_is_refused_naming_sample_and_input(folders, matmul):
    data = calib()
    data[1] = np.nan  # a whole feed of NaN: no range could come from it, every statistic would turn NaN
    path = folders.inp / "nan.npz"
    np.savez(path, x=data)
    refused(quantize(folders, matmul, "--calib", path), "input 'x'", "calibration sample 1",
            "holds NaN (32 of 32 values)")
    folders.unchanged()


def test_a_tensor_that_never_sees_a_finite_value_is_refused(folders, matmul):
    path = folders.inp / "inf.npz"
    np.savez(path, x=np.full((4, 2, 16), np.inf, np.float32))
    refused(quantize(folders, matmul, "--calib", path), "'x'", "saw no finite value in 4 calibration samples")
    folders.unchanged()


def test_inf_values_are_skipped_and_do_not_poison_the_ranges(folders, matmul):
    """A sample that repeats sample 0 with some values +inf: the ranges are those of the clean
    samples (the non-finite values, and what they turn into downstream, are skipped and counted)."""
    import json

    clean = calib()
    dirty = np.concatenate([clean, clean[:1]])
    dirty[-1, 0, :3] = np.inf
    scales = {}
    for name, data in (("clean", clean), ("dirty", dirty)):
        path = folders.inp / f"{name}.npz"
        np.savez(path, x=data)
        out = folders.out / f"{name}.onnx"
        result = cli("quantize", matmul, "-o", out, "--calib", path, "--method", "minmax", "--min-sqnr", "-1",
                     "--runs", "1", "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        scales[name] = {t.name: onnx.numpy_helper.to_array(t).item() for t in onnx.load(out).graph.initializer
                        if t.name.endswith("_act_scale")}
        if name == "dirty":
            assert report["calibration"]["nonfinite_values"]["x"] == 3
    assert scales["clean"] and scales["dirty"] == scales["clean"]
    assert all(np.isfinite(v) and v > 0 for v in scales["dirty"].values())


# --- readers: empty, raising, not readers --------------------------------------------------------

def user_module(tmp_path: Path, monkeypatch, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    return name


def test_empty_readers(folders, matmul, tmp_path, monkeypatch):
    empty = folders.inp / "empty"
    empty.mkdir()
    refused(quantize(folders, matmul, "--calib", empty), "no .npz files in the calibration folder", str(empty))
    zero = folders.inp / "zero.npz"
    np.savez(zero, x=np.zeros((0, 2, 16), np.float32))
    refused(quantize(folders, matmul, "--calib", zero), "holds 0 samples", str(zero))
    nothing = folders.inp / "nothing.npz"
    np.savez(nothing)
    refused(quantize(folders, matmul, "--calib", nothing), "holds no arrays")
    module = user_module(tmp_path, monkeypatch, "hostile_empty_reader", """
        def feeds():
            return iter([])
    """)
    refused(quantize(folders, matmul, "--calib", f"{module}:feeds"),
            f"calibration reader {module}:feeds produced no samples")
    folders.unchanged()


FEEDS = """
    import numpy as np

    def _feed(i):
        return {"x": np.random.default_rng(i).standard_normal((2, 16)).astype(np.float32)}
"""


def test_a_reader_that_raises_halfway_is_named_with_the_sample(folders, matmul, tmp_path, monkeypatch):
    module = user_module(tmp_path, monkeypatch, "hostile_halfway_reader", FEEDS + """
    def feeds():
        for i in range(8):
            if i == 2:
                raise OSError("the network share went away")
            yield _feed(i)

    class Reader:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self):
            self.i = 0

        def get_next(self):
            self.i += 1
            if self.i == 3:
                raise ValueError("bad image")
            return _feed(self.i)

    def ort_reader():
        return Reader()
    """)
    refused(quantize(folders, matmul, "--calib", f"{module}:feeds"),
            f"calibration reader {module}:feeds raised OSError: the network share went away at sample 2", "your code")
    refused(quantize(folders, matmul, "--calib", f"{module}:ort_reader"),
            f"calibration reader {module}:ort_reader raised ValueError: bad image at sample 2")
    folders.unchanged()


def test_readers_that_are_not_readers(folders, matmul, tmp_path, monkeypatch):
    module = user_module(tmp_path, monkeypatch, "hostile_odd_readers", FEEDS + """
    NUMBER = 3

    def number():
        return 42

    def crashes():
        raise RuntimeError("no GPU for preprocessing")

    def tuples():
        return [(_feed(0)["x"],)]
    """)
    refused(quantize(folders, matmul, "--calib", f"{module}:number"), "returned 'int'", "neither a reader")
    refused(quantize(folders, matmul, "--calib", f"{module}:NUMBER"), "is 'int', not a function")
    refused(quantize(folders, matmul, "--calib", f"{module}:crashes"), "raised RuntimeError: no GPU for preprocessing")
    refused(quantize(folders, matmul, "--calib", f"{module}:tuples"), "calibration sample 0", "is a tuple, not a dict")
    broken = user_module(tmp_path, monkeypatch, "hostile_broken_module", "1 / 0\n")
    refused(quantize(folders, matmul, "--calib", f"{broken}:feeds"), "raised ZeroDivisionError")
    folders.unchanged()
