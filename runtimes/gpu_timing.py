"""GPU device probes and a device-side timing harness (CUDA events, rotating inputs, optional CUDA graphs).

Host wall clocks time copies, launches and syncs along with the kernels; CUDA events time the device's
own timeline between two points on a stream. ``time_device`` warms up, then runs each candidate ``runs``
times, cycling through several feed sets already on the device (so no run reads inputs another left in
cache), and returns the same :class:`TimingResult` as the host harness (statistics from ``summarize``).

The probes (``nvidia_driver_missing``, ``rocm_missing``) only look at files: no driver is initialised.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from qcompile.runtimes.base import BackendError
from qcompile.runtimes.timing import TimingResult, summarize

Feeds = Mapping[str, np.ndarray]

#: Folders searched for driver libraries besides LD_LIBRARY_PATH and the loader cache.
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/nvidia/lib64",
    "/usr/local/cuda/lib64",
    "/usr/lib/wsl/lib",
)


def find_library(filename: str, dirs: Sequence[str] = LIBRARY_DIRS, ld_cache: str = "/etc/ld.so.cache") -> bool:
    """Whether ``filename`` (e.g. ``libcuda.so.1``) is loadable by name: LD_LIBRARY_PATH, ``dirs``, ld.so.cache."""
    folders = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d] + list(dirs)
    if any(Path(folder, filename).exists() for folder in folders):
        return True
    try:
        return filename.encode() in Path(ld_cache).read_bytes()
    except OSError:
        return False


def nvidia_driver_missing(
    dev: str = "/dev", dirs: Sequence[str] = LIBRARY_DIRS, ld_cache: str = "/etc/ld.so.cache"
) -> str | None:
    """Why no NVIDIA GPU can be used here (one line), or None: needs a device node and libcuda.so.1."""
    nodes = [Path(dev, name) for name in ("nvidia0", "nvidiactl", "dxg")]  # dxg: WSL's GPU
    if not any(node.exists() for node in nodes) and shutil.which("nvidia-smi") is None:
        return f"no NVIDIA GPU driver here ({dev}/nvidia0 is absent and nvidia-smi is not on PATH)"
    if not find_library("libcuda.so.1", dirs, ld_cache):
        return "the NVIDIA driver library libcuda.so.1 is not found (LD_LIBRARY_PATH, ld.so.cache)"
    return None


def rocm_missing(dev: str = "/dev") -> str | None:
    """Why no AMD GPU can be used here (one line), or None: ROCm needs /dev/kfd."""
    if not Path(dev, "kfd").exists():
        return f"no AMD GPU driver here ({dev}/kfd is absent: the ROCm kernel driver is not loaded)"
    return None


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6); None if absent."""
    try:
        from cuda.bindings import runtime as cudart

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python < 12.6

        return cudart
    except ImportError:
        return None


def cudart_missing() -> str | None:
    """Why cuda-python cannot be imported (one line), or None; finds the module without importing it."""
    import importlib.util

    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            if importlib.util.find_spec(name) is not None:
                return None
        except (ImportError, ValueError):  # parent package "cuda" absent, or a broken namespace
            continue
    return "cuda-python is not installed (pip install cuda-python): needed for device buffers and CUDA events"


def check(cudart, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; raise BackendError naming ``what`` on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        detail = getattr(err, "name", str(err))
        raise BackendError(f"{what} failed: {detail}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class EventClock(Protocol):
    """Marks points on a device stream and measures the device time between two of them."""

    def mark(self) -> Any:
        """Record an event on the stream now; returns its handle."""
        ...

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks; waits for ``end`` to complete."""
        ...

    def release(self, *events: Any) -> None: ...

    def close(self) -> None: ...


class CudaEventClock:
    """CUDA events through cuda-python, recorded on ``stream`` (0: the legacy default stream)."""

    def __init__(self, stream: Any = 0, cudart=None) -> None:
        self._cudart = cudart or import_cudart()
        if self._cudart is None:
            raise BackendError(cudart_missing() or "cuda-python is not importable")
        self._stream = stream

    def mark(self) -> Any:
        cudart = self._cudart
        event = check(cudart, cudart.cudaEventCreate(), "cudaEventCreate")
        check(cudart, cudart.cudaEventRecord(event, self._stream), "cudaEventRecord")
        return event

    def elapsed_ms(self, start: Any, end: Any) -> float:
        cudart = self._cudart
        check(cudart, cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
        return float(check(cudart, cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def release(self, *events: Any) -> None:
        for event in events:
            self._cudart.cudaEventDestroy(event)

    def close(self) -> None:
        pass


class TorchEventClock:
    """``torch.cuda.Event`` timing, for machines with a CUDA build of torch and no cuda-python."""

    def __init__(self, stream: Any = None) -> None:
        import torch

        if not torch.cuda.is_available():
            raise BackendError("torch has no usable CUDA device here")
        self._torch = torch
        if stream is None or isinstance(stream, torch.cuda.Stream):
            self._stream = stream or torch.cuda.current_stream()
        else:
            self._stream = torch.cuda.ExternalStream(int(stream))

    def mark(self) -> Any:
        event = self._torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        return event

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))

    def release(self, *events: Any) -> None:
        pass

    def close(self) -> None:
        pass


def torch_present() -> bool:
    """Whether torch is installed (found, not imported); whether it has CUDA is known only on use."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def default_clock(stream: Any = 0) -> EventClock:
    """cuda-python events where cuda-python is installed, else torch.cuda events; BackendError if neither."""
    if cudart_missing() is None:
        return CudaEventClock(stream)
    if torch_present():
        return TorchEventClock(None if stream in (0, None) else stream)
    raise BackendError("no CUDA event source: install cuda-python (or a CUDA build of torch)")


@dataclass(frozen=True)
class DeviceStep:
    """One timed inference on inputs already on the device.

    ``run`` enqueues the work on the timed stream (returning before it completes is fine);
    ``setup`` runs untimed before each ``run`` (rebinding shapes, refilling graph-bound buffers).
    """

    run: Callable[[], Any]
    setup: Callable[[], Any] | None = None


@dataclass
class DevicePlan:
    """What a runtime hands the harness: the steps (one per feed set), their stream, and a cleanup."""

    steps: list[DeviceStep]
    stream: Any = 0
    close: Callable[[], None] | None = None


def host_plan(fn: Callable[[Feeds], Any], feeds_list: Sequence[Feeds]) -> DevicePlan:
    """Steps that call ``fn(feeds)`` for a plain callable (it must enqueue its own device work)."""
    return DevicePlan([DeviceStep(run=lambda feeds=feeds: fn(feeds)) for feeds in feeds_list])


def plan_for(target: Any, feeds_list: Sequence[Feeds], cuda_graph: bool) -> DevicePlan:
    """A runtime's ``device_plan`` (device inputs, CUDA graphs) or a plain callable's host plan."""
    if hasattr(target, "device_plan"):
        return target.device_plan(feeds_list, cuda_graph=cuda_graph)
    if cuda_graph:
        raise BackendError("CUDA-graph replay needs a runtime with device_plan(); a plain callable cannot")
    if callable(target):
        return host_plan(target, feeds_list)
    raise BackendError(f"cannot time {type(target).__name__}: give a runtime with device_plan() or a callable")


def measure(plan: DevicePlan, clock: EventClock, *, runs: int, warmup: int) -> list[float]:
    """Per-run device times in seconds: ``warmup`` untimed runs, then ``runs`` timed ones, feed sets cycled."""
    if not plan.steps:
        raise ValueError("no feed sets to time")
    steps = plan.steps
    for index in range(warmup):
        step = steps[index % len(steps)]
        if step.setup:
            step.setup()
        step.run()
    samples = []
    for index in range(runs):
        step = steps[(warmup + index) % len(steps)]
        if step.setup:
            step.setup()
        start = clock.mark()
        step.run()
        end = clock.mark()
        samples.append(clock.elapsed_ms(start, end) / 1e3)
        clock.release(start, end)
    return samples


def time_device(
    fns_or_runtime: Any,
    feeds_list: Sequence[Feeds],
    runs: int = 100,
    warmup: int = 10,
    *,
    cuda_graph: bool = False,
    items_per_run: int = 1,
    clock: Callable[[Any], EventClock] | None = None,
) -> dict[str, TimingResult]:
    """Device-time runtimes or callables on rotating feed sets; {name: TimingResult} in milliseconds.

    ``fns_or_runtime``: a runtime (its ``name`` keys the result), or a mapping name -> runtime or
    callable taking one feed dict. A runtime with ``device_plan`` uploads every feed set once and
    times inference alone; a callable is timed as it is (its own copies included). ``cuda_graph``
    replays captured CUDA graphs where the runtime supports it (BackendError otherwise). ``clock``
    builds an :class:`EventClock` for a stream (default: cuda-python events, else torch.cuda events).
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    if not feeds_list:
        raise ValueError("time_device needs at least one feed set")
    if isinstance(fns_or_runtime, Mapping):
        targets = dict(fns_or_runtime)
    else:
        targets = {getattr(fns_or_runtime, "name", "candidate"): fns_or_runtime}
    make_clock = clock or default_clock
    results = {}
    for name, target in targets.items():
        plan = plan_for(target, feeds_list, cuda_graph)
        event_clock = make_clock(plan.stream)
        try:
            samples = measure(plan, event_clock, runs=runs, warmup=warmup)
        finally:
            event_clock.close()
            if plan.close:
                plan.close()
        results[name] = summarize(name, samples, warmup, items_per_run)
    return results
