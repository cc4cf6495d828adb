"""GPU runtimes without a GPU: availability reasons, ORT provider options and fallback detection, TensorRT
(10.x and 11.x) and MIGraphX code paths over checking fakes (tests/runtimes/fakes), the device-timing
harness over a fake event clock. Tests marked ``gpu`` need the real thing and skip with the reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile import runtimes
from qcompile.runtimes import gpu_timing, ort
from qcompile.runtimes import migraphx as mx_runtime
from qcompile.runtimes import tensorrt as trt_runtime
from qcompile.runtimes.base import BackendError, RuntimeOptions
from qcompile.runtimes.timing import summarize

FAKES = Path(__file__).parent / "fakes"
FAKE_PACKAGES = ("tensorrt", "cuda", "migraphx")
W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 6) / 10
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def linear_model(batch: str | int = "batch") -> bytes:
    """y = x @ W + B with x: float[batch, 4] (batch symbolic or fixed)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def expected(x: np.ndarray) -> np.ndarray:
    return x @ W + B


def purge_fakes() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_PACKAGES:
            del sys.modules[name]


@pytest.fixture
def fakes(monkeypatch):
    """The fake tensorrt / cuda-python / migraphx importable for one test."""
    purge_fakes()
    monkeypatch.syspath_prepend(str(FAKES))
    yield FAKES
    purge_fakes()


def load_fake_trt(monkeypatch, flavour: str) -> SimpleNamespace:
    monkeypatch.setenv("FAKE_TENSORRT_FLAVOUR", flavour)
    import tensorrt
    from cuda.bindings import runtime as cudart

    tensorrt.reset()
    cudart.reset()
    return SimpleNamespace(trt=tensorrt, cudart=cudart, flavour=flavour)


@pytest.fixture(params=["10", "11"])
def fake_trt(request, monkeypatch, fakes):
    return load_fake_trt(monkeypatch, request.param)


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    path = tmp_path / "linear.onnx"
    path.write_bytes(linear_model())
    return path


# --- availability --------------------------------------------------------------------------------------------

def test_every_gpu_runtime_is_registered_and_says_why_not_in_one_line():
    assert set(runtimes.GPU_RUNTIMES) <= set(runtimes.runtime_names())
    no_gpu = gpu_timing.nvidia_driver_missing() is not None and gpu_timing.rocm_missing() is not None
    for name in runtimes.GPU_RUNTIMES:
        reason = runtimes.missing(name)
        availability = runtimes.get_runtime(name).available()
        assert bool(availability) == (reason is None)
        if no_gpu:
            assert reason and "\n" not in reason, name
            assert not availability.ok and availability.reason == reason
    assert runtimes.missing("ort-cpu") is None
    with pytest.raises(KeyError, match="known"):
        runtimes.missing("no-such-runtime")


def test_reasons_name_what_is_missing(monkeypatch):
    assert "onnxruntime-gpu" in ort.OrtCudaRuntime().missing()
    assert "onnxruntime-migraphx" in ort.OrtMigraphxRuntime().missing()
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(gpu_timing, "nvidia_driver_missing", lambda *a, **k: "no NVIDIA GPU driver here")
    assert ort.OrtCudaRuntime().missing() == "no NVIDIA GPU driver here"  # onnxruntime-gpu on a CPU machine
    monkeypatch.setattr(gpu_timing, "nvidia_driver_missing", lambda *a, **k: None)
    monkeypatch.setattr(ort, "tensorrt_libraries_missing", lambda *a, **k: "libnvinfer missing")
    assert ort.OrtCudaRuntime().missing() is None
    assert ort.OrtTensorrtRuntime().missing() == "libnvinfer missing"
    if trt_runtime.tensorrt_missing():
        assert "NVIDIA's package index" in trt_runtime.tensorrt_missing()


def test_device_probes_look_only_at_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    dev, lib = tmp_path / "dev", tmp_path / "lib"
    dev.mkdir()
    lib.mkdir()
    assert "nvidia0 is absent" in gpu_timing.nvidia_driver_missing(str(dev), [str(lib)], ld_cache=str(tmp_path / "x"))
    (dev / "nvidia0").touch()
    assert "libcuda.so.1" in gpu_timing.nvidia_driver_missing(str(dev), [str(lib)], ld_cache=str(tmp_path / "x"))
    (lib / "libcuda.so.1").touch()
    assert gpu_timing.nvidia_driver_missing(str(dev), [str(lib)], ld_cache=str(tmp_path / "x")) is None
    assert "kfd" in gpu_timing.rocm_missing(str(dev))
    (dev / "kfd").touch()
    assert gpu_timing.rocm_missing(str(dev)) is None


# --- profiles ------------------------------------------------------------------------------------------------

def test_parse_profile():
    assert trt_runtime.parse_profile("seq=1:128:512") == {"seq": (1, 128, 512)}
    assert trt_runtime.parse_profile("batch=1:2:8, seq=16") == {"batch": (1, 2, 8), "seq": (16, 16, 16)}
    for bad in ("seq", "seq=1:2", "seq=a:b:c", "seq=4:2:8", "=1:2:3", "seq=0:1:2"):
        with pytest.raises(ValueError, match="seq=1:128:512|min <= opt"):
            trt_runtime.parse_profile(bad)


def test_input_profiles_fix_static_dims_and_take_symbolic_ones_from_dims(tmp_path):
    assert trt_runtime.input_profiles(linear_model(2)) == {"x": ((2, 4), (2, 4), (2, 4))}
    assert trt_runtime.input_profiles(linear_model(), {"batch": (1, 4, 16)}) == {"x": ((1, 4), (4, 4), (16, 4))}
    with pytest.raises(BackendError, match=r"x\[0\] \(batch\).*NAME=min:opt:max"):
        trt_runtime.input_profiles(linear_model())
    with pytest.raises(BackendError, match="no symbolic dims named seq"):
        trt_runtime.input_profiles(linear_model(), {"batch": (1, 1, 1), "seq": (1, 2, 3)})


# --- ONNX Runtime GPU providers ------------------------------------------------------------------------------

class FakeSession:
    """Stands in for onnxruntime.InferenceSession: records its arguments, reports chosen providers."""

    created: list[dict] = []
    providers_after: list[str] = []

    def __init__(self, model, sess_options=None, **kwargs):
        FakeSession.created.append({"model": model, "so": sess_options, **kwargs})
        self.fallback_disabled = False
        self.iobinding_runs: list = []

    def disable_fallback(self):
        self.fallback_disabled = True

    def get_providers(self):
        return list(FakeSession.providers_after)

    def get_inputs(self):
        return [SimpleNamespace(name="x")]

    def get_outputs(self):
        return [SimpleNamespace(name="y", shape=[2, 3], type="tensor(float)")]

    def io_binding(self):
        return FakeBinding()

    def run_with_iobinding(self, binding):
        self.iobinding_runs.append(binding)


class FakeBinding:
    def __init__(self):
        self.inputs, self.outputs = {}, []

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = value

    def bind_output(self, name, device_type, device_id):
        assert (device_type, device_id) == ("cuda", 0)
        self.outputs.append(name)

    def bind_ortvalue_output(self, name, value):
        self.outputs.append(name)

    def copy_outputs_to_cpu(self):
        return [np.zeros((2, 3), np.float32) for _ in self.outputs]


class FakeOrtValue:
    made: list[tuple] = []

    def __init__(self, array):
        self.array = array
        self.updates = 0

    @classmethod
    def ortvalue_from_numpy(cls, array, device_type="cpu", device_id=0):
        cls.made.append((device_type, device_id, array.shape))
        return cls(array)

    @classmethod
    def ortvalue_from_shape_and_type(cls, shape, dtype, device_type, device_id):
        cls.made.append((device_type, device_id, tuple(shape)))
        return cls(np.zeros(shape, dtype))

    def update_inplace(self, array):
        assert array.shape == self.array.shape
        self.updates += 1


@pytest.fixture
def fake_ort(monkeypatch):
    FakeSession.created, FakeOrtValue.made = [], []
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    monkeypatch.setattr(onnxruntime, "OrtValue", FakeOrtValue)
    return FakeSession


def test_ort_trt_provider_options_caches_profiles_and_no_precision_flags(fake_ort, tmp_path):
    fake_ort.providers_after = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    runtime = runtimes.get_runtime("ort-trt")
    extra = {ort.EXTRA_CACHE_DIR: str(tmp_path), ort.EXTRA_PROFILES: {"x": ((1, 4), (8, 4), (32, 4))},
             "session.disable_prepacking": "1"}
    runtime.load(linear_model(), RuntimeOptions(extra=extra))
    created = fake_ort.created[-1]
    (trt_name, options), (cuda_name, cuda_options) = created["providers"]
    assert (trt_name, cuda_name) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert options["trt_engine_cache_enable"] == "True" and options["trt_timing_cache_enable"] == "True"
    assert Path(options["trt_engine_cache_path"]).parent == tmp_path and Path(options["trt_engine_cache_path"]).is_dir()
    assert Path(options["trt_timing_cache_path"]).parent == tmp_path
    assert options["trt_profile_min_shapes"] == "x:1x4"
    assert options["trt_profile_opt_shapes"] == "x:8x4" and options["trt_profile_max_shapes"] == "x:32x4"
    assert not any("fp16" in k or "int8" in k or "bf16" in k or "fp8" in k for k in options)
    assert cuda_options == {"device_id": "0"} and created["enable_fallback"] == 0
    so = created["so"]
    assert so.get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(Exception):  # qcompile's own keys never reach ORT's session config
        so.get_session_config_entry(ort.EXTRA_CACHE_DIR)
    assert runtime._session.fallback_disabled
    runtime.load(linear_model(), RuntimeOptions(extra={ort.EXTRA_DIMS: "batch=2:4:8"}))  # profiles from dims
    options = fake_ort.created[-1]["providers"][0][1]
    assert (options["trt_profile_min_shapes"], options["trt_profile_max_shapes"]) == ("x:2x4", "x:8x4")
    assert "trt_engine_cache_path" not in options  # extra options apply to one load only


def test_ort_session_that_fell_back_to_cpu_is_refused(fake_ort):
    fake_ort.providers_after = ["CPUExecutionProvider"]
    runtime = ort.OrtCudaRuntime()
    with pytest.raises(BackendError, match="fell back to the CPU.*not a GPU run"):
        runtime.load(linear_model())
    assert runtime._session is None


def test_ort_cuda_and_migraphx_options(fake_ort):
    fake_ort.providers_after = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    ort.OrtCudaRuntime(device_id=0, cudnn_conv_algo_search="HEURISTIC", cuda_graph=True).load(linear_model())
    assert fake_ort.created[-1]["providers"] == [
        ("CUDAExecutionProvider", {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "1"})]
    fake_ort.providers_after = ["MIGraphXExecutionProvider", "CPUExecutionProvider"]
    ort.OrtMigraphxRuntime().load(linear_model())
    assert fake_ort.created[-1]["providers"] == [("MIGraphXExecutionProvider", {"device_id": "0"})]
    with pytest.raises(BackendError, match="CUDA graphs are not supported"):
        ort.OrtMigraphxRuntime().load(linear_model(), RuntimeOptions(extra={ort.EXTRA_CUDA_GRAPH: True}))


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_real_onnxruntime_without_cuda_is_caught_falling_back():
    """This onnxruntime has no CUDA provider: it drops it with a warning; the check must refuse the session."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendError, match="fell back to the CPU"):
        ort.OrtCudaRuntime().load(linear_model())


def test_ort_cpu_path_is_unchanged():
    runtime = runtimes.get_runtime("ort-cpu")
    assert type(runtime) is ort.OrtRuntime
    runtime.load(linear_model(), RuntimeOptions(extra={"session.disable_prepacking": "1"}))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(runtime.run({"x": x})["y"], expected(x), rtol=1e-6)


def test_ort_io_binding_rotates_device_feed_sets(fake_ort):
    fake_ort.providers_after = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    runtime = ort.OrtCudaRuntime()
    runtime.load(linear_model())
    feeds = [{"x": np.full((2, 4), i, np.float32)} for i in range(3)]
    results = gpu_timing.time_device(runtime, feeds, runs=7, warmup=2, clock=lambda stream: StepClock([1.0]))
    assert results["ort-cuda"].runs == 7
    assert FakeOrtValue.made == [("cuda", 0, (2, 4))] * 3  # each feed set copied to the device once
    runs = runtime._session.iobinding_runs
    assert len(runs) == 9 and runs[0] is not runs[1] and runs[0] is runs[3]  # cycled, not re-bound
    bound = runtime.bind_device(feeds[0])
    assert runtime.run_bound(bound)["y"].shape == (2, 3)


def test_ort_cuda_graph_plan_refills_fixed_buffers(fake_ort):
    fake_ort.providers_after = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    runtime = ort.OrtCudaRuntime(cuda_graph=True)
    runtime.load(linear_model())
    feeds = [{"x": np.full((2, 4), i, np.float32)} for i in range(2)]
    gpu_timing.time_device(runtime, feeds, runs=4, warmup=1, cuda_graph=True, clock=lambda s: StepClock([1.0]))
    runs = runtime._session.iobinding_runs
    assert len(runs) == 5 and all(r is runs[0] for r in runs)  # one binding at fixed addresses
    assert runs[0].inputs["x"].updates == 5
    with pytest.raises(BackendError, match="load with cuda_graph=True"):
        plain = ort.OrtCudaRuntime()
        plain.load(linear_model())
        plain.device_plan(feeds, cuda_graph=True)


# --- TensorRT over the fake ----------------------------------------------------------------------------------

def test_network_flags_per_version(monkeypatch, fakes):
    for flavour, flags in (("8", ["EXPLICIT_BATCH"]), ("10", ["STRONGLY_TYPED"]), ("11", ["STRONGLY_TYPED"])):
        purge_fakes()
        fake = load_fake_trt(monkeypatch, flavour)
        assert trt_runtime.network_flags(fake.trt)[1] == flags
    assert not hasattr(fake.trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")  # 11
    assert not hasattr(fake.trt.BuilderFlag, "FP16")
    purge_fakes()
    fake = load_fake_trt(monkeypatch, "10")  # the fake itself refuses precision flags and EXPLICIT_BATCH on 10
    with pytest.raises(AssertionError, match="precision flag FP16"):
        fake.trt.Builder(trt_runtime._logger(fake.trt)).create_builder_config().set_flag(fake.trt.BuilderFlag.FP16)
    with pytest.raises(AssertionError, match="STRONGLY_TYPED not requested"):
        fake.trt.Builder(trt_runtime._logger(fake.trt)).create_network(0)
    flag = fake.trt.NetworkDefinitionCreationFlag
    with pytest.raises(AssertionError, match="EXPLICIT_BATCH"):
        fake.trt.Builder(trt_runtime._logger(fake.trt)).create_network((1 << flag.STRONGLY_TYPED) | 1)


def test_build_engine_writes_engine_and_json(fake_trt, onnx_file, tmp_path):
    engine = tmp_path / "out" / "linear.plan"
    info = trt_runtime.build_engine(onnx_file, engine, dims={"batch": (1, 8, 64)}, workspace_bytes=1 << 20)
    record = fake_trt.trt.RECORD
    assert record.builds == 1 and record.workspace == [1 << 20]
    assert record.profiles == [{"x": ((1, 4), (8, 4), (64, 4))}]
    strongly = 1 << int(fake_trt.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert record.network_flags == [strongly]
    assert engine.read_bytes().startswith(b"FAKEPLAN")
    sidecar = json.loads((tmp_path / "out" / "linear.plan.json").read_text())
    assert sidecar == info
    assert info["tensorrt_version"] == fake_trt.trt.__version__ and info["gpu_name"] == "Fake GPU (sm_90)"
    assert info["build_options"]["builder_flags"] == [] and info["build_options"]["network_flags"] == ["STRONGLY_TYPED"]
    assert info["build_options"]["profiles"] == {"x": [[1, 4], [8, 4], [64, 4]]}
    assert len(info["cache_key"]) == 64 and info["cached"] is False
    assert not [p for p in engine.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_engine_and_timing_caches(fake_trt, onnx_file, tmp_path):
    cache = tmp_path / "cache"
    first = trt_runtime.build_engine(onnx_file, None, cache_dir=cache, dims={"batch": (1, 8, 64)})
    assert Path(first["engine_path"]).parent == cache / first["cache_key"]
    again = trt_runtime.build_engine(onnx_file, tmp_path / "copy.plan", cache_dir=cache, dims={"batch": (1, 8, 64)})
    assert again["cached"] is True and again["cache_key"] == first["cache_key"]
    assert fake_trt.trt.RECORD.builds == 1 and (tmp_path / "copy.plan").read_bytes().startswith(b"FAKEPLAN")
    other = trt_runtime.build_engine(onnx_file, None, cache_dir=cache, dims={"batch": (1, 8, 128)})
    assert other["cache_key"] != first["cache_key"] and fake_trt.trt.RECORD.builds == 2
    assert fake_trt.trt.RECORD.timing_cache_loaded == [0, 1]  # the second build loaded the first's timing cache
    (timing,) = cache.glob("timing-*.cache")
    assert timing.read_bytes().decode().endswith("|2")
    timing.write_bytes(b"FAKETC|9.0.0|5")  # another TensorRT's cache: mismatched, so a fresh one is used
    trt_runtime.build_engine(onnx_file, None, cache_dir=cache, dims={"batch": (2, 8, 128)})
    assert fake_trt.trt.RECORD.timing_cache_loaded[-1] == 0


def test_cache_key_covers_model_version_gpu_and_options():
    variants = [("m", "10.1", "gpu", {"a": 1}), ("n", "10.1", "gpu", {"a": 1}), ("m", "11.0", "gpu", {"a": 1}),
                ("m", "10.1", "other", {"a": 1}), ("m", "10.1", "gpu", {"a": 2})]
    keys = {trt_runtime.cache_key(*v) for v in variants}
    assert len(keys) == 5 and trt_runtime.cache_key(*variants[0]) == trt_runtime.cache_key(*variants[0])


def test_build_errors_are_backend_errors(fake_trt, tmp_path, onnx_file):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BackendError, match="could not parse the model: In node -1.*ModelImporter"):
        trt_runtime.build_engine(bad, tmp_path / "bad.plan", profiles={})
    with pytest.raises(BackendError, match=r"x\[0\] \(batch\)"):
        trt_runtime.build_engine(onnx_file, tmp_path / "e.plan")
    with pytest.raises(BackendError, match="dynamic inputs without a profile: x"):
        trt_runtime.build_engine(onnx_file, tmp_path / "e.plan", profiles={})
    with pytest.raises(BackendError, match="does not have: z"):
        trt_runtime.build_engine(onnx_file, tmp_path / "e.plan", profiles={"z": ((1,), (1,), (1,))})
    with pytest.raises(BackendError, match="could not build the engine: profile .* does not fit x"):
        trt_runtime.build_engine(onnx_file, tmp_path / "e.plan", profiles={"x": ((1, 5), (1, 5), (1, 5))})
    with pytest.raises(BackendError, match="engine_path or cache_dir"):
        trt_runtime.build_engine(onnx_file)
    assert fake_trt.trt.RECORD.builds == 0


def test_tensorrt_runtime_runs_through_device_buffers(fake_trt, onnx_file, tmp_path):
    runtime = runtimes.get_runtime("tensorrt")
    runtime.load(str(onnx_file), RuntimeOptions(extra={trt_runtime.EXTRA_DIMS: "batch=1:4:16"}))
    assert runtime.input_names == ["x"] and runtime.output_names == ["y"]
    for batch in (1, 4, 16, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        np.testing.assert_allclose(runtime.run({"x": x})["y"], expected(x), rtol=1e-5, atol=1e-6)
    kinds = {kind for kind, _ in fake_trt.cudart.STATE.copies}
    assert kinds == {"cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"}
    with pytest.raises(BackendError, match=r"outside the engine's profile \[\(1, 4\), \(4, 4\), \(16, 4\)\]"):
        runtime.run({"x": np.ones((17, 4), np.float32)})
    with pytest.raises(BackendError, match="takes float32, got float64"):
        runtime.run({"x": np.ones((2, 4))})
    with pytest.raises(BackendError, match="missing inputs: x"):
        runtime.run({})
    runtime.close()
    assert fake_trt.cudart.STATE.allocations == {} and fake_trt.cudart.STATE.streams == {}


def test_tensorrt_runtime_loads_engine_files_and_bytes(fake_trt, onnx_file, tmp_path):
    engine = tmp_path / "linear.engine"
    trt_runtime.build_engine(onnx_file, engine, profiles={"x": ((1, 4), (2, 4), (8, 4))})
    runtime = trt_runtime.TensorRTRuntime()
    runtime.load(str(engine))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(runtime.run({"x": x}, outputs=["y"])["y"], expected(x), rtol=1e-6)
    runtime.load(linear_model(3))  # ONNX bytes, static: built in memory
    np.testing.assert_allclose(runtime.run({"x": np.ones((3, 4), np.float32)})["y"], expected(np.ones((3, 4))),
                               rtol=1e-6)
    assert runtime.build_info["engine_path"] is None
    runtime.close()
    engine.write_bytes(b"garbage")
    with pytest.raises(BackendError, match="could not deserialize the engine: not an engine plan"):
        runtime.load(str(engine))


def test_tensorrt_available_with_fakes_needs_only_a_driver(fake_trt, monkeypatch):
    monkeypatch.setattr(gpu_timing, "nvidia_driver_missing", lambda *a, **k: "no NVIDIA GPU driver here")
    assert runtimes.missing("tensorrt") == "no NVIDIA GPU driver here"
    monkeypatch.setattr(gpu_timing, "nvidia_driver_missing", lambda *a, **k: None)
    assert runtimes.missing("tensorrt") is None


def test_tensorrt_device_timing_rotates_buffers_and_replays_graphs(fake_trt, onnx_file):
    runtime = trt_runtime.TensorRTRuntime(dims={"batch": (1, 2, 4)})
    runtime.load(str(onnx_file))
    feeds = [{"x": np.full((2, 4), i, np.float32)} for i in range(3)]
    record, state = fake_trt.trt.RECORD, fake_trt.cudart.STATE
    results = runtimes.time_device(runtime, feeds, runs=9, warmup=3)
    result = results["tensorrt"]
    assert result.runs == 9 and result.warmup == 3
    assert result.median_ms == pytest.approx(1.0)  # the fake charges 1 ms per execution
    addresses = [e["x"] for e in record.executions]
    assert len(addresses) == 12 and len(set(addresses)) == 3 and addresses[:3] == addresses[3:6]
    before = len(record.executions)
    graphs = runtimes.time_device(runtime, feeds, runs=6, warmup=2, cuda_graph=True)
    assert graphs["tensorrt"].runs == 6 and state.graph_launches == 8
    assert len(record.executions) - before == 3 + 8  # one warm-up execution per feed set, then replays
    assert state.graphs == {} and state.execs == {}  # plan closed
    runtime.close()
    assert state.allocations == {}
    with pytest.raises(BackendError, match="same shapes"):
        runtime.load(str(onnx_file))
        runtime.device_plan([{"x": np.ones((1, 4), np.float32)}, {"x": np.ones((2, 4), np.float32)}],
                            cuda_graph=True)


# --- MIGraphX ------------------------------------------------------------------------------------------------

def test_migraphx_placeholder_is_detected(tmp_path, monkeypatch):
    purge_fakes()
    (tmp_path / "migraphx").mkdir()
    (tmp_path / "migraphx" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reason = mx_runtime.migraphx_missing()
    finally:
        purge_fakes()
    assert "placeholder" in reason and "/opt/rocm/lib" in reason


def test_migraphx_runtime_over_the_fake(fakes, monkeypatch, onnx_file):
    import migraphx

    assert runtimes.missing("migraphx") == gpu_timing.rocm_missing() or gpu_timing.rocm_missing() is None
    monkeypatch.setattr(gpu_timing, "rocm_missing", lambda *a, **k: None)
    assert runtimes.missing("migraphx") is None
    runtime = runtimes.get_runtime("migraphx")
    runtime.load(str(onnx_file), RuntimeOptions(extra={mx_runtime.EXTRA_DIMS: "batch=1:5:8"}))
    assert migraphx.RECORD.map_input_dims == [{"x": [5, 4]}] and migraphx.RECORD.targets == ["gpu"]
    x = np.ones((5, 4), np.float32)
    np.testing.assert_allclose(runtime.run({"x": x})["y"], expected(x), rtol=1e-6)
    with pytest.raises(BackendError, match=r"compiled shape \(5, 4\)"):
        runtime.run({"x": np.ones((2, 4), np.float32)})
    runtime.load(linear_model(2))
    assert migraphx.RECORD.map_input_dims[-1] == {"x": [2, 4]}


# --- the device-timing harness -------------------------------------------------------------------------------

class StepClock:
    """A fake event clock: each timed run takes the next scripted duration (ms), cycling."""

    def __init__(self, durations_ms):
        self.durations = list(durations_ms)
        self.now = 0.0
        self.index = 0
        self.live = 0
        self.closed = False

    def mark(self):
        self.live += 1
        if self.live % 2 == 0:  # an end mark: the run took the next duration
            self.now += self.durations[self.index % len(self.durations)]
            self.index += 1
        return self.now

    def elapsed_ms(self, start, end):
        return end - start

    def release(self, *events):
        pass

    def close(self):
        self.closed = True


def test_time_device_statistics_rotation_and_warmup():
    seen = []
    durations = [1.0, 2.0, 3.0, 4.0, 10.0]
    clocks = []

    def make_clock(stream):
        clocks.append(StepClock(durations))
        return clocks[-1]

    feeds = [{"x": np.array([i])} for i in range(3)]
    results = gpu_timing.time_device({"a": lambda f: seen.append(int(f["x"][0]))}, feeds, runs=5, warmup=2,
                                     items_per_run=4, clock=make_clock)
    assert seen == [0, 1, 2, 0, 1, 2, 0]  # warm-up continues the rotation
    expected_result = summarize("a", [d / 1e3 for d in durations], 2, 4)
    assert results["a"] == expected_result
    assert results["a"].median_ms == pytest.approx(3.0) and results["a"].p90_ms == pytest.approx(10.0)
    assert clocks[0].closed


def test_time_device_plans_setup_runs_untimed_and_close_is_called():
    calls, closed = [], []
    plan = gpu_timing.DevicePlan(
        [gpu_timing.DeviceStep(run=lambda i=i: calls.append(("run", i)), setup=lambda i=i: calls.append(("setup", i)))
         for i in range(2)], stream=7, close=lambda: closed.append(True))
    target = SimpleNamespace(name="t", device_plan=lambda feeds, cuda_graph: plan)
    streams = []

    def make_clock(stream):
        streams.append(stream)
        return StepClock([2.0])

    result = gpu_timing.time_device(target, [{}, {}], runs=3, warmup=1, clock=make_clock)["t"]
    assert calls == [("setup", 0), ("run", 0), ("setup", 1), ("run", 1), ("setup", 0), ("run", 0), ("setup", 1),
                     ("run", 1)]
    assert result.runs == 3 and result.median_ms == pytest.approx(2.0) and closed == [True] and streams == [7]


def test_time_device_refusals():
    with pytest.raises(BackendError, match="CUDA-graph replay needs a runtime"):
        gpu_timing.time_device({"f": lambda f: None}, [{}], cuda_graph=True, clock=lambda s: StepClock([1]))
    with pytest.raises(ValueError, match="at least one feed set"):
        gpu_timing.time_device({"f": lambda f: None}, [], clock=lambda s: StepClock([1]))
    with pytest.raises(BackendError, match="cannot time"):
        gpu_timing.time_device({"f": object()}, [{}], clock=lambda s: StepClock([1]))


def test_cuda_event_clock_over_the_fake_cudart(fakes, monkeypatch):
    fake = load_fake_trt(monkeypatch, "11")
    clock = gpu_timing.default_clock(0)
    assert isinstance(clock, gpu_timing.CudaEventClock)
    start = clock.mark()
    fake.cudart.enqueue(0, lambda: None, duration_ms=2.5)
    end = clock.mark()
    assert clock.elapsed_ms(start, end) == pytest.approx(2.5)
    clock.release(start, end)
    assert fake.cudart.STATE.events == {}


def test_default_clock_without_cuda_says_so():
    if gpu_timing.cudart_missing() is None:
        pytest.skip("cuda-python is installed")
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("torch has CUDA here")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="cuda-python|CUDA"):
        gpu_timing.default_clock()


# --- real GPUs -----------------------------------------------------------------------------------------------

def needs(name: str):
    reason = runtimes.missing(name)
    return pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")


@pytest.mark.gpu
@needs("ort-cuda")
def test_ort_cuda_matches_cpu_on_a_gpu():
    runtime = runtimes.get_runtime("ort-cuda")
    runtime.load(linear_model())
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    np.testing.assert_allclose(runtime.run({"x": x})["y"], expected(x), rtol=1e-4, atol=1e-5)
    assert runtimes.time_device(runtime, [{"x": x}], runs=20, warmup=2)["ort-cuda"].runs == 20


@pytest.mark.gpu
@needs("tensorrt")
def test_tensorrt_builds_and_runs_on_a_gpu(tmp_path):
    path = tmp_path / "linear.onnx"
    path.write_bytes(linear_model())
    info = runtimes.build_engine(path, tmp_path / "linear.plan", dims={"batch": (1, 8, 32)})
    runtime = runtimes.TensorRTRuntime()
    runtime.load(info["engine_path"])
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    np.testing.assert_allclose(runtime.run({"x": x})["y"], expected(x), rtol=1e-3, atol=1e-3)
    for graph in (False, True):
        assert runtimes.time_device(runtime, [{"x": x}] * 3, runs=20, warmup=2, cuda_graph=graph)["tensorrt"].runs
    runtime.close()


@pytest.mark.gpu
def test_torch_event_clock_on_a_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    a = torch.randn(512, 512, device="cuda")
    clock = gpu_timing.TorchEventClock()
    result = gpu_timing.time_device({"mm": lambda f: a @ a}, [{}], runs=20, warmup=2, clock=lambda s: clock)["mm"]
    assert result.runs == 20 and result.median_ms > 0


def test_fake_packages_do_not_leak():
    assert not any(name.split(".")[0] in FAKE_PACKAGES for name in sys.modules)
    assert onnx is not None
