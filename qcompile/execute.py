"""Load an in-memory model into a runtime and run feeds through it (the core's bridge to runtimes)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx_ir as ir

from qcompile import modelio, specs
from qcompile.errors import BackendFailedError, RuntimeUnavailableError, UnknownNameError
from qcompile.runtimes import BackendError, Runtime, RuntimeOptions, get_runtime

log = logging.getLogger(__name__)


def resolve_runtime(name: str) -> Runtime:
    """A runtime by name (or a target's name: the runtime that serves it), checked to be usable here."""
    from qcompile import targets
    from qcompile.runtimes import runtime_names

    if name not in runtime_names() and name in targets.names():
        name = targets.get(name).runtime
    try:
        runtime = get_runtime(name)
    except KeyError as exc:
        raise UnknownNameError(str(exc.args[0]), fix="see `qcompile bench --help` for targets") from None
    availability = runtime.available()
    if not availability:
        raise RuntimeUnavailableError(f"runtime {name!r} is not available: {availability.reason}")
    return runtime


@contextlib.contextmanager
def loaded(
    model: ir.Model | str, target: str = "ort-cpu", options: RuntimeOptions | None = None
) -> Iterator[Runtime]:
    """A runtime with ``model`` loaded (an ir.Model or a path), closed on exit."""
    runtime = resolve_runtime(target)
    try:
        if isinstance(model, ir.Model):
            _load_in_memory(runtime, model, options)
        else:
            runtime.load(str(model), options)
    except BackendError as exc:
        raise BackendFailedError(str(exc), where=target, fix="check the model with `qcompile inspect`") from None
    try:
        yield runtime
    finally:
        runtime.close()


def _load_in_memory(runtime: Runtime, model: ir.Model, options: RuntimeOptions | None) -> None:
    """Hand the runtime the model's own weights where it accepts them, else a serialized copy."""
    if getattr(runtime, "accepts_shared_weights", False):
        try:
            with modelio.runnable(model, share_weights=True) as payload:
                runtime.load(payload, options)
            return
        except BackendError as exc:  # e.g. a graph optimizer that reads a weight from the file
            log.info("loading with shared weights failed (%s); loading a serialized copy", exc)
    with modelio.runnable(model) as payload:
        runtime.load(payload, options)


def run_all(runtime: Runtime, feeds: Iterable[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run every feed; backend failures become BackendFailedError."""
    try:
        return [runtime.run(feed) for feed in feeds]
    except BackendError as exc:
        raise BackendFailedError(str(exc), where=runtime.name, fix="check the inputs match the model") from None


def prompt_runner(runtime: Runtime, model_path: str | Path) -> Callable[[Mapping[str, np.ndarray]], dict]:
    """``runtime.run`` for prompt-only feeds: a KV-cache decoder's feed is completed with an empty
    past, positions and mask (qcompile/decoder.py); any other model's is run as given."""
    from qcompile import decoder

    sig = decoder.signature(specs.input_specs(modelio.load(model_path, check=False)))
    if sig is None:
        return runtime.run
    sig = decoder.signature_of(model_path)
    return lambda feed: runtime.run(sig.complete(feed))
