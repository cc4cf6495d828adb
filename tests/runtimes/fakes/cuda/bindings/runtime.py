"""A fake ``cuda.bindings.runtime`` for tests: host memory plays device memory, and calls are checked.

Only the calls qcompile makes exist. Each returns cuda-python's ``(err, *values)`` tuples and asserts
its arguments: device pointers must lie inside a live allocation, host pointers outside every one,
copy directions must match, streams must be live. Work enqueued by the fake TensorRT (``enqueue``)
runs at once and advances a fake device clock, or is recorded while a stream is being captured;
events read that clock. ``STATE`` is what tests inspect (live allocations, graph launches...).
"""

from __future__ import annotations

import ctypes
import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class _Handle:
    """cuda-python handles convert to their address with int()."""

    def __init__(self, value: int) -> None:
        self._value = value

    def __int__(self) -> int:
        return self._value

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._value}>"


class cudaStream_t(_Handle):  # noqa: N801
    pass


class cudaEvent_t(_Handle):  # noqa: N801
    pass


class cudaGraph_t(_Handle):  # noqa: N801
    pass


class cudaGraphExec_t(_Handle):  # noqa: N801
    pass


@dataclass
class cudaDeviceProp:  # noqa: N801
    name: bytes = b"Fake GPU" + b"\0" * 8
    major: int = 9
    minor: int = 0


@dataclass
class State:
    allocations: dict[int, np.ndarray] = field(default_factory=dict)
    streams: dict[int, list | None] = field(default_factory=dict)  # handle -> capture list (None: not capturing)
    events: dict[int, float | None] = field(default_factory=dict)  # handle -> recorded clock (ms)
    graphs: dict[int, list] = field(default_factory=dict)
    execs: dict[int, list] = field(default_factory=dict)
    clock_ms: float = 0.0
    graph_launches: int = 0
    copies: list[tuple[str, int]] = field(default_factory=list)  # (direction, bytes)
    device: int | None = None


STATE = State()
_ids = itertools.count(1000)
OK = cudaError_t.cudaSuccess


def reset() -> None:
    global STATE
    STATE = State()


def _span(pointer: int, nbytes: int) -> np.ndarray:
    """The bytes [pointer, pointer + nbytes) of one live allocation (AssertionError otherwise)."""
    assert isinstance(pointer, int) and not isinstance(pointer, bool), f"device pointer must be an int: {pointer!r}"
    for base, buffer in STATE.allocations.items():
        if base <= pointer and pointer + nbytes <= base + buffer.nbytes:
            return buffer[pointer - base : pointer - base + nbytes]
    raise AssertionError(f"{pointer:#x}+{nbytes} is not inside a live device allocation")


def _is_device(pointer: int) -> bool:
    return any(base <= pointer < base + buffer.nbytes for base, buffer in STATE.allocations.items())


def _stream(stream: Any) -> int:
    handle = int(stream)
    assert handle == 0 or handle in STATE.streams, f"unknown stream {stream!r}"
    return handle


def read(pointer: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Device memory as an array (what a kernel reads)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return np.frombuffer(_span(pointer, nbytes).tobytes(), dtype=dtype).reshape(shape)


def write(pointer: int, array: np.ndarray) -> None:
    """Store an array into device memory (what a kernel writes)."""
    data = np.ascontiguousarray(array).view(np.uint8).ravel()
    _span(pointer, data.nbytes)[:] = data


def enqueue(stream: int, work: Callable[[], None], duration_ms: float = 1.0) -> None:
    """Run ``work`` on ``stream`` now (advancing the clock), or record it while the stream is captured."""
    handle = _stream(stream)
    capture = STATE.streams.get(handle)
    if capture is not None:
        capture.append((work, duration_ms))
        return
    work()
    STATE.clock_ms += duration_ms


def cudaSetDevice(device: int):  # noqa: N802
    assert device == 0, "the fake has one device"
    STATE.device = device
    return (OK,)


def cudaGetDeviceProperties(device: int):  # noqa: N802
    assert device == 0
    return OK, cudaDeviceProp()


def cudaMalloc(size: int):  # noqa: N802
    assert isinstance(size, int) and size > 0, f"cudaMalloc size must be a positive int: {size!r}"
    buffer = np.zeros(size, dtype=np.uint8)
    STATE.allocations[buffer.ctypes.data] = buffer
    return OK, buffer.ctypes.data


def cudaFree(pointer: int):  # noqa: N802
    assert pointer in STATE.allocations, f"cudaFree of {pointer!r}: not an allocation base"
    del STATE.allocations[pointer]
    return (OK,)


def _copy(dst: int, src: int, count: int, kind: cudaMemcpyKind) -> None:
    assert isinstance(kind, cudaMemcpyKind), f"kind must be a cudaMemcpyKind: {kind!r}"
    assert isinstance(count, int) and count > 0
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
        _span(dst, count)
        assert not _is_device(src), "HostToDevice copy from a device pointer"
    elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
        _span(src, count)
        assert not _is_device(dst), "DeviceToHost copy into a device pointer"
    else:
        raise AssertionError(f"qcompile copies only host<->device, not {kind.name}")
    ctypes.memmove(dst, src, count)
    STATE.copies.append((kind.name, count))


def cudaMemcpyAsync(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any):  # noqa: N802
    handle = _stream(stream)
    assert STATE.streams.get(handle) is None, "copies during graph capture are not expected"
    _copy(dst, src, count, kind)
    return (OK,)


def cudaMemcpy(dst: int, src: int, count: int, kind: cudaMemcpyKind):  # noqa: N802
    _copy(dst, src, count, kind)
    return (OK,)


def cudaStreamCreate():  # noqa: N802
    handle = next(_ids)
    STATE.streams[handle] = None
    return OK, cudaStream_t(handle)


def cudaStreamDestroy(stream: Any):  # noqa: N802
    handle = _stream(stream)
    assert handle != 0
    del STATE.streams[handle]
    return (OK,)


def cudaStreamSynchronize(stream: Any):  # noqa: N802
    assert STATE.streams.get(_stream(stream)) is None, "synchronize during capture"
    return (OK,)


def cudaEventCreate():  # noqa: N802
    handle = next(_ids)
    STATE.events[handle] = None
    return OK, cudaEvent_t(handle)


def cudaEventRecord(event: Any, stream: Any):  # noqa: N802
    assert isinstance(event, cudaEvent_t) and int(event) in STATE.events
    _stream(stream)
    STATE.events[int(event)] = STATE.clock_ms
    return (OK,)


def cudaEventSynchronize(event: Any):  # noqa: N802
    assert STATE.events.get(int(event)) is not None, "synchronize on an event never recorded"
    return (OK,)


def cudaEventElapsedTime(start: Any, end: Any):  # noqa: N802
    begin, finish = STATE.events[int(start)], STATE.events[int(end)]
    assert begin is not None and finish is not None
    return OK, finish - begin


def cudaEventDestroy(event: Any):  # noqa: N802
    del STATE.events[int(event)]
    return (OK,)


def cudaStreamBeginCapture(stream: Any, mode: cudaStreamCaptureMode):  # noqa: N802
    assert isinstance(mode, cudaStreamCaptureMode)
    handle = _stream(stream)
    assert handle != 0 and STATE.streams[handle] is None, "capture on the legacy stream or twice"
    STATE.streams[handle] = []
    return (OK,)


def cudaStreamEndCapture(stream: Any):  # noqa: N802
    handle = _stream(stream)
    ops = STATE.streams[handle]
    assert ops is not None, "end capture without begin"
    STATE.streams[handle] = None
    graph = next(_ids)
    STATE.graphs[graph] = ops
    return OK, cudaGraph_t(graph)


def cudaGraphInstantiate(graph: Any, flags: int):  # noqa: N802
    assert isinstance(graph, cudaGraph_t) and flags == 0
    instance = next(_ids)
    STATE.execs[instance] = list(STATE.graphs[int(graph)])
    return OK, cudaGraphExec_t(instance)


def cudaGraphLaunch(instance: Any, stream: Any):  # noqa: N802
    assert isinstance(instance, cudaGraphExec_t)
    _stream(stream)
    for work, duration in STATE.execs[int(instance)]:
        work()
        STATE.clock_ms += duration
    STATE.graph_launches += 1
    return (OK,)


def cudaGraphExecDestroy(instance: Any):  # noqa: N802
    del STATE.execs[int(instance)]
    return (OK,)


def cudaGraphDestroy(graph: Any):  # noqa: N802
    del STATE.graphs[int(graph)]
    return (OK,)
