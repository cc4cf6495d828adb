"""A fake ``tensorrt`` for tests: the calls qcompile makes, with their arguments asserted.

The flavour comes from ``FAKE_TENSORRT_FLAVOUR`` at import ("8", "10" or "11"): ``__version__``, whether
``NetworkDefinitionCreationFlag`` has EXPLICIT_BATCH (gone in 11) or STRONGLY_TYPED (from 9), and
whether ``BuilderFlag`` still has the precision flags (gone in 11). Setting any precision flag fails
in every flavour: qcompile keeps precision in the graph.

The "engine" is the ONNX model itself plus the profile; executing it runs onnxruntime on the CPU over
the fake device memory of ``cuda.bindings.runtime``. ``RECORD`` is what tests inspect.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FLAVOUR = os.environ.get("FAKE_TENSORRT_FLAVOUR", "11")
__version__ = {"8": "8.6.1.6", "10": "10.13.0.35", "11": "11.4.0.7"}[FLAVOUR]
_MAJOR = int(__version__.split(".")[0])
_PLAN_MAGIC = b"FAKEPLAN\n"
_CACHE_MAGIC = "FAKETC"


@dataclass
class Record:
    network_flags: list[int] = field(default_factory=list)
    profiles: list[dict] = field(default_factory=list)  # one {name: (min, opt, max)} per built profile
    workspace: list[int] = field(default_factory=list)
    builds: int = 0
    timing_cache_loaded: list[int] = field(default_factory=list)  # entries in each cache set on a config
    executions: list[dict] = field(default_factory=list)  # input addresses of each execution


RECORD = Record()


def reset() -> None:
    global RECORD
    RECORD = Record()


# --- enums ---------------------------------------------------------------------------------------------------

_creation = {"STRONGLY_TYPED": 1} if _MAJOR >= 9 else {}
if _MAJOR < 11:
    _creation = {"EXPLICIT_BATCH": 0, **_creation}
NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", _creation)

PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                   "PREFER_PRECISION_CONSTRAINTS", "STRICT_TYPES")
_builder = ["TF32", "SPARSE_WEIGHTS", "REFIT"] + (list(PRECISION_FLAGS) if _MAJOR < 11 else [])
BuilderFlag = enum.IntEnum("BuilderFlag", {name: i for i, name in enumerate(_builder)})


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8
    BF16 = 7


_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
              2: DataType.UINT8, 7: DataType.INT64, 16: DataType.BF16}
_TO_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
             DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        self._initialised = True  # a pybind11 trampoline: subclasses must call ILogger.__init__

    def log(self, severity, msg) -> None:
        raise NotImplementedError


def _check_logger(logger: Any) -> None:
    assert isinstance(logger, ILogger) and getattr(logger, "_initialised", False), "logger: an initialised ILogger"


class HostMemory:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def __bytes__(self) -> bytes:
        return self._data


# --- network and parser --------------------------------------------------------------------------------------

@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: DataType


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.model: bytes | None = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> Tensor:
        return self.inputs[index]

    def get_output(self, index: int) -> Tensor:
        return self.outputs[index]


class ParserError:
    def __init__(self, text: str) -> None:
        self._text = text

    def desc(self) -> str:
        return self._text

    def __str__(self) -> str:
        return f"In node -1 (parse): {self._text}"


def _tensor(value) -> Tensor:
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
    return Tensor(value.name, dims, _FROM_ONNX[value.type.tensor_type.elem_type])


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        assert isinstance(network, INetworkDefinition)
        _check_logger(logger)
        self._network = network
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def parse(self, model, path: str | None = None) -> bool:
        import onnx

        assert isinstance(model, (bytes, bytearray, memoryview)), f"parse takes the serialized model: {type(model)}"
        assert path is None or isinstance(path, str)
        try:
            proto = onnx.load_from_string(bytes(model))
            onnx.checker.check_model(proto)
        except Exception as exc:
            self._errors.append(ParserError(f"ModelImporter: failed to parse the ONNX model ({type(exc).__name__})"))
            return False
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        if external and path is None:
            self._errors.append(ParserError("external weights need the model path"))
            return False
        weights = {t.name for t in proto.graph.initializer}
        self._network.inputs = [_tensor(v) for v in proto.graph.input if v.name not in weights]
        self._network.outputs = [_tensor(v) for v in proto.graph.output]
        self._network.model = bytes(model)
        return True


# --- builder -------------------------------------------------------------------------------------------------

class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, min, opt, max) -> None:  # noqa: A002 - TensorRT's parameter names
        shapes = (min, opt, max)
        assert isinstance(name, str)
        assert all(isinstance(s, tuple) and all(type(d) is int for d in s) for s in shapes), f"int tuples: {shapes}"
        assert len({len(s) for s in shapes}) == 1, f"profile ranks differ for {name}: {shapes}"
        assert all(a <= b <= c for a, b, c in zip(*shapes)), f"need min <= opt <= max for {name}: {shapes}"
        self.shapes[name] = shapes


class ITimingCache:
    def __init__(self, entries: int, foreign: bool) -> None:
        self.entries = entries
        self.foreign = foreign

    def serialize(self) -> HostMemory:
        return HostMemory(f"{_CACHE_MAGIC}|{__version__}|{self.entries}".encode())


class IBuilderConfig:
    def __init__(self) -> None:
        self.workspace: int | None = None
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        self._flags = 0

    @property
    def flags(self) -> int:
        return self._flags

    @flags.setter
    def flags(self, value: int) -> None:
        for name in PRECISION_FLAGS:
            if hasattr(BuilderFlag, name):
                assert not value & (1 << int(getattr(BuilderFlag, name))), f"precision flag {name} set"
        self._flags = value

    def set_flag(self, flag) -> None:
        assert flag.name not in PRECISION_FLAGS, f"precision flag {flag.name} set: precision belongs in the graph"
        self._flags |= 1 << int(flag)

    def set_memory_pool_limit(self, pool, size) -> None:
        assert pool is MemoryPoolType.WORKSPACE, f"only the workspace pool is expected: {pool!r}"
        assert type(size) is int and size > 0, f"workspace must be a positive int: {size!r}"
        self.workspace = size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        assert isinstance(profile, IOptimizationProfile) and profile.shapes
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob) -> ITimingCache:
        assert isinstance(blob, (bytes, bytearray)), f"create_timing_cache takes bytes: {type(blob)}"
        if not blob:
            return ITimingCache(0, False)
        magic, version, entries = bytes(blob).decode().split("|")
        assert magic == _CACHE_MAGIC
        return ITimingCache(int(entries), version != __version__)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        assert isinstance(cache, ITimingCache) and ignore_mismatch is False
        if cache.foreign:
            return False
        self.timing_cache = cache
        RECORD.timing_cache_loaded.append(cache.entries)
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


class Builder:
    def __init__(self, logger: ILogger) -> None:
        _check_logger(logger)
        self._logger = logger

    def create_network(self, flags: int) -> INetworkDefinition:
        assert type(flags) is int, f"flags must be an int bitmask: {flags!r}"
        known = sum(1 << int(member) for member in NetworkDefinitionCreationFlag)
        assert not flags & ~known, f"unknown network flag bits {flags:#x}"
        if hasattr(NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            assert flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)), "STRONGLY_TYPED not requested"
        if hasattr(NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            explicit = bool(flags & (1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)))
            assert explicit == (_MAJOR < 10), "EXPLICIT_BATCH is needed before 10 and deprecated from 10"
        RECORD.network_flags.append(flags)
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> HostMemory | None:
        assert network.model is not None, "build before a successful parse"
        assert config.workspace is not None, "the workspace limit was not set"
        assert len(config.profiles) <= 1
        shapes = config.profiles[0].shapes if config.profiles else {}
        for tensor in network.inputs:
            if tensor.name not in shapes:
                if any(d < 0 for d in tensor.shape):
                    self._logger.log(ILogger.Severity.ERROR, f"dynamic input {tensor.name} has no profile")
                    return None
                continue
            for shape in shapes[tensor.name]:
                if len(shape) != len(tensor.shape) or any(s >= 0 and s != d for s, d in zip(tensor.shape, shape)):
                    self._logger.log(ILogger.Severity.ERROR, f"profile {shape} does not fit {tensor.name}")
                    return None
        unknown = set(shapes) - {t.name for t in network.inputs}
        assert not unknown, f"profile for non-inputs {unknown}"
        if config.timing_cache is not None:
            config.timing_cache.entries += 1  # new tactics timed
        RECORD.builds += 1
        RECORD.profiles.append(dict(shapes))
        RECORD.workspace.append(config.workspace)
        header = {
            "version": __version__,
            "inputs": [[t.name, list(t.shape), int(t.dtype)] for t in network.inputs],
            "outputs": [[t.name, list(t.shape), int(t.dtype)] for t in network.outputs],
            "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
        }
        return HostMemory(_PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network.model)


# --- runtime -------------------------------------------------------------------------------------------------

class Runtime:
    def __init__(self, logger: ILogger) -> None:
        _check_logger(logger)
        self._logger = logger

    def deserialize_cuda_engine(self, blob) -> ICudaEngine | None:
        assert isinstance(blob, (bytes, bytearray, memoryview)), f"deserialize takes bytes: {type(blob)}"
        blob = bytes(blob)
        if not blob.startswith(_PLAN_MAGIC):
            self._logger.log(ILogger.Severity.ERROR, "not an engine plan")
            return None
        header, _, model = blob[len(_PLAN_MAGIC):].partition(b"\n")
        meta = json.loads(header)
        if meta["version"] != __version__:
            self._logger.log(ILogger.Severity.ERROR, f"engine built by TensorRT {meta['version']}")
            return None
        return ICudaEngine(meta, model)


class ICudaEngine:
    def __init__(self, meta: dict, model: bytes) -> None:
        self.meta = meta
        self.model = model
        self.tensors = {
            name: (mode, tuple(shape), DataType(dtype))
            for mode, key in ((TensorIOMode.INPUT, "inputs"), (TensorIOMode.OUTPUT, "outputs"))
            for name, shape, dtype in meta[key]
        }

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.tensors[name][0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.tensors[name][2]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        assert profile_index == 0
        return [tuple(s) for s in self.meta["profile"][name]]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        import onnxruntime

        self._engine = engine
        self._session = onnxruntime.InferenceSession(engine.model, providers=["CPUExecutionProvider"])
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._output_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}

    def _inputs(self) -> dict[str, tuple]:
        return {n: v for n, v in self._engine.tensors.items() if v[0] == TensorIOMode.INPUT}

    def set_input_shape(self, name: str, shape) -> bool:
        assert name in self._inputs(), f"{name} is not an engine input"
        assert isinstance(shape, tuple) and all(type(d) is int for d in shape), f"shape must be int tuple: {shape!r}"
        profile = self._engine.meta["profile"].get(name)
        static = self._engine.tensors[name][1]
        if profile:
            low, _, high = profile
            if len(shape) != len(low) or not all(a <= d <= b for a, d, b in zip(low, shape, high)):
                return False
        elif shape != static:
            return False
        self._shapes[name] = shape
        return True

    def _key(self) -> tuple:
        return tuple(sorted(self._shapes.items()))

    def infer_shapes(self) -> list[str]:
        unset = [n for n, (_, shape, _) in self._inputs().items() if n not in self._shapes and -1 in shape]
        if unset:
            return unset
        if self._key() not in self._output_shapes:  # run once on zeros to learn the output shapes
            feeds = {n: np.zeros(self._shapes.get(n, shape), _TO_NUMPY[dtype])
                     for n, (_, shape, dtype) in self._inputs().items()}
            names = [o.name for o in self._session.get_outputs()]
            self._output_shapes[self._key()] = dict(zip(names, (r.shape for r in self._session.run(names, feeds))))
        return []

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        mode, shape, _ = self._engine.tensors[name]
        if mode == TensorIOMode.INPUT:
            return self._shapes.get(name, shape)
        assert self._key() in self._output_shapes, "output shape asked before infer_shapes()"
        return tuple(self._output_shapes[self._key()][name])

    def set_tensor_address(self, name: str, pointer) -> bool:
        assert name in self._engine.tensors, f"{name} is not an engine tensor"
        assert type(pointer) is int and pointer, f"address must be a non-null int: {pointer!r}"
        self._addresses[name] = pointer
        return True

    def execute_async_v3(self, stream_handle) -> bool:
        from cuda.bindings import runtime as cudart

        assert type(stream_handle) is int, f"stream_handle must be an int: {stream_handle!r}"
        assert set(self._addresses) == set(self._engine.tensors), "every I/O tensor needs an address"
        assert self.infer_shapes() == []
        inputs = {n: (self._addresses[n], self.get_tensor_shape(n), _TO_NUMPY[v[2]]) for n, v in self._inputs().items()}
        outputs = {n: self._addresses[n] for n, v in self._engine.tensors.items() if v[0] == TensorIOMode.OUTPUT}
        session = self._session

        def work() -> None:  # addresses and shapes are fixed at enqueue time, as in a captured graph
            RECORD.executions.append({n: a for n, (a, _, _) in inputs.items()})
            feeds = {n: cudart.read(a, s, t) for n, (a, s, t) in inputs.items()}
            names = list(outputs)
            for name, array in zip(names, session.run(names, feeds)):
                cudart.write(outputs[name], array)

        cudart.enqueue(stream_handle, work)
        return True
