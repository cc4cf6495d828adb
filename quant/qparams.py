"""Quantization arithmetic (pure numpy).

Affine:     q = clamp(round(x / s) + z, qmin, qmax),   x ~ s * (q - z)
Asymmetric: s = (hi - lo) / (qmax - qmin),  z = round(qmin - lo / s)        (lo <= 0 <= hi)
Symmetric:  s = max(|lo|, |hi|) / 127,      z = 0                            (int8, range +-127)
Weights:    symmetric, codes in +-127: int8 with z = 0, or uint8 with z = 128 (same values) for CPUs
            whose u8 x s8 kernels saturate (their u8 x u8 kernels do not)
Bias:       s_b = s_x * s_w (per output channel), z_b = 0, stored as int32
Scales stored in FP16/BF16 (a GPU target's high precision): s is first rounded UP to the nearest
            value of that type, and the codes computed with it, so the stored scale is exact (no code
            clips: s only grows, by at most one unit in the last place)
FP8 E4M3:   s = amax / 448, z = 0 (a float8 zero), q = e4m3(clamp(x / s, -448, 448)) (round to nearest
            even): a floating-point grid, relative step 2^-3 in every binade, for activations and weights
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from qcompile.quant.dtypes import limits, qdtype
from qcompile.quant.spec import QParams

_EPS = np.float32(1e-12)


def representable(scale: np.ndarray, scale_dtype: str | None) -> np.ndarray:
    """``scale`` rounded up to values ``scale_dtype`` (float16, bfloat16; None: float32) holds exactly."""
    scale = np.asarray(scale, dtype=np.float32)
    if scale_dtype is None:
        return scale
    low = np.dtype(ml_dtypes.bfloat16) if scale_dtype == "bfloat16" else np.dtype(scale_dtype)
    rounded = scale.astype(low)
    below = rounded.astype(np.float32) < scale
    rounded = np.where(below, np.nextafter(rounded, np.asarray(np.inf, dtype=low)), rounded)
    return np.asarray(np.maximum(rounded.astype(np.float32), np.float32(np.finfo(low).smallest_subnormal)))


def activation_qparams(lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False,
                       scale_dtype: str | None = None) -> QParams:
    """Per-tensor parameters for an activation range [lo, hi] (which is widened to contain 0);
    ``scale_dtype``: the scale is stored in that float type (:func:`representable`)."""
    qp = _activation_qparams(lo, hi, dtype, symmetric)
    if scale_dtype is None:
        return qp
    scale = representable(qp.scale, scale_dtype)
    if qdtype(dtype).integer and not symmetric:  # the zero point follows the (slightly larger) scale
        qmin, qmax = limits(dtype)
        zero = np.clip(round(qmin - min(float(lo), 0.0) / float(scale)), qmin, qmax)
        return QParams(scale, np.array(zero, dtype=np.dtype(dtype)), dtype)
    return QParams(scale, qp.zero_point, dtype)


def _activation_qparams(lo: float, hi: float, dtype: str, symmetric: bool) -> QParams:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = limits(dtype)
    if not qdtype(dtype).integer:  # FP8: symmetric by construction
        bound = max(abs(lo), abs(hi))
        scale = np.float32(bound / qmax if bound > 0 else 1.0)
        return QParams(np.array(scale, dtype=np.float32), np.zeros((), dtype=qdtype(dtype).storage), dtype)
    if symmetric:
        bound = max(abs(lo), abs(hi))
        if dtype == "uint8":
            scale = bound * 2 / (qmax - qmin)
            zero = 128
        else:
            scale = bound / 127.0
            zero = 0
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = int(round(qmin - lo / scale)) if scale > 0 else 0
        zero = int(np.clip(zero, qmin, qmax))
    scale = np.float32(scale if scale > 0 else 1.0)
    return QParams(np.array(scale, dtype=np.float32), np.array(zero, dtype=np.dtype(dtype)), dtype)


def quantize_weight(w: np.ndarray, axis: int | None, dtype: str = "int8",
                    scale_dtype: str | None = None) -> tuple[np.ndarray, QParams]:
    """Symmetric 8-bit (codes +-127) per channel along ``axis`` (or per tensor); ``dtype`` uint8
    stores the same codes shifted by the zero point 128; float8e4m3fn: s = amax / 448 per channel.
    ``scale_dtype``: scales stored in that float type, codes computed with them (:func:`representable`)."""
    w = np.asarray(w, dtype=np.float32)
    if dtype == "float8e4m3fn":
        return _symmetric_fp8(w, axis, scale_dtype)
    return weight_storage(*_symmetric_int8(w, axis, scale_dtype), dtype)


def _absmax(w: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| per channel along ``axis`` (a scalar for None), without an |w| copy."""
    if axis is None:
        return np.asarray(max(float(w.max()), -float(w.min())) if w.size else 0.0, dtype=np.float32)
    others = tuple(i for i in range(w.ndim) if i != axis)
    return np.maximum(w.max(axis=others), -w.min(axis=others))


def _symmetric_fp8(w: np.ndarray, axis: int | None, scale_dtype: str | None) -> tuple[np.ndarray, QParams]:
    fp8 = qdtype("float8e4m3fn")
    bound = _absmax(w, axis)
    scale = representable(np.where(bound > 0, bound / fp8.qmax, 1.0), scale_dtype)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    codes = to_fp8(w / scale.reshape(shape))
    return codes, QParams(scale, np.zeros(scale.shape, dtype=fp8.storage), fp8.name, axis)


def to_fp8(x: np.ndarray) -> np.ndarray:
    """E4M3 values nearest to ``x`` (ties to even), saturated to ±448 (ONNX QuantizeLinear's default)."""
    fp8 = qdtype("float8e4m3fn")
    return np.clip(x, fp8.qmin, fp8.qmax).astype(fp8.storage)


def weight_storage(q: np.ndarray, qp: QParams, dtype: str) -> tuple[np.ndarray, QParams]:
    """Symmetric int8 codes as stored: int8 as they are, uint8 shifted by the zero point 128."""
    if dtype == "int8":
        return q, qp
    shifted = (q.astype(np.int16) + 128).astype(np.uint8)
    return shifted, QParams(qp.scale, np.full(qp.zero_point.shape, 128, dtype=np.uint8), "uint8", qp.axis)


def _symmetric_int8(w: np.ndarray, axis: int | None, scale_dtype: str | None = None) -> tuple[np.ndarray, QParams]:
    bound = _absmax(w, axis)
    if axis is None:
        scale = representable(np.array(bound / 127.0 if bound > 0 else 1.0, dtype=np.float32), scale_dtype)
        return _codes(w, scale), QParams(scale, np.array(0, dtype=np.int8), "int8")
    scale = representable(np.where(bound > 0, bound / 127.0, 1.0), scale_dtype)
    shape = [1] * w.ndim
    shape[axis] = -1
    return _codes(w, scale.reshape(shape)), QParams(scale, np.zeros(scale.shape, dtype=np.int8), "int8", axis)


#: Bytes of float temporary per chunk in :func:`_codes` (a 154 MB LM head needs no 154 MB copy).
_CHUNK_BYTES = 16 * 1024 * 1024


def _codes(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """round(w / scale) clipped to +-127, as int8, a chunk of leading-axis slices at a time."""
    out = np.empty(w.shape, dtype=np.int8)
    if w.ndim == 0 or w.size == 0:
        out[...] = np.clip(np.round(w / scale), -127, 127)
        return out
    step = max(1, _CHUNK_BYTES // max(1, w[0].size * 4))
    per_row = scale.ndim > 0 and scale.shape[0] > 1  # per-channel along axis 0
    for start in range(0, w.shape[0], step):
        rows = slice(start, start + step)
        q = w[rows] / (scale[rows] if per_row else scale)
        np.round(q, out=q)
        np.clip(q, -127, 127, out=q)
        out[rows] = q
    return out


def quantize_bias(b: np.ndarray, activation_scale: np.ndarray, weight_scale: np.ndarray) -> tuple[np.ndarray, QParams]:
    """INT32 bias with scale s_x * s_w per output channel."""
    scale = (np.float32(activation_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = np.maximum(scale, _EPS)
    q = np.clip(np.round(np.asarray(b, dtype=np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
    axis = 0 if scale.ndim else None
    if scale.ndim == 0 and q.ndim == 1:
        scale = np.full(q.shape, scale, dtype=np.float32)
        axis = 0
    return q, QParams(scale, np.zeros(scale.shape, dtype=np.int32), "int32", axis)


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """x -> dequantize(quantize(x)) with ``qp`` (numpy reference of Q/DQ)."""
    qmin, qmax = limits(qp.dtype)
    scale, zero = qp.scale.astype(np.float32), qp.zero_point.astype(np.float64)
    if qp.axis is not None:
        shape = [1] * x.ndim
        shape[qp.axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    if not qdtype(qp.dtype).integer:
        return (to_fp8(x / scale).astype(np.float32) * scale).astype(np.float32)
    q = np.clip(np.round(x / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).astype(np.float32)


def weight_codes(cached: dict[str, tuple[np.ndarray, QParams]] | None = None, scale_dtype: str | None = None):
    """A ``weight_codes(name, w, axis, dtype)`` function for the Q/DQ lowering: codes computed while
    measuring sensitivity (``cached``, each handed out once) where their axis and element type match
    (int8 codes serve uint8 storage too), else computed here; ``scale_dtype``: scales stored in that
    float type (the cached codes, made with float32 scales, are then not used)."""
    cached = {} if cached is None or scale_dtype is not None else cached

    def codes(name: str, w: np.ndarray, axis: int | None, dtype: str) -> tuple[np.ndarray, QParams]:
        hit = cached.pop(name, None)
        if hit is not None and hit[1].axis == axis and hit[1].dtype == dtype == "float8e4m3fn":
            return hit
        if hit is not None and hit[1].dtype == "int8" and hit[1].axis == axis and dtype in ("int8", "uint8"):
            return weight_storage(*hit, dtype)
        return quantize_weight(w, axis, dtype, scale_dtype)

    return codes


def union_ranges(groups: list[list[str]], ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Per tensor, the union [min lo, max hi] over the scale group it belongs to (groups may overlap:
    they are merged transitively); a tensor in no group keeps its own range."""
    parent = {name: name for name in ranges}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in groups:
        members = [m for m in group if m in parent]
        for other in members[1:]:
            parent[find(other)] = find(members[0])
    union: dict[str, tuple[float, float]] = {}
    for name, (lo, hi) in ranges.items():
        root = find(name)
        u = union.get(root, (lo, hi))
        union[root] = (min(u[0], lo), max(u[1], hi))
    return {name: union[find(name)] for name in ranges}
