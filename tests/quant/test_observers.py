"""Observers against numpy references; streaming state is bounded; non-finite values are skipped."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.quant.observers import BINS, HistogramObserver, MinMaxObserver, make_observer
from qcompile.quant.qparams import activation_qparams, fake_quantize

RNG = np.random.default_rng(0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), batches=st.integers(1, 5))
def test_minmax_streaming_equals_numpy(seed, batches):
    rng = np.random.default_rng(seed)
    data = [rng.standard_normal((2, 5, 3)) * rng.uniform(0.1, 10) for _ in range(batches)]
    per_tensor, per_channel = MinMaxObserver(), MinMaxObserver(axis=1)
    for d in data:
        per_tensor.update(d)
        per_channel.update(d)
    allx = np.concatenate(data)
    lo, hi = per_tensor.range()
    assert lo == pytest.approx(min(allx.min(), 0)) and hi == pytest.approx(max(allx.max(), 0))
    lo_c, hi_c = per_channel.range()
    np.testing.assert_allclose(lo_c, np.minimum(allx.min(axis=(0, 2)), 0))
    np.testing.assert_allclose(hi_c, np.maximum(allx.max(axis=(0, 2)), 0))


def test_percentile_matches_numpy_within_a_bin():
    data = [RNG.standard_normal(50_000) * 2 + 0.5 for _ in range(4)]
    obs = HistogramObserver("percentile", percentile=99.0)
    for d in data:
        obs.update(d)
    allx = np.concatenate(data)
    lo, hi = obs.range()
    width = 2 * obs._hists[0].limit / BINS
    assert lo == pytest.approx(np.percentile(allx, 0.5), abs=2 * width)
    assert hi == pytest.approx(np.percentile(allx, 99.5), abs=2 * width)


def test_histogram_widening_keeps_every_count_and_bounded_state():
    obs = HistogramObserver("percentile")
    total = 0
    for scale in (0.1, 1.0, 7.0, 300.0, 0.5):
        batch = RNG.standard_normal(10_000) * scale
        obs.update(batch)
        total += batch.size
    hist = obs._hists[0]
    assert hist.counts.sum() == total
    assert hist.counts.shape == (BINS,)  # state does not grow with the data
    assert hist.limit >= hist.hi and -hist.limit <= hist.lo


def _brute_force_mse_threshold(x: np.ndarray) -> float:
    """Reference: the symmetric clip T minimising the real fake-quantisation MSE of x."""
    peak = np.abs(x).max()
    best, best_err = peak, np.inf
    for t in np.linspace(peak / 64, peak, 128):
        qp = activation_qparams(-t, t, "int8", symmetric=True)
        qp = type(qp)(np.float32(2 * t / 255), qp.zero_point, qp.dtype)
        err = np.mean((np.clip(x, -t, t) - fake_quantize(np.clip(x, -t, t), qp)) ** 2 + (x - np.clip(x, -t, t)) ** 2)
        if err < best_err:
            best, best_err = t, err
    return best


def test_mse_threshold_close_to_brute_force_reference():
    # One far outlier: keeping it all costs every value a coarse step; the optimum clips part of it.
    x = np.concatenate([RNG.standard_normal(400_000), [500.0]])
    obs = HistogramObserver("mse", symmetric=True)
    for chunk in np.array_split(x, 4):
        obs.update(chunk)
    lo, hi = obs.range()
    reference = _brute_force_mse_threshold(x)
    assert hi == pytest.approx(reference, rel=0.15)
    assert hi < 0.5 * 500  # the outlier is clipped


def _u8_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """The real error of ORT's asymmetric u8 activation quantization over [lo, hi]."""
    return float(np.mean((x - fake_quantize(x, activation_qparams(lo, hi, "uint8"))) ** 2))


def test_asymmetric_mse_range_fits_the_u8_quantizer_of_a_one_sided_tensor():
    # Softplus-like: one-sided with a long tail. The symmetric |x| model charges the rounding step
    # 2T/255 where u8 over [lo, hi] has (hi - lo)/255, so it clips more than the optimum.
    x = np.log1p(np.exp(2 * RNG.standard_normal(300_000)))
    asym = HistogramObserver("mse", symmetric=False)
    sym = HistogramObserver("mse", symmetric=True)
    for chunk in np.array_split(x, 3):
        asym.update(chunk)
        sym.update(chunk)
    fractions = np.linspace(1 / 64, 1, 128)
    reference = min(_u8_mse(x, x.min() * a, x.max() * b) for a in fractions[::16] for b in fractions)
    err_asym = _u8_mse(x, *asym.range())
    assert err_asym <= 1.02 * reference  # brute force over the real quantizer
    assert err_asym < 0.95 * _u8_mse(x, *sym.range())
    assert err_asym < 0.95 * _u8_mse(x, x.min(), x.max())


def test_entropy_clips_outliers_but_keeps_the_bulk():
    x = np.concatenate([RNG.standard_normal(200_000), RNG.uniform(30, 60, 10)])
    obs = HistogramObserver("entropy")
    obs.update(x)
    lo, hi = obs.range()
    assert 3.0 < hi < 30.0 and -30.0 < lo < -3.0


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_non_finite_values_never_poison_a_range(method):
    obs = make_observer(method)
    x = RNG.standard_normal(1000).astype(np.float32)
    x[:10] = -np.inf  # attention-mask style
    x[10:12] = np.nan
    x[12] = np.inf
    obs.update(x)
    lo, hi = obs.range()
    assert np.isfinite(lo) and np.isfinite(hi) and lo < 0 < hi
    assert obs.nonfinite == 13


def test_per_channel_histograms():
    x = np.stack([RNG.standard_normal(5000), RNG.standard_normal(5000) * 10], axis=1)
    obs = HistogramObserver("percentile", axis=1, percentile=99.9)
    obs.update(x)
    lo, hi = obs.range()
    assert hi.shape == (2,) and hi[1] > 5 * hi[0]


def test_empty_observer_gives_zero_range():
    assert MinMaxObserver().range() == (0.0, 0.0)
    lo, hi = HistogramObserver("mse").range()
    assert lo == 0.0 and hi == 0.0
