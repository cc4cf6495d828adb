"""Streaming range observers: MinMax, Percentile, Entropy (KL) and MSE, per tensor or per channel.

Each observer sees batches through ``update(x)`` and keeps a fixed amount of state (a min/max pair,
or a 2048-bin histogram per channel), whatever the number of samples. Non-finite values (-inf
attention masks, inf, NaN) never enter a range: they are counted in ``nonfinite`` and skipped.

    minmax      [min x, max x]
    percentile  the central p % of the values (default 99.999), two-sided
    entropy     symmetric threshold T minimising KL(P || Q) between the |x| histogram P and its
                128-level quantisation Q (TensorRT's method)
    mse         the range minimising E[(x - q(x))^2] for the quantizer that will use it (clipping
                error outside, uniform rounding error step^2 / 12 inside): a symmetric threshold T
                over the |x| histogram (step 2T/255), or, for asymmetric u8 activations, the pair
                (lo, hi) over the signed histogram (step (hi - lo)/255)

``range()`` returns (lo, hi) as float64 arrays: shape () per tensor, (C,) per channel; lo <= 0 <= hi.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")
BINS = 2048


def _channels_first(x: np.ndarray, axis: int | None) -> np.ndarray:
    """x as [C, N] (per channel) or [1, N] (per tensor), float64."""
    x = np.asarray(x)
    if axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


@dataclass
class MinMaxObserver:
    axis: int | None = None
    nonfinite: int = 0
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        rows = _channels_first(x, self.axis)
        finite = np.isfinite(rows)
        if not finite.all():
            self.nonfinite += int(rows.size - np.count_nonzero(finite))
            rows = np.where(finite, rows, np.nan)
            with np.errstate(all="ignore"):
                lo, hi = np.nanmin(rows, axis=1), np.nanmax(rows, axis=1)
            lo, hi = np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=0.0)
        elif rows.shape[1] == 0:
            return
        else:
            lo, hi = rows.min(axis=1), rows.max(axis=1)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.lo is None:
            return np.zeros(()), np.zeros(())
        lo, hi = np.minimum(self.lo, 0.0), np.maximum(self.hi, 0.0)
        return (lo[0], hi[0]) if self.axis is None else (lo, hi)


@dataclass
class _Histogram:
    """A signed histogram over [-limit, limit] that doubles its span to fit new data."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.float64))
    limit: float = 0.0
    lo: float = np.inf
    hi: float = -np.inf

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        lo, hi = float(values.min()), float(values.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        peak = max(abs(lo), abs(hi))
        if peak == 0.0 and self.limit == 0.0:
            self.counts[BINS // 2] += values.size
            return
        if self.limit == 0.0:
            self.limit = peak
        elif peak > self.limit:
            factor = 1
            while self.limit * factor < peak:
                factor *= 2
            self._widen(factor)
        self.counts += _bin_counts(values, self.limit)

    def _widen(self, factor: int) -> None:
        merged = self.counts.reshape(-1, factor).sum(axis=1) if factor <= BINS else np.array([self.counts.sum()])
        counts = np.zeros(BINS, dtype=np.float64)
        start = (BINS - merged.size) // 2
        counts[start : start + merged.size] = merged
        self.counts = counts
        self.limit *= factor

    @property
    def width(self) -> float:
        return 2 * self.limit / BINS

    def abs_counts(self) -> np.ndarray:
        """|x| histogram: BINS/2 bins over [0, limit]."""
        half = BINS // 2
        return self.counts[half:] + self.counts[:half][::-1]


def _bin_counts(values: np.ndarray, limit: float) -> np.ndarray:
    """Counts of ``values`` in BINS equal bins over [-limit, limit] (the last bin closed), like
    np.histogram but with one multiply-add and a bincount: several times faster on large tensors."""
    scale = np.float32(BINS / (2 * limit))
    index = ((values.astype(np.float32, copy=False) + np.float32(limit)) * scale).astype(np.intp)
    np.clip(index, 0, BINS - 1, out=index)
    return np.bincount(index.reshape(-1), minlength=BINS)


def _percentile_range(h: _Histogram, percentile: float) -> tuple[float, float]:
    total = h.counts.sum()
    if total == 0 or h.limit == 0.0:
        return 0.0, 0.0
    tail = (100.0 - percentile) / 200.0
    cdf = np.cumsum(h.counts) / total
    edges = np.linspace(-h.limit, h.limit, BINS + 1)
    lo = edges[int(np.searchsorted(cdf, tail, side="left"))]
    hi = edges[min(BINS, int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1)]
    return max(lo, h.lo), min(hi, h.hi)


def _entropy_threshold(h: _Histogram, levels: int = 128) -> float:
    p_full = h.abs_counts()
    if p_full.sum() == 0:
        return 0.0
    last = int(np.nonzero(p_full)[0][-1]) + 1
    if last <= levels:
        return last * h.width
    best, best_kl = last, np.inf
    for i in range(levels, last + 1, max(1, (last - levels) // 256)):
        p = p_full[:i].copy()
        p[i - 1] += p_full[i:].sum()  # clipped values land in the last bin
        nonzero = p > 0
        # Q: merge the unclipped i bins into `levels` groups, spread each group's mass over the
        # group's non-empty bins of P. Bins where P has mass but Q none (clipped outliers) get a
        # small floor instead of being skipped, so clipping is never free.
        q = np.zeros(i)
        for g in np.array_split(np.arange(i), levels):
            mask = nonzero[g]
            if mask.any():
                q[g[mask]] = p_full[g].sum() / mask.sum()
        p = p / p.sum()
        q_sum = q.sum()
        q = q / q_sum if q_sum > 0 else q
        q[nonzero & (q == 0)] = 1e-6
        kl = float(np.sum(p[nonzero] * np.log(p[nonzero] / q[nonzero])))
        if kl < best_kl:
            best, best_kl = i, kl
    return best * h.width


MSE_CANDIDATES = np.linspace(1 / 64, 1, 128)  # fractions of the observed extremes tried as clip points


def _mse_threshold(h: _Histogram, levels: int = 255) -> float:
    counts = h.abs_counts()
    if counts.sum() == 0:
        return 0.0
    centers = (np.arange(counts.size) + 0.5) * h.width
    peak = max(abs(h.lo), abs(h.hi))
    best, best_err = peak, np.inf
    for t in peak * MSE_CANDIDATES:
        step = 2 * t / levels
        clipped = np.maximum(centers - t, 0.0)
        err = float(np.sum(counts * np.where(centers > t, clipped**2, step * step / 12.0)))
        if err < best_err:
            best, best_err = t, err
    return best


def _mse_asymmetric_range(h: _Histogram, levels: int = 255) -> tuple[float, float]:
    """(lo, hi) minimising the squared error of asymmetric quantization over [lo, hi], with lo and hi
    searched independently among fractions of the observed min and max (prefix sums: one grid)."""
    n = h.counts
    centers = -h.limit + (np.arange(BINS) + 0.5) * h.width
    lo_c, hi_c = min(h.lo, 0.0) * MSE_CANDIDATES, max(h.hi, 0.0) * MSE_CANDIDATES
    prefix = [np.concatenate([[0.0], np.cumsum(n * centers**k)]) for k in range(3)]  # sums over bins [0, i)
    below = np.searchsorted(centers, lo_c)  # bins whose centre is under lo: clipped up to lo
    above = np.searchsorted(centers, hi_c, side="right")  # bins from here on: clipped down to hi
    n0, n1, n2 = (p[below] for p in prefix)
    clip_lo = lo_c**2 * n0 - 2 * lo_c * n1 + n2
    m0, m1, m2 = (p[-1] - p[above] for p in prefix)
    clip_hi = hi_c**2 * m0 - 2 * hi_c * m1 + m2
    inside = prefix[0][above][None, :] - prefix[0][below][:, None]
    step = (hi_c[None, :] - lo_c[:, None]) / levels
    err = clip_lo[:, None] + clip_hi[None, :] + np.maximum(inside, 0.0) * step**2 / 12.0
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(lo_c[i]), float(hi_c[j])


@dataclass
class HistogramObserver:
    """Percentile, entropy or MSE ranges from streaming histograms (one per channel)."""

    method: Method = "percentile"
    axis: int | None = None
    percentile: float = 99.999
    symmetric: bool = False  # mse: the quantizer is symmetric (int8), else u8 with a zero point
    nonfinite: int = 0
    _hists: list[_Histogram] = field(default_factory=list)

    def update(self, x: np.ndarray) -> None:
        rows = _channels_first(x, self.axis)
        if not self._hists:
            self._hists = [_Histogram() for _ in range(rows.shape[0])]
        if rows.size and np.isfinite(rows.min()) and np.isfinite(rows.max()):  # NaN propagates into min
            for row, hist in zip(rows, self._hists):
                hist.add(row)
            return
        finite = np.isfinite(rows)
        self.nonfinite += int(rows.size - np.count_nonzero(finite))
        for row, mask, hist in zip(rows, finite, self._hists):
            hist.add(row[mask])

    def _one(self, h: _Histogram) -> tuple[float, float]:
        if h.hi < h.lo:  # saw nothing finite
            return 0.0, 0.0
        if self.method == "percentile":
            lo, hi = _percentile_range(h, self.percentile)
        elif self.method == "mse" and not self.symmetric:
            lo, hi = _mse_asymmetric_range(h)
        else:
            t = _entropy_threshold(h) if self.method == "entropy" else _mse_threshold(h)
            lo, hi = max(-t, h.lo), min(t, h.hi)
        return min(lo, 0.0), max(hi, 0.0)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._one(h) for h in self._hists] or [(0.0, 0.0)]
        lo = np.array([p[0] for p in pairs])
        hi = np.array([p[1] for p in pairs])
        return (lo[0], hi[0]) if self.axis is None else (lo, hi)


Observer = MinMaxObserver | HistogramObserver


def make_observer(method: Method, axis: int | None = None, percentile: float = 99.999,
                  symmetric: bool = False) -> Observer:
    """An observer by method name; ``symmetric``: whether the quantizer the range is for is
    symmetric (changes only what mse minimises)."""
    if method == "minmax":
        return MinMaxObserver(axis=axis)
    if method in ("percentile", "entropy", "mse"):
        return HistogramObserver(method=method, axis=axis, percentile=percentile, symmetric=symmetric)
    raise ValueError(f"unknown calibration method {method!r} (one of {', '.join(METHODS)})")


def finite_rows(x: np.ndarray) -> np.ndarray:
    """``x`` seen as [rows, channels] (the last axis), without the rows that hold a NaN or an inf.

    Statistics built from rows (Hessians, second moments, SQNR samples) skip a masked position
    whole, as the observers skip non-finite values: one -inf must not poison every estimate."""
    rows = np.asarray(x).reshape(-1, x.shape[-1])
    keep = np.isfinite(rows).all(axis=1)
    return rows if keep.all() else rows[keep]
