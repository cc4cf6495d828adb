"""ONNX Runtime backends: CPU (always available) and the GPU execution providers (CUDA, TensorRT, MIGraphX).

The CPU runtime passes ``RuntimeOptions.extra`` through as session config entries. The GPU runtimes
(:class:`OrtGpuRuntime`: CUDA, TensorRT and MIGraphX execution providers) take their own options
from ``extra`` keys that start with ``qcompile.`` and pass the rest through the same way.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qcompile.runtimes import gpu_timing
from qcompile.runtimes.base import Availability, BackendError, RuntimeOptions, SharedWeightsModel

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


#: Custom-op libraries every session registers (paths joined by os.pathsep): kernels for a user's own
#: domains, so that graphs holding them can be verified and calibrated (the nodes stay black boxes).
CUSTOM_OP_LIBRARIES_ENV = "QCOMPILE_CUSTOM_OP_LIBRARIES"


def custom_op_libraries() -> list[str]:
    return [path for path in os.environ.get(CUSTOM_OP_LIBRARIES_ENV, "").split(os.pathsep) if path]


class OrtRuntime:
    """ONNX Runtime with one execution provider."""

    accepts_shared_weights = True

    def __init__(self, name: str = "ort-cpu", provider: str = "CPUExecutionProvider") -> None:
        self.name = name
        self.provider = provider
        self._session = None
        self._shared: list = []  # OrtValues over the caller's arrays, alive as long as the session

    def available(self) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError:
            return Availability(False, "onnxruntime is not installed (pip install onnxruntime)")
        if self.provider not in ort.get_available_providers():
            return Availability(
                False, f"{self.provider} is not in this onnxruntime build (install onnxruntime-gpu and a CUDA driver)"
            )
        return Availability(True)

    def load(self, model: str | bytes | SharedWeightsModel, options: RuntimeOptions | None = None) -> None:
        import onnxruntime as ort

        options = options or RuntimeOptions()
        if options.optimization not in _LEVELS:
            raise BackendError(f"unknown optimization level {options.optimization!r}; use one of {sorted(_LEVELS)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[options.optimization])
        so.log_severity_level = 4  # errors reach us as exceptions; a fallback attempt must not print them
        if options.threads:
            so.intra_op_num_threads = int(options.threads)
            so.inter_op_num_threads = 1
        if not options.spin_wait:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        for key, value in self._session_entries(options):
            so.add_session_config_entry(str(key), str(value))
        for library in custom_op_libraries():
            try:
                so.register_custom_ops_library(library)
            except Exception as exc:  # ORT raises its own types for a library it cannot load
                raise BackendError(f"cannot load custom-op library {library}: {str(exc).splitlines()[0]}") from None
        self._configure(options)
        if isinstance(model, SharedWeightsModel):
            self._create_sharing(model, so)
        else:
            self._create(model, so)

    def _session_entries(self, options: RuntimeOptions):
        """(key, value) session config entries taken from ``options.extra``."""
        return options.extra.items()

    def _configure(self, options: RuntimeOptions) -> None:
        """Hook for subclasses: read backend options before the session is created."""

    def _session_kwargs(self) -> dict:
        """Keyword arguments of ``InferenceSession`` besides the model and session options."""
        return {"providers": [self.provider]}

    def _check_session(self, session) -> None:
        """Hook for subclasses: reject a session that is not what was asked for."""

    def _create(self, model: str | bytes, so) -> None:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(model, sess_options=so, **self._session_kwargs())
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise BackendError(f"onnxruntime could not load the model: {str(exc).strip().splitlines()[0]}") from exc
        self._check_session(session)
        self._session = session

    def _create_sharing(self, model: SharedWeightsModel, so) -> None:
        """A session whose initializers are the caller's arrays (SessionOptions.add_initializer)."""
        import onnxruntime as ort

        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in model.weights.values()]
        for name, value in zip(model.weights, values):
            so.add_initializer(name, value)
        # ORT checks that external data exists before it sees the overrides: an empty file will do.
        with tempfile.TemporaryDirectory(prefix="qcompile-shared-") as folder:
            Path(folder, model.placeholder).touch()
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            self._create(model.proto, so)
        self._shared = values

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._require().get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._require().get_outputs()]

    def _require(self):
        if self._session is None:
            raise BackendError(f"{self.name}: call load() before run()")
        return self._session

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        session = self._require()
        names = list(outputs) if outputs is not None else self.output_names
        try:
            arrays = session.run(names, dict(feeds))
        except Exception as exc:
            raise BackendError(f"onnxruntime failed to run: {str(exc).strip().splitlines()[0]}") from exc
        return dict(zip(names, arrays))

    def close(self) -> None:
        self._session = None
        self._shared = []

    def __enter__(self) -> "OrtRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- GPU execution providers ---------------------------------------------------------------------------------

#: ``RuntimeOptions.extra`` keys the GPU runtimes read themselves (never passed on as session config entries).
EXTRA_DEVICE_ID = "qcompile.device_id"
EXTRA_CACHE_DIR = "qcompile.cache_dir"  # TensorRT EP engine and timing caches go under it
EXTRA_PROFILES = "qcompile.profiles"  # {input: (min, opt, max) shapes}
EXTRA_CUDA_GRAPH = "qcompile.cuda_graph"
EXTRA_CONV_ALGO = "qcompile.cudnn_conv_algo_search"  # EXHAUSTIVE | HEURISTIC | DEFAULT
EXTRA_DIMS = "qcompile.dims"  # TensorRT EP: {symbolic dim: (min, opt, max)} or "seq=1:128:512" -> profiles
_OWN_PREFIX = "qcompile."

Shape = Sequence[int]
Profiles = Mapping[str, tuple[Shape, Shape, Shape]]

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def profile_option(profiles: Profiles, which: int) -> str:
    """A TensorRT EP ``trt_profile_*_shapes`` value (``"x:1x3x224x224,y:1x8"``); which: 0 min, 1 opt, 2 max."""
    parts = []
    for name, shapes in profiles.items():
        if any(c in name for c in ",:"):
            raise BackendError(f"input name {name!r} holds ',' or ':': the TensorRT EP cannot take a profile for it")
        parts.append(f"{name}:{'x'.join(str(int(d)) for d in shapes[which])}")
    return ",".join(parts)


@dataclass
class DeviceBinding:
    """An IO binding with its inputs already on the device and its outputs bound there."""

    binding: Any
    inputs: dict[str, Any]
    outputs: list[str]
    output_values: dict[str, Any] = field(default_factory=dict)


class OrtGpuRuntime(OrtRuntime):
    """ONNX Runtime on one GPU execution provider; never reports a CPU-fallback session as a GPU run.

    Options come from the constructor or from ``RuntimeOptions.extra`` (``EXTRA_*`` keys, which win).
    Precision is the graph's: no fp16/int8 provider flags are ever set.
    """

    package = "onnxruntime-gpu"
    device_type = "cuda"
    supports_cuda_graph = True

    def __init__(
        self,
        name: str,
        provider: str,
        *,
        device_id: int = 0,
        cache_dir: str | Path | None = None,
        profiles: Profiles | None = None,
        cuda_graph: bool = False,
        cudnn_conv_algo_search: str | None = None,
    ) -> None:
        super().__init__(name, provider)
        self.device_id = device_id
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.profiles = profiles
        self.cuda_graph = cuda_graph
        self.cudnn_conv_algo_search = cudnn_conv_algo_search
        # what each load starts from: options in RuntimeOptions.extra apply to that load only
        self._defaults = dict(device_id=device_id, cache_dir=self.cache_dir, profiles=profiles, cuda_graph=cuda_graph,
                              cudnn_conv_algo_search=cudnn_conv_algo_search)

    # availability ---------------------------------------------------------------------------------------
    def available(self) -> Availability:
        reason = self.missing()
        return Availability(reason is None, reason or "")

    def missing(self) -> str | None:
        """The one-line reason this runtime cannot run here, or None."""
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            return f"onnxruntime is not installed: pip install {self.package}"
        import onnxruntime as ort

        if self.provider not in ort.get_available_providers():
            return (
                f"{self.provider} is not in this onnxruntime build: pip install {self.package} "
                "(in its own venv: it replaces onnxruntime)"
            )
        return self.device_missing()

    def device_missing(self) -> str | None:
        return gpu_timing.nvidia_driver_missing()

    # session creation -----------------------------------------------------------------------------------
    def _session_entries(self, options: RuntimeOptions):
        return [(k, v) for k, v in options.extra.items() if not str(k).startswith(_OWN_PREFIX)]

    def _configure(self, options: RuntimeOptions) -> None:
        extra, defaults = options.extra, self._defaults
        self.device_id = int(extra.get(EXTRA_DEVICE_ID, defaults["device_id"]))
        self.cache_dir = Path(extra[EXTRA_CACHE_DIR]) if extra.get(EXTRA_CACHE_DIR) else defaults["cache_dir"]
        self.profiles = extra.get(EXTRA_PROFILES, defaults["profiles"])
        self.cuda_graph = bool(extra.get(EXTRA_CUDA_GRAPH, defaults["cuda_graph"]))
        self.cudnn_conv_algo_search = extra.get(EXTRA_CONV_ALGO, defaults["cudnn_conv_algo_search"])
        if self.cuda_graph and not self.supports_cuda_graph:
            raise BackendError(f"{self.name}: CUDA graphs are not supported by {self.provider}")

    def provider_options(self) -> dict[str, str]:
        """Options of the requested provider (strings, as ORT takes them)."""
        return {"device_id": str(self.device_id)}

    def providers(self) -> list:
        """The ``providers`` argument: the requested provider with its options, then any GPU fallbacks."""
        return [(self.provider, self.provider_options())]

    def _session_kwargs(self) -> dict:
        # enable_fallback=0: a provider that fails to initialise raises instead of retrying on the CPU
        return {"providers": self.providers(), "enable_fallback": 0}

    def _check_session(self, session) -> None:
        if hasattr(session, "disable_fallback"):
            session.disable_fallback()  # a run that fails on the GPU must not retry on the CPU
        got = list(session.get_providers())
        if not got or got[0] != self.provider:
            raise BackendError(
                f"{self.name}: the session fell back to the CPU ({', '.join(got) or 'no providers'}; "
                f"{self.provider} did not initialise): not a GPU run"
            )

    # device buffers and timing --------------------------------------------------------------------------
    def bind_device(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> DeviceBinding:
        """Copy ``feeds`` to the device once and bind the outputs there (``run_bound`` runs it)."""
        import onnxruntime as ort

        session = self._require()
        binding = session.io_binding()
        values = {}
        for name, array in feeds.items():
            values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type,
                                                            self.device_id)
            binding.bind_ortvalue_input(name, values[name])
        names = list(outputs) if outputs is not None else self.output_names
        for name in names:
            binding.bind_output(name, self.device_type, self.device_id)
        return DeviceBinding(binding, values, names)

    def run_bound(self, bound: DeviceBinding, *, to_host: bool = True) -> dict[str, np.ndarray] | None:
        """One run over device-bound inputs; outputs copied to host numpy arrays when ``to_host``."""
        session = self._require()
        try:
            session.run_with_iobinding(bound.binding)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed to run: {str(exc).strip().splitlines()[0]}") from exc
        if not to_host:
            return None
        return dict(zip(bound.outputs, bound.binding.copy_outputs_to_cpu()))

    def device_plan(self, feeds_list: Sequence[Mapping[str, np.ndarray]], *, cuda_graph: bool = False):
        """Steps for ``gpu_timing.time_device``: one device-bound feed set per step, or CUDA-graph replays."""
        if cuda_graph:
            return self._graph_plan(feeds_list)
        bindings = [self.bind_device(feeds) for feeds in feeds_list]
        steps = [gpu_timing.DeviceStep(run=lambda b=b: self.run_bound(b, to_host=False)) for b in bindings]
        return gpu_timing.DevicePlan(steps)

    def _graph_plan(self, feeds_list: Sequence[Mapping[str, np.ndarray]]):
        """One binding at fixed addresses (ORT replays its captured graph); feed sets copied in untimed."""
        import onnxruntime as ort

        if not (self.supports_cuda_graph and self.cuda_graph):
            raise BackendError(f"{self.name}: load with cuda_graph=True ({EXTRA_CUDA_GRAPH}) to replay CUDA graphs")
        shapes = [{k: np.shape(v) for k, v in feeds.items()} for feeds in feeds_list]
        if any(s != shapes[0] for s in shapes):
            raise BackendError("CUDA-graph replay needs every feed set to have the same shapes")
        session = self._require()
        bound = self.bind_device(feeds_list[0], outputs=[])
        for meta in session.get_outputs():
            if not all(isinstance(d, int) for d in meta.shape) or meta.type not in _ORT_TYPES:
                raise BackendError(f"output {meta.name} has shape {meta.shape} ({meta.type}): CUDA graphs need "
                                   "fixed output buffers")
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(meta.shape), _ORT_TYPES[meta.type],
                                                              self.device_type, self.device_id)
            bound.binding.bind_ortvalue_output(meta.name, value)
            bound.output_values[meta.name] = value
            bound.outputs.append(meta.name)

        def refill(feeds):
            for name, array in feeds.items():
                bound.inputs[name].update_inplace(np.ascontiguousarray(array))

        steps = [
            gpu_timing.DeviceStep(run=lambda: self.run_bound(bound, to_host=False), setup=lambda f=f: refill(f))
            for f in feeds_list
        ]
        return gpu_timing.DevicePlan(steps)


class OrtCudaRuntime(OrtGpuRuntime):
    """ONNX Runtime's CUDA execution provider: the FP32/FP16 GPU baseline (it has no INT8 conv kernels)."""

    def __init__(self, name: str = "ort-cuda", **kwargs: Any) -> None:
        super().__init__(name, "CUDAExecutionProvider", **kwargs)

    def provider_options(self) -> dict[str, str]:
        options = {"device_id": str(self.device_id)}
        if self.cudnn_conv_algo_search:
            options["cudnn_conv_algo_search"] = str(self.cudnn_conv_algo_search)
        if self.cuda_graph:
            options["enable_cuda_graph"] = "1"
        return options


class OrtTensorrtRuntime(OrtGpuRuntime):
    """ONNX Runtime's TensorRT execution provider (CUDA EP for what TensorRT does not take).

    Engine and timing caches go under ``cache_dir`` when one is given. Precision comes from the graph
    (Q/DQ, FP16 tensors): ``trt_fp16_enable`` / ``trt_int8_enable`` are never set, so TensorRT 10 builds
    the graph strongly typed.
    """

    def __init__(self, name: str = "ort-trt", **kwargs: Any) -> None:
        super().__init__(name, "TensorrtExecutionProvider", **kwargs)

    def device_missing(self) -> str | None:
        return gpu_timing.nvidia_driver_missing() or tensorrt_libraries_missing()

    def provider_options(self) -> dict[str, str]:
        options = {"device_id": str(self.device_id)}
        if self.cache_dir:
            options.update({
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(self.cache_dir / "ort-trt-engines"),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(self.cache_dir / "ort-trt-timing"),
            })
        if self.profiles:
            for which, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
                options[key] = profile_option(self.profiles, which)
        if self.cuda_graph:
            options["trt_cuda_graph_enable"] = "True"
        return options

    def providers(self) -> list:
        return [(self.provider, self.provider_options()), ("CUDAExecutionProvider", {"device_id": str(self.device_id)})]

    def load(self, model: str | bytes | SharedWeightsModel, options: RuntimeOptions | None = None) -> None:
        """As OrtRuntime.load; ``EXTRA_DIMS`` (without ``EXTRA_PROFILES``) derives profiles from the model."""
        options = options or RuntimeOptions()
        dims = options.extra.get(EXTRA_DIMS)
        if dims and EXTRA_PROFILES not in options.extra:
            from qcompile.runtimes.tensorrt import input_profiles, parse_profile

            try:
                dims = parse_profile(dims) if isinstance(dims, str) else dims
            except ValueError as exc:
                raise BackendError(str(exc)) from None
            source = model.proto if isinstance(model, SharedWeightsModel) else model
            profiles = input_profiles(source, dims)
            dynamic = {name: shapes for name, shapes in profiles.items() if shapes[0] != shapes[2]}
            options = RuntimeOptions(options.threads, options.optimization, options.spin_wait,
                                     {**options.extra, EXTRA_PROFILES: dynamic})
        super().load(model, options)

    def _configure(self, options: RuntimeOptions) -> None:
        super()._configure(options)
        if self.cache_dir:
            for sub in ("ort-trt-engines", "ort-trt-timing"):
                (self.cache_dir / sub).mkdir(parents=True, exist_ok=True)


class OrtMigraphxRuntime(OrtGpuRuntime):
    """ONNX Runtime's MIGraphX execution provider (AMD GPUs, onnxruntime-migraphx); no precision flags."""

    package = "onnxruntime-migraphx"
    supports_cuda_graph = False

    def __init__(self, name: str = "ort-migraphx", **kwargs: Any) -> None:
        super().__init__(name, "MIGraphXExecutionProvider", **kwargs)

    def device_missing(self) -> str | None:
        return gpu_timing.rocm_missing()

    def device_plan(self, feeds_list, *, cuda_graph: bool = False):
        raise BackendError(f"{self.name}: device timing uses CUDA events; time MIGraphX with the host harness")


def tensorrt_libraries_missing(dirs: Sequence[str] = gpu_timing.LIBRARY_DIRS) -> str | None:
    """Why the TensorRT EP cannot find libnvinfer (it loads it by name), or None."""
    import importlib.util

    folders = list(dirs)
    for package in ("tensorrt_libs", "tensorrt"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            folders += list(spec.submodule_search_locations)
    if any(gpu_timing.find_library(f"libnvinfer.so.{major}", folders) for major in (10, 11)):
        return None
    return ("TensorRT's libnvinfer.so.10/.11 is not on the loader path: install TensorRT from NVIDIA's index "
            "and add its lib folder to LD_LIBRARY_PATH")
