"""What a value's quantization is, written on the value (``value.meta``) by a target's annotators.

    QuantSpec(dtype, symmetric, axis, block_size)   x -> Q/DQ with its own parameters:
        axis None: per tensor;  axis a: per channel along a;  block_size b: blocks of b along axis
    SharedSpec(value)                               the same parameters as ``value`` (Concat inputs,
                                                    values a pooling or reshape only moves): the union
                                                    of their observed ranges
    DerivedSpec(activation, weight, consumer)       a bias: s_b = s_x * s_w, zero point 0, int32

Resolved parameters: QParams (scale, zero point, dtype, axis) for Q/DQ, BlockCodes for block-wise
weights (codes [N, K/b, b], scales and zero points [N, K/b]). Frozen: a spec never changes once written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from qcompile.quant.dtypes import QDTypeName

#: value.meta keys (onnx-ir keeps ``meta`` on values across passes; it is never serialized)
SPEC_KEY = "qcompile.quant.spec"
ORDER_KEY = "qcompile.quant.order"  # annotation order: fixes where new initializers go (deterministic)
BIAS_KEY = "qcompile.quant.bias"  # a tuple of DerivedSpec (one per consumer: each has its own s_x)
CONSUMERS_KEY = "qcompile.quant.consumers"  # (node name, input index) that read the DQ; absent: every consumer
#: node.meta keys
QUANTIZED_KEY = "qcompile.quant.quantized"  # True on a node that runs quantized
FLOAT_REASON_KEY = "qcompile.quant.float_reason"  # why a candidate node stays float

Role = Literal["activation", "weight"]


@dataclass(frozen=True)
class QuantSpec:
    dtype: QDTypeName = "uint8"
    symmetric: bool = False
    axis: int | None = None
    block_size: int | None = None
    role: Role = "activation"


@dataclass(frozen=True)
class SharedSpec:
    value: str  # the value whose parameters are shared (the root of its group)


@dataclass(frozen=True)
class DerivedSpec:
    activation: str
    weight: str
    consumer: str  # node name
    index: int = 2


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (scalars, or per-channel arrays along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int | None = None


@dataclass
class BlockCodes:
    """codes [N, k_blocks, block] (unsigned), scales [N, k_blocks], zero points [N, k_blocks]."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    bits: int
    symmetric: bool

    def dequantize(self) -> np.ndarray:
        """W [K, N] as the runtime reconstructs it (numpy reference)."""
        w = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]
        return w.reshape(w.shape[0], -1)[:, : self.k].T.copy()
