"""The one table of quantized element types, and sub-byte packing.

    name          bits  signed  codes            ONNX type
    uint8          8    no      0 .. 255         UINT8
    int8           8    yes     -128 .. 127      INT8
    uint4          4    no      0 .. 15          UINT4
    int4           4    yes     -8 .. 7          INT4
    float8e4m3fn   8    yes     ±448 (finite)    FLOAT8E4M3FN
    int32         32    yes     -2^31 .. 2^31-1  INT32   (biases: s_b = s_x s_w)

Symmetric 8-bit weights use codes ±127 (the -128 code is never produced, so negation is exact).
FP8 E4M3 (``fn``: finite, no infinities) codes are the float8 values themselves: x/s rounded to the
nearest E4M3 value (ties to even) after saturating to ±448, so s = amax / 448 uses the whole range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

QDTypeName = Literal["uint8", "int8", "uint4", "int4", "float8e4m3fn", "int32"]


@dataclass(frozen=True)
class QDType:
    name: str
    bits: int
    signed: bool
    qmin: float
    qmax: float
    onnx: str  # the onnx_ir.DataType member name
    integer: bool = True

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype the codes are computed in (sub-byte codes live in a byte each)."""
        return np.dtype({"uint4": "uint8", "int4": "int8", "float8e4m3fn": "float32"}.get(self.name, self.name))

    @property
    def storage(self) -> np.dtype:
        """The numpy dtype codes are stored in (float8 through ml_dtypes; sub-byte codes a byte each)."""
        return np.dtype(ml_dtypes.float8_e4m3fn) if self.name == "float8e4m3fn" else self.numpy


DTYPES: dict[str, QDType] = {
    "uint8": QDType("uint8", 8, False, 0, 255, "UINT8"),
    "int8": QDType("int8", 8, True, -128, 127, "INT8"),
    "uint4": QDType("uint4", 4, False, 0, 15, "UINT4"),
    "int4": QDType("int4", 4, True, -8, 7, "INT4"),
    "float8e4m3fn": QDType("float8e4m3fn", 8, True, -448.0, 448.0, "FLOAT8E4M3FN", integer=False),
    "int32": QDType("int32", 32, True, -(2**31), 2**31 - 1, "INT32"),
}


def qdtype(name: str) -> QDType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown quantized dtype {name!r} (one of {', '.join(DTYPES)})") from None


def limits(name: str) -> tuple[float, float]:
    """(qmin, qmax) of a quantized type."""
    t = qdtype(name)
    return t.qmin, t.qmax


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, low bits first (bits in {2, 4, 8})."""
    if bits == 8:
        return codes.astype(np.uint8)
    per_byte = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint16)
    out = np.zeros(c.shape[:-1], dtype=np.uint16)
    for i in range(per_byte):
        out |= c[..., i] << (bits * i)
    return out.astype(np.uint8)
