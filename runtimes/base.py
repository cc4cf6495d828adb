"""The runtime protocol every backend implements.

A runtime is cheap to construct; ``load`` does the heavy work (session creation, engine build).
``available()`` answers without side effects and says why not. Optional backends import their
libraries lazily so a missing one costs nothing until it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np


class BackendError(Exception):
    """A backend failed to load or run a model (wrapped into a QCompileError by the core)."""


@dataclass(frozen=True)
class SharedWeightsModel:
    """An ONNX model whose large initializers are the caller's arrays, used in place, never copied.

    In ``proto`` those initializers are external references to ``placeholder``, the name of an empty
    file: a runtime that reads them from there instead of taking ``weights`` fails loudly rather
    than computing with wrong data. The arrays must outlive the loaded session.
    """

    proto: bytes
    weights: Mapping[str, np.ndarray]
    placeholder: str


@dataclass(frozen=True)
class Availability:
    """Whether a runtime can be used here; ``reason`` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class RuntimeOptions:
    """Options common to runtimes; backend-specific ones go in ``extra``."""

    threads: int | None = None
    optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    # Worker threads busy-wait between runs for lower latency. Turn it off when several sessions
    # take turns (side-by-side timing): one session's spinning threads would steal the cores.
    spin_wait: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Runtime(Protocol):
    """A backend that loads an ONNX model (path or protobuf bytes) and runs feeds through it."""

    name: str

    def available(self) -> Availability: ...

    #: Whether ``load`` accepts a :class:`SharedWeightsModel`.
    accepts_shared_weights: bool

    def load(self, model: str | bytes | SharedWeightsModel, options: RuntimeOptions | None = None) -> None: ...

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one feed; ``outputs`` limits which outputs are computed and returned (default: all)."""
        ...

    def close(self) -> None: ...
