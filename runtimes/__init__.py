"""Runtime backends and the timing harness. Imports nothing from the rest of qcompile."""

from __future__ import annotations

from typing import Callable

from qcompile.runtimes.base import Availability, BackendError, Runtime, RuntimeOptions, SharedWeightsModel
from qcompile.runtimes.ort import OrtRuntime
from qcompile.runtimes.timing import TimingResult, time_side_by_side

_FACTORIES: dict[str, Callable[[], Runtime]] = {
    "ort-cpu": lambda: OrtRuntime("ort-cpu", "CPUExecutionProvider"),
    "ort-cuda": lambda: OrtRuntime("ort-cuda", "CUDAExecutionProvider"),
}


def runtime_names() -> list[str]:
    """Names of every runtime qcompile knows (available here or not)."""
    return sorted(_FACTORIES)


def get_runtime(name: str) -> Runtime:
    """A fresh, unloaded runtime by name; KeyError lists the known names."""
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise KeyError(f"unknown runtime {name!r}; known: {', '.join(runtime_names())}") from None


__all__ = [
    "Availability",
    "OrtRuntime",
    "Runtime",
    "BackendError",
    "RuntimeOptions",
    "SharedWeightsModel",
    "TimingResult",
    "get_runtime",
    "runtime_names",
    "time_side_by_side",
]
