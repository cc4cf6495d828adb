"""TensorRT runtime (10.x and 11.x): engine builds with profiles and caches, runs through cuda-python buffers.

Precision lives in the graph: networks are created STRONGLY_TYPED where the enum has it (10.x needs it
for Q/DQ semantics; 11.x is always strongly typed and ignores it) and no precision builder flag is ever
set (11.x removed them). ``EXPLICIT_BATCH`` is requested only before 10 (it is gone from 11's enum).
``tensorrt`` and cuda-python are imported lazily: neither is needed until an engine is built or run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qcompile.runtimes import gpu_timing
from qcompile.runtimes.base import Availability, BackendError, RuntimeOptions, SharedWeightsModel

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profiles = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]

DEFAULT_WORKSPACE = 4 << 30
ENGINE_FILE = "engine.plan"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

#: ``RuntimeOptions.extra`` keys :class:`TensorRTRuntime` reads.
EXTRA_CACHE_DIR = "qcompile.cache_dir"
EXTRA_PROFILES = "qcompile.profiles"  # {input: (min, opt, max) shapes}
EXTRA_DIMS = "qcompile.dims"  # {symbolic dim: (min, opt, max)} or "seq=1:128:512,batch=1:1:8"
EXTRA_WORKSPACE = "qcompile.workspace_bytes"
EXTRA_DEVICE_ID = "qcompile.device_id"

_NUMPY_TYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


# --- shapes and profiles -------------------------------------------------------------------------------------

def parse_profile(text: str) -> dict[str, tuple[int, int, int]]:
    """``"seq=1:128:512,batch=1:1:8"`` -> {"seq": (1, 128, 512), "batch": (1, 1, 8)}; ``"n=4"`` fixes n.

    ValueError (saying what was expected) on bad syntax or min <= opt <= max not holding.
    """
    dims: dict[str, tuple[int, int, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, values = item.partition("=")
        name = name.strip()
        try:
            numbers = [int(v) for v in values.split(":")]
        except ValueError:
            numbers = []
        if not sep or not name or len(numbers) not in (1, 3):
            raise ValueError(f"bad dimension range {item!r}: expected NAME=min:opt:max (e.g. seq=1:128:512)")
        low, opt, high = numbers * 3 if len(numbers) == 1 else numbers
        if not 0 < low <= opt <= high:
            raise ValueError(f"bad dimension range {item!r}: need 0 < min <= opt <= max")
        dims[name] = (low, opt, high)
    return dims


def onnx_header(model: str | Path | bytes):
    """The ModelProto without external weights (shapes and names are all that is read)."""
    import onnx

    try:
        if isinstance(model, bytes):
            return onnx.load_from_string(model)
        return onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        where = "the model bytes" if isinstance(model, bytes) else str(model)
        raise BackendError(f"cannot read {where} as ONNX: {str(exc).strip().splitlines()[0]}") from None


def input_profiles(model: str | Path | bytes, dims: Mapping[str, Sequence[int]] | None = None) -> dict:
    """{input: (min, opt, max) shapes} from the ONNX inputs: static dims fixed, symbolic ones from ``dims``.

    ``dims`` maps a symbolic dim name to (min, opt, max) (see :func:`parse_profile`). BackendError
    names every dim left without a range, and any name in ``dims`` the model does not have.
    """
    dims = dict(dims or {})
    graph = onnx_header(model).graph
    weights = {t.name for t in graph.initializer}
    profiles, missing, used = {}, [], set()
    for value in graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            raise BackendError(f"input {value.name} has no shape: give its profile explicitly")
        shapes: tuple[list[int], list[int], list[int]] = ([], [], [])
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                bounds = (dim.dim_value,) * 3
            elif dim.dim_param and dim.dim_param in dims:
                bounds = tuple(int(d) for d in dims[dim.dim_param])
                used.add(dim.dim_param)
            else:
                missing.append(f"{value.name}[{axis}] ({dim.dim_param or 'unnamed'})")
                continue
            for target, bound in zip(shapes, bounds):
                target.append(bound)
        profiles[value.name] = tuple(tuple(s) for s in shapes)
    if missing:
        raise BackendError(f"no range for dims {', '.join(missing)}: give NAME=min:opt:max (e.g. seq=1:128:512)")
    unknown = sorted(set(dims) - used)
    if unknown:
        raise BackendError(f"the model has no symbolic dims named {', '.join(unknown)}")
    return profiles


def _profiles_json(profiles: Profiles) -> dict[str, list[list[int]]]:
    return {name: [[int(d) for d in shape] for shape in shapes] for name, shapes in sorted(profiles.items())}


# --- module access and identity ------------------------------------------------------------------------------

def tensorrt_missing() -> str | None:
    """Why the tensorrt module cannot be used (one line), or None; finds it without importing it."""
    if importlib.util.find_spec("tensorrt") is None:
        return ("the tensorrt Python package is not installed: it comes from NVIDIA's package index "
                "(pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com; PyPI's is a stub)")
    return None


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(tensorrt_missing() or f"tensorrt does not import: {exc}") from None
    return trt


def version_of(trt) -> str:
    return str(getattr(trt, "__version__", "0"))


def major_version(trt) -> int:
    try:
        return int(version_of(trt).split(".")[0])
    except ValueError:
        return 0


def network_flags(trt) -> tuple[int, list[str]]:
    """``create_network`` flags and their names: STRONGLY_TYPED where present, EXPLICIT_BATCH only before 10."""
    enum = trt.NetworkDefinitionCreationFlag
    flags, names = 0, []
    if hasattr(enum, "STRONGLY_TYPED"):
        flags |= 1 << int(enum.STRONGLY_TYPED)
        names.append("STRONGLY_TYPED")
    if major_version(trt) < 10 and hasattr(enum, "EXPLICIT_BATCH"):
        flags |= 1 << int(enum.EXPLICIT_BATCH)
        names.append("EXPLICIT_BATCH")
    return flags, names


def gpu_name(device_id: int = 0) -> str:
    """``"NVIDIA H200 (sm_90)"`` via cuda-python; ``"unknown GPU"`` when it cannot say."""
    cudart = gpu_timing.import_cudart()
    if cudart is None:
        return "unknown GPU"
    try:
        props = gpu_timing.check(cudart, cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    except BackendError:
        return "unknown GPU"
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return f"{name.rstrip(chr(0)).strip()} (sm_{props.major}{props.minor})"


def model_digest(model: str | Path | bytes) -> str:
    """sha256 of the ONNX bytes and of every external-data file they name (weights change the engine)."""
    digest = hashlib.sha256()
    if isinstance(model, bytes):
        digest.update(model)
        return digest.hexdigest()
    path = Path(model)
    digest.update(path.read_bytes())
    locations = set()
    try:
        initializers = onnx_header(path).graph.initializer
    except BackendError:  # not ONNX: the parser will say so
        initializers = []
    for tensor in initializers:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    for location in sorted(locations):
        digest.update(location.encode())
        with (path.parent / location).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(model_sha256: str, tensorrt_version: str, gpu: str, build_options: Mapping[str, Any]) -> str:
    """The engine cache key: sha256 over the model hash, TensorRT version, GPU name and build options."""
    blob = json.dumps({"model": model_sha256, "tensorrt": tensorrt_version, "gpu": gpu, "options": build_options},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (readers never see a part)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            handle.write(data)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


# --- building ------------------------------------------------------------------------------------------------

def _logger(trt):
    """A TensorRT logger that keeps errors (for BackendError messages) and sends the rest to ``logging``."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                log.warning("TensorRT: %s", msg)
            elif int(severity) <= int(trt.ILogger.Severity.WARNING):
                log.info("TensorRT: %s", msg)

    return CapturingLogger()


def _first(errors: list[str], limit: int = 3) -> str:
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(e.strip().splitlines()[0] for e in errors[:limit] if e.strip()) + more


def _parse(trt, builder, logger, model_bytes: bytes, model_path: Path | None):
    flags, _ = network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model_bytes, str(model_path)) if model_path else parser.parse(model_bytes)
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise BackendError(f"TensorRT could not parse the model: {_first(errors) or 'no error given'}")
    return network, parser


def _add_profile(builder, config, network, profiles: Profiles) -> None:
    """One optimisation profile over ``profiles``; every dynamic network input must have one."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = sorted(set(profiles) - set(inputs))
    if unknown:
        raise BackendError(f"profiles name inputs the network does not have: {', '.join(unknown)}")
    dynamic = sorted(name for name, shape in inputs.items() if any(d < 0 for d in shape) and name not in profiles)
    if dynamic:
        raise BackendError(f"dynamic inputs without a profile: {', '.join(dynamic)} (give dims NAME=min:opt:max)")
    if not profiles:
        return
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, tuple(int(d) for d in low), tuple(int(d) for d in opt), tuple(int(d) for d in high))
    if config.add_optimization_profile(profile) < 0:
        raise BackendError(f"TensorRT rejected the optimisation profile {_profiles_json(profiles)}")


def _set_timing_cache(config, path: Path | None):
    """Load the timing cache at ``path`` (a fresh one if absent or from another TensorRT/GPU)."""
    blob = path.read_bytes() if path and path.exists() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):
        log.info("timing cache %s does not match this TensorRT/GPU; starting a fresh one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def build_serialized(
    model_bytes: bytes,
    profiles: Profiles,
    *,
    model_path: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE,
    timing_cache: Path | None = None,
) -> bytes:
    """Parse and build one engine in memory; saves the timing cache back to ``timing_cache`` if given."""
    trt = import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, model_bytes, model_path)  # the parser owns the weights
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    _add_profile(builder, config, network, profiles)
    _set_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT could not build the engine: {_first(logger.errors) or 'no error given'}")
    if timing_cache:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _timing_cache_path(cache_dir: Path, tensorrt_version: str, gpu: str) -> Path:
    """One timing cache per TensorRT version and GPU, shared by every model built there."""
    tag = hashlib.sha256(f"{tensorrt_version}|{gpu}".encode()).hexdigest()[:16]
    return cache_dir / f"timing-{tag}.cache"


def _sidecar(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def _engine(
    model: str | Path | bytes,
    engine_path: Path | None,
    profiles: Profiles | None,
    *,
    cache_dir: Path | None,
    workspace_bytes: int,
    dims: Mapping[str, Sequence[int]] | None,
    device_id: int,
) -> tuple[dict, bytes]:
    """Build (or take from the cache) one engine; (info, serialized engine)."""
    trt = import_tensorrt()
    model_path = None if isinstance(model, bytes) else Path(model)
    model_bytes = model if isinstance(model, bytes) else model_path.read_bytes()
    profiles = input_profiles(model, dims) if profiles is None else profiles
    _, flag_names = network_flags(trt)
    options = {
        "profiles": _profiles_json(profiles),
        "workspace_bytes": int(workspace_bytes),
        "network_flags": flag_names,
        "builder_flags": [],  # precision is the graph's: no FP16/INT8/FP8 builder flags
    }
    info: dict[str, Any] = {
        "onnx": str(model_path) if model_path else None,
        "model_sha256": model_digest(model),
        "tensorrt_version": version_of(trt),
        "gpu_name": gpu_name(device_id),
        "build_options": options,
    }
    info["cache_key"] = cache_key(info["model_sha256"], info["tensorrt_version"], info["gpu_name"], options)
    cached = Path(cache_dir) / info["cache_key"] / ENGINE_FILE if cache_dir else None
    if cached is not None and cached.exists() and _sidecar(cached).exists():
        info.update(cached=True, build_seconds=0.0)
        plan = cached.read_bytes()
    else:
        timing = _timing_cache_path(Path(cache_dir), info["tensorrt_version"], info["gpu_name"]) if cache_dir else None
        started = time.perf_counter()
        plan = build_serialized(model_bytes, profiles, model_path=model_path, workspace_bytes=workspace_bytes,
                                timing_cache=timing)
        info.update(cached=False, build_seconds=round(time.perf_counter() - started, 3))
        if cached is not None:
            write_atomic(cached, plan)
            write_atomic(_sidecar(cached), json.dumps({**info, "engine_path": str(cached)}, indent=2).encode())
    info["engine_path"] = str(engine_path or cached) if (engine_path or cached) else None
    if engine_path:
        write_atomic(engine_path, plan)
        write_atomic(_sidecar(engine_path), json.dumps(info, indent=2).encode())
    return info, plan


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path | None = None,
    profiles: Profiles | None = None,
    cache_dir: str | Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE,
    *,
    dims: Mapping[str, Sequence[int]] | None = None,
    device_id: int = 0,
) -> dict:
    """Build a TensorRT engine from an ONNX file; returns the JSON written beside it.

    ``profiles``: {input: (min, opt, max) shapes}; if None they come from the model's input shapes
    and ``dims`` ({symbolic dim: (min, opt, max)}, see :func:`parse_profile`). With ``cache_dir``
    an engine with the same cache key is reused (``cached: true``) and the timing cache persists
    there. The engine and ``<engine>.json`` (build options, versions, cache key, GPU name) are
    written atomically; ``engine_path`` may be None when ``cache_dir`` is given (it stays in the cache).
    """
    if engine_path is None and cache_dir is None:
        raise BackendError("build_engine needs engine_path or cache_dir (somewhere to put the engine)")
    info, _ = _engine(Path(onnx_path), Path(engine_path) if engine_path else None, profiles,
                      cache_dir=Path(cache_dir) if cache_dir else None, workspace_bytes=workspace_bytes, dims=dims,
                      device_id=device_id)
    return info


# --- running -------------------------------------------------------------------------------------------------

class TensorRTRuntime:
    """A TensorRT engine run through an execution context with cuda-python device buffers.

    ``load`` takes an engine file (``.engine``/``.plan``/``.trt``), an ONNX path or ONNX bytes (built
    first: into ``cache_dir`` when given, else in memory). Options come from the constructor or
    ``RuntimeOptions.extra`` (``EXTRA_*`` keys, which win).
    """

    accepts_shared_weights = False

    def __init__(
        self,
        name: str = "tensorrt",
        *,
        cache_dir: str | Path | None = None,
        profiles: Profiles | None = None,
        dims: Mapping[str, Sequence[int]] | str | None = None,
        workspace_bytes: int = DEFAULT_WORKSPACE,
        device_id: int = 0,
    ) -> None:
        self.name = name
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.profiles = profiles
        self.dims = dims
        self.workspace_bytes = workspace_bytes
        self.device_id = device_id
        # what each load starts from: options in RuntimeOptions.extra apply to that load only
        self._defaults = dict(cache_dir=self.cache_dir, profiles=profiles, dims=dims, workspace_bytes=workspace_bytes,
                              device_id=device_id)
        self.build_info: dict | None = None
        self._trt = self._cudart = self._logger = self._runtime = self._engine = self._context = None
        self._stream = None
        self._inputs: dict[str, Any] = {}  # name -> numpy dtype
        self._outputs: dict[str, Any] = {}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def available(self) -> Availability:
        reason = self.missing()
        return Availability(reason is None, reason or "")

    def missing(self) -> str | None:
        """The one-line reason this runtime cannot run here, or None."""
        return tensorrt_missing() or gpu_timing.cudart_missing() or gpu_timing.nvidia_driver_missing()

    # loading ----------------------------------------------------------------------------------------------
    def _configure(self, options: RuntimeOptions) -> None:
        extra, defaults = options.extra, self._defaults
        self.cache_dir = Path(extra[EXTRA_CACHE_DIR]) if extra.get(EXTRA_CACHE_DIR) else defaults["cache_dir"]
        self.profiles = extra.get(EXTRA_PROFILES, defaults["profiles"])
        self.dims = extra.get(EXTRA_DIMS, defaults["dims"])
        self.workspace_bytes = int(extra.get(EXTRA_WORKSPACE, defaults["workspace_bytes"]))
        self.device_id = int(extra.get(EXTRA_DEVICE_ID, defaults["device_id"]))
        if isinstance(self.dims, str):
            try:
                self.dims = parse_profile(self.dims)
            except ValueError as exc:
                raise BackendError(str(exc)) from None

    def load(self, model: str | bytes | SharedWeightsModel, options: RuntimeOptions | None = None) -> None:
        if isinstance(model, SharedWeightsModel):
            raise BackendError(f"{self.name} cannot take shared weights; give a path or ONNX bytes")
        self._configure(options or RuntimeOptions())
        self.close()
        trt = import_tensorrt()
        cudart = gpu_timing.import_cudart()
        if cudart is None:
            raise BackendError(gpu_timing.cudart_missing() or "cuda-python is not importable")
        if isinstance(model, (str, Path)) and Path(model).suffix.lower() in ENGINE_SUFFIXES:
            plan = Path(model).read_bytes()
        else:
            source = model if isinstance(model, bytes) else Path(model)
            self.build_info, plan = _engine(source, None, self.profiles, cache_dir=self.cache_dir,
                                            workspace_bytes=self.workspace_bytes, dims=self.dims,
                                            device_id=self.device_id)
        self._trt, self._cudart = trt, cudart
        gpu_timing.check(cudart, cudart.cudaSetDevice(self.device_id), "cudaSetDevice")
        self._logger = _logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BackendError(f"TensorRT could not deserialize the engine: {_first(self._logger.errors)}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"TensorRT could not create an execution context: {_first(self._logger.errors)}")
        self._stream = gpu_timing.check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        for index in range(self._engine.num_io_tensors):
            tensor = self._engine.get_tensor_name(index)
            dtype = self._engine.get_tensor_dtype(tensor)
            kind = getattr(dtype, "name", str(dtype).rpartition(".")[2])
            if kind not in _NUMPY_TYPES:
                raise BackendError(f"engine tensor {tensor} has type {kind}, which numpy cannot hold")
            is_input = self._engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs)[tensor] = np.dtype(_NUMPY_TYPES[kind])

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    # buffers ----------------------------------------------------------------------------------------------
    def _malloc(self, nbytes: int) -> int:
        return int(gpu_timing.check(self._cudart, self._cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def _free(self, pointer: int) -> None:
        self._cudart.cudaFree(pointer)

    def _buffer(self, key: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` kept under ``key`` (regrown when too small)."""
        pointer, size = self._buffers.get(key, (0, -1))
        if size < nbytes:
            if size >= 0:
                self._free(pointer)
            pointer = self._malloc(nbytes)
            self._buffers[key] = (pointer, nbytes)
        return pointer

    def _require(self):
        if self._context is None:
            raise BackendError(f"{self.name}: call load() before run()")
        return self._context

    def _shape_inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checked, contiguous inputs with their shapes set on the context; output shapes resolved."""
        context = self._require()
        missing = [name for name in self._inputs if name not in feeds]
        if missing:
            raise BackendError(f"missing inputs: {', '.join(missing)}")
        arrays = {}
        for name, dtype in self._inputs.items():
            array = np.ascontiguousarray(feeds[name])
            if array.dtype != dtype:
                raise BackendError(f"input {name}: the engine takes {dtype}, got {array.dtype}")
            if not context.set_input_shape(name, tuple(array.shape)):
                raise BackendError(f"input {name}: shape {array.shape} is outside the engine's profile "
                                   f"{self._profile_of(name)}")
            arrays[name] = array
        unresolved = list(context.infer_shapes() or [])
        if unresolved:
            raise BackendError(f"TensorRT could not resolve the shapes of {', '.join(map(str, unresolved))}")
        return arrays

    def _profile_of(self, name: str) -> str:
        try:
            return str([tuple(s) for s in self._engine.get_tensor_profile_shape(name, 0)])
        except Exception:  # static input or an API without profiles
            return "(static)"

    def _output_shape(self, name: str) -> Shape:
        shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BackendError(f"output {name} has a data-dependent shape {shape}: not supported")
        return shape

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        cudart = self._cudart
        direction = getattr(cudart.cudaMemcpyKind, kind)
        gpu_timing.check(cudart, cudart.cudaMemcpyAsync(dst, src, nbytes, direction, self._stream), "cudaMemcpyAsync")

    def _execute(self) -> None:
        if not self._context.execute_async_v3(int(self._stream)):
            raise BackendError(f"TensorRT failed to run: {_first(self._logger.errors) or 'execute_async_v3 failed'}")

    def _sync(self) -> None:
        gpu_timing.check(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    # running ----------------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        arrays = self._shape_inputs(feeds)
        context = self._context
        for name, array in arrays.items():
            pointer = self._buffer(name, array.nbytes)
            self._copy(pointer, array.ctypes.data, array.nbytes, "cudaMemcpyHostToDevice")
            context.set_tensor_address(name, pointer)
        results = {}
        for name, dtype in self._outputs.items():
            results[name] = np.empty(self._output_shape(name), dtype=dtype)
            context.set_tensor_address(name, self._buffer(name, results[name].nbytes))
        self._execute()
        for name, array in results.items():
            self._copy(array.ctypes.data, self._buffers[name][0], array.nbytes, "cudaMemcpyDeviceToHost")
        self._sync()
        names = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in names if n not in results]
        if unknown:
            raise BackendError(f"unknown outputs: {', '.join(unknown)}")
        return {name: results[name] for name in names}

    def device_plan(self, feeds_list: Sequence[Mapping[str, np.ndarray]], *, cuda_graph: bool = False):
        """Steps for ``gpu_timing.time_device``: each feed set in its own device buffers, uploaded once.

        With ``cuda_graph`` each feed set's inference is captured once and replayed with cudaGraphLaunch
        (all feed sets must share shapes: a graph keeps the shapes it was captured with).
        """
        self._require()
        if cuda_graph:
            shapes = [{k: np.shape(v) for k, v in feeds.items()} for feeds in feeds_list]
            if any(s != shapes[0] for s in shapes):
                raise BackendError("CUDA-graph replay needs every feed set to have the same shapes")
        cudart, context = self._cudart, self._context
        owned: list[int] = []
        graphs: list[tuple[Any, Any]] = []
        steps = []

        def close() -> None:
            for graph, instance in graphs:
                cudart.cudaGraphExecDestroy(instance)
                cudart.cudaGraphDestroy(graph)
            for pointer in owned:
                self._free(pointer)

        def bind(arrays: dict[str, np.ndarray], addresses: dict[str, int]) -> None:
            for name, array in arrays.items():
                context.set_input_shape(name, tuple(array.shape))
            context.infer_shapes()
            for name, pointer in addresses.items():
                context.set_tensor_address(name, pointer)

        try:
            for feeds in feeds_list:
                arrays = self._shape_inputs(feeds)
                addresses = {}
                for name, array in arrays.items():
                    addresses[name] = self._malloc(array.nbytes)
                    owned.append(addresses[name])
                    self._copy(addresses[name], array.ctypes.data, array.nbytes, "cudaMemcpyHostToDevice")
                for name, dtype in self._outputs.items():
                    nbytes = int(np.prod(self._output_shape(name), dtype=np.int64)) * dtype.itemsize
                    addresses[name] = self._malloc(nbytes)
                    owned.append(addresses[name])
                self._sync()
                setup = lambda a=arrays, p=addresses: bind(a, p)  # noqa: E731
                if not cuda_graph:
                    steps.append(gpu_timing.DeviceStep(run=self._execute, setup=setup))
                    continue
                setup()
                self._execute()  # once before capture: TensorRT settles its state after a shape change
                self._sync()
                graphs.append(self._capture())
                instance = graphs[-1][1]
                steps.append(gpu_timing.DeviceStep(
                    run=lambda g=instance: gpu_timing.check(cudart, cudart.cudaGraphLaunch(g, self._stream),
                                                            "cudaGraphLaunch")))
        except BaseException:
            close()
            raise
        return gpu_timing.DevicePlan(steps, stream=self._stream, close=close)

    def _capture(self) -> tuple[Any, Any]:
        """Capture one ``execute_async_v3`` on the stream into an instantiated CUDA graph."""
        cudart = self._cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        gpu_timing.check(cudart, cudart.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        try:
            self._execute()
        finally:
            graph = gpu_timing.check(cudart, cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        instance = gpu_timing.check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        return graph, instance

    def close(self) -> None:
        if self._cudart is not None:
            for pointer, _ in self._buffers.values():
                self._free(pointer)
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
        self._buffers = {}
        self._stream = None
        self._context = self._engine = self._runtime = None
        self._inputs, self._outputs = {}, {}

    def __enter__(self) -> "TensorRTRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
