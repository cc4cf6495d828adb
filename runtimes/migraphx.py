"""MIGraphX runtime (AMD GPUs) over the ``migraphx`` module that ROCm installs.

PyPI's ``migraphx`` is an empty placeholder; the real module is a compiled extension shipped with ROCm
(``/opt/rocm/lib`` on PYTHONPATH). Shapes are fixed at parse time (``map_input_dims``): static dims as
the model has them, symbolic ones at the opt value of the user's ranges. Precision is the graph's:
no ``quantize_*`` call is made (MIGraphX fuses Q/DQ pairs into integer/FP8 kernels itself).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qcompile.runtimes import gpu_timing
from qcompile.runtimes.base import Availability, BackendError, RuntimeOptions, SharedWeightsModel
from qcompile.runtimes.tensorrt import input_profiles, onnx_header, parse_profile

EXTRA_DIMS = "qcompile.dims"  # {symbolic dim: (min, opt, max)} or "seq=1:128:512"
EXTRA_INPUT_SHAPES = "qcompile.input_shapes"  # {input: shape}, overrides dims

_ROCM_HINT = "the real module ships with ROCm (put /opt/rocm/lib on PYTHONPATH)"


def migraphx_missing() -> str | None:
    """Why the ROCm migraphx module cannot be used (one line), or None.

    A compiled extension is taken as the real module without importing it; a Python package is
    imported (the placeholder is tiny) and must have ``parse_onnx``.
    """
    try:
        spec = importlib.util.find_spec("migraphx")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return f"migraphx is not importable: {_ROCM_HINT}; PyPI's migraphx is an empty placeholder"
    if (spec.origin or "").endswith((".so", ".pyd")):
        return None
    try:
        module = importlib.import_module("migraphx")
    except ImportError as exc:
        return f"migraphx does not import ({str(exc).splitlines()[0]}): {_ROCM_HINT}"
    if not hasattr(module, "parse_onnx"):
        return f"the importable migraphx is PyPI's empty placeholder (no parse_onnx): {_ROCM_HINT}"
    return None


class MigraphxRuntime:
    """An ONNX model parsed, compiled for ``get_target("gpu")`` and run by MIGraphX (host buffers in/out)."""

    accepts_shared_weights = False

    def __init__(
        self,
        name: str = "migraphx",
        *,
        dims: Mapping[str, Sequence[int]] | str | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.name = name
        self.dims = dims
        self.input_shapes = input_shapes
        self._defaults = (dims, input_shapes)  # options in RuntimeOptions.extra apply to one load only
        self._mx = None
        self._program = None
        self._inputs: dict[str, tuple[int, ...]] = {}
        self._outputs: list[str] = []

    def available(self) -> Availability:
        reason = self.missing()
        return Availability(reason is None, reason or "")

    def missing(self) -> str | None:
        """The one-line reason this runtime cannot run here, or None."""
        return migraphx_missing() or gpu_timing.rocm_missing()

    def _shapes(self, model: str | bytes) -> dict[str, tuple[int, ...]]:
        if self.input_shapes is not None:
            return {name: tuple(int(d) for d in shape) for name, shape in self.input_shapes.items()}
        dims = self.dims
        if isinstance(dims, str):
            try:
                dims = parse_profile(dims)
            except ValueError as exc:
                raise BackendError(str(exc)) from None
        return {name: tuple(shapes[1]) for name, shapes in input_profiles(model, dims).items()}

    def load(self, model: str | bytes | SharedWeightsModel, options: RuntimeOptions | None = None) -> None:
        if isinstance(model, SharedWeightsModel):
            raise BackendError(f"{self.name} cannot take shared weights; give a path or ONNX bytes")
        extra = (options or RuntimeOptions()).extra
        self.dims = extra.get(EXTRA_DIMS, self._defaults[0])
        self.input_shapes = extra.get(EXTRA_INPUT_SHAPES, self._defaults[1])
        reason = migraphx_missing()
        if reason:
            raise BackendError(reason)
        import migraphx

        shapes = self._shapes(model)
        dims = {name: list(shape) for name, shape in shapes.items()}
        try:
            if isinstance(model, bytes):
                program = migraphx.parse_onnx_buffer(model, map_input_dims=dims)
            else:
                program = migraphx.parse_onnx(str(Path(model)), map_input_dims=dims)
            program.compile(migraphx.get_target("gpu"))
        except Exception as exc:  # MIGraphX raises RuntimeError with its own text
            raise BackendError(f"MIGraphX could not compile the model: {str(exc).strip().splitlines()[0]}") from exc
        self._mx, self._program, self._inputs = migraphx, program, shapes
        self._outputs = [value.name for value in onnx_header(model).graph.output]

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if self._program is None:
            raise BackendError(f"{self.name}: call load() before run()")
        arguments: dict[str, Any] = {}
        for name, shape in self._inputs.items():
            if name not in feeds:
                raise BackendError(f"missing input {name}")
            array = np.ascontiguousarray(feeds[name])
            if tuple(array.shape) != shape:
                raise BackendError(f"input {name}: MIGraphX compiled shape {shape}, got {tuple(array.shape)}")
            arguments[name] = self._mx.argument(array)
        try:
            results = self._program.run(arguments)
        except Exception as exc:
            raise BackendError(f"MIGraphX failed to run: {str(exc).strip().splitlines()[0]}") from exc
        named = {name: np.array(result) for name, result in zip(self._outputs, results)}
        names = list(outputs) if outputs is not None else self._outputs
        unknown = [n for n in names if n not in named]
        if unknown:
            raise BackendError(f"unknown outputs: {', '.join(unknown)}")
        return {name: named[name] for name in names}

    def close(self) -> None:
        self._program = None
        self._inputs, self._outputs = {}, []

    def __enter__(self) -> "MigraphxRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
