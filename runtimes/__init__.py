"""Runtime backends and the timing harnesses. Imports nothing from the rest of qcompile.

GPU backends (``ort-cuda``, ``ort-trt``, ``ort-migraphx``, ``tensorrt``, ``migraphx``) import their
libraries lazily; ``missing(name)`` says in one line why one cannot run here.
"""

from __future__ import annotations

from typing import Callable

from qcompile.runtimes.base import Availability, BackendError, Runtime, RuntimeOptions, SharedWeightsModel
from qcompile.runtimes.gpu_timing import time_device
from qcompile.runtimes.migraphx import MigraphxRuntime
from qcompile.runtimes.ort import (
    OrtCudaRuntime,
    OrtGpuRuntime,
    OrtMigraphxRuntime,
    OrtRuntime,
    OrtTensorrtRuntime,
)
from qcompile.runtimes.tensorrt import TensorRTRuntime, build_engine, input_profiles, parse_profile
from qcompile.runtimes.timing import TimingResult, time_side_by_side

_FACTORIES: dict[str, Callable[[], Runtime]] = {
    "ort-cpu": lambda: OrtRuntime("ort-cpu", "CPUExecutionProvider"),
    "ort-cuda": OrtCudaRuntime,
    "ort-trt": OrtTensorrtRuntime,
    "ort-migraphx": OrtMigraphxRuntime,
    "tensorrt": TensorRTRuntime,
    "migraphx": MigraphxRuntime,
}

#: Runtimes that need a GPU (the rest run on any machine).
GPU_RUNTIMES = ("ort-cuda", "ort-trt", "ort-migraphx", "tensorrt", "migraphx")


def runtime_names() -> list[str]:
    """Names of every runtime qcompile knows (available here or not)."""
    return sorted(_FACTORIES)


def get_runtime(name: str) -> Runtime:
    """A fresh, unloaded runtime by name; KeyError lists the known names."""
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise KeyError(f"unknown runtime {name!r}; known: {', '.join(runtime_names())}") from None


def missing(name: str) -> str | None:
    """The one-line reason runtime ``name`` is unavailable here, or None when it can run (KeyError if unknown)."""
    availability = get_runtime(name).available()
    return None if availability else (availability.reason or f"{name} is not available")


__all__ = [
    "Availability",
    "BackendError",
    "GPU_RUNTIMES",
    "MigraphxRuntime",
    "OrtCudaRuntime",
    "OrtGpuRuntime",
    "OrtMigraphxRuntime",
    "OrtRuntime",
    "OrtTensorrtRuntime",
    "Runtime",
    "RuntimeOptions",
    "SharedWeightsModel",
    "TensorRTRuntime",
    "TimingResult",
    "build_engine",
    "get_runtime",
    "input_profiles",
    "missing",
    "parse_profile",
    "runtime_names",
    "time_device",
    "time_side_by_side",
]
