"""A fake ROCm ``migraphx`` for tests: parse_onnx / compile / run, arguments asserted, computed by onnxruntime.

``map_input_dims`` must give every input a full static shape; the target must be ``get_target("gpu")``;
``run`` takes ``argument`` objects of exactly those shapes. No quantize call is allowed (precision is
the graph's). ``RECORD`` holds what tests inspect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Record:
    map_input_dims: list[dict] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    runs: int = 0


RECORD = Record()


class target:  # noqa: N801 - migraphx's names
    def __init__(self, name: str) -> None:
        self.name = name


def get_target(name: str) -> target:
    assert name == "gpu", f"qcompile compiles for the gpu target, not {name!r}"
    return target(name)


class argument:  # noqa: N801
    def __init__(self, array: np.ndarray) -> None:
        assert isinstance(array, np.ndarray) and array.flags.c_contiguous
        self._array = array

    def __array__(self, dtype=None, copy=None):
        return self._array if dtype is None else self._array.astype(dtype)


class program:  # noqa: N801
    def __init__(self, model: bytes | str, dims: dict[str, list[int]]) -> None:
        import onnxruntime

        self._session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        names = [i.name for i in self._session.get_inputs()]
        assert sorted(dims) == sorted(names), f"map_input_dims must name every input: {sorted(dims)} vs {names}"
        assert all(isinstance(s, list) and all(type(d) is int and d > 0 for d in s) for s in dims.values())
        self._dims = dims
        self._compiled = False

    def compile(self, t: target, offload_copy: bool = True, fast_math: bool = True) -> None:
        assert isinstance(t, target) and offload_copy, "host buffers in and out need offload_copy"
        RECORD.targets.append(t.name)
        self._compiled = True

    def get_parameter_names(self) -> list[str]:
        return list(self._dims)

    def run(self, params: dict) -> list[argument]:
        assert self._compiled, "run before compile"
        assert sorted(params) == sorted(self._dims)
        feeds = {}
        for name, value in params.items():
            assert isinstance(value, argument), f"{name}: pass migraphx.argument, not {type(value).__name__}"
            array = np.asarray(value)
            assert list(array.shape) == self._dims[name], f"{name}: {array.shape} vs compiled {self._dims[name]}"
            feeds[name] = array
        RECORD.runs += 1
        return [argument(np.ascontiguousarray(r)) for r in self._session.run(None, feeds)]


def parse_onnx(path: str, map_input_dims: dict | None = None, default_dim_value: int = 1) -> program:
    assert isinstance(path, str)
    RECORD.map_input_dims.append(dict(map_input_dims or {}))
    return program(path, dict(map_input_dims or {}))


def parse_onnx_buffer(data: bytes, map_input_dims: dict | None = None, default_dim_value: int = 1) -> program:
    assert isinstance(data, bytes)
    RECORD.map_input_dims.append(dict(map_input_dims or {}))
    return program(data, dict(map_input_dims or {}))


def _no_quantize(*args, **kwargs):
    raise AssertionError("precision is the graph's: qcompile must not call migraphx.quantize_*")


quantize_fp16 = quantize_int8 = quantize_fp8 = _no_quantize
