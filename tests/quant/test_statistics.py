"""The one calibration loop: every statistic of every tensor fed from one run per feed, each equal
to its numpy definition on the concatenated data, with state that does not grow with the samples."""

from __future__ import annotations

import numpy as np

from conftest import floats, model_from_text
from qcompile import calibrate
from qcompile.calibration import IterableReader
from qcompile.quant.observers import MinMaxObserver, make_observer
from qcompile.quant.statistics import ChannelAbsMax, ChannelMoments, Hessian, RowSample, even_rows

RNG = np.random.default_rng(0)
K = 6


def model():
    w = floats(RNG.standard_normal(K * K) * 0.5)
    return model_from_text(f"""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[3, {K}] x) => (float[3, {K}] y) <float[{K}, {K}] w = {{{w}}}> {{
      h = MatMul(x, w)
      y = Relu(h)
    }}""")


class CountingRuntime:
    """Wraps a runtime, counting runs."""

    def __init__(self, runtime):
        self.runtime, self.runs = runtime, 0

    def run(self, feed, outputs=None):
        self.runs += 1
        return self.runtime.run(feed, outputs=outputs)


def test_every_statistic_from_one_run_per_feed_matches_numpy():
    m = model()
    feeds = [{"x": RNG.standard_normal((3, K)).astype(np.float32) * (1 + i)} for i in range(5)]
    stats = {"x": [ChannelAbsMax(), ChannelMoments(), Hessian(), RowSample(feeds=2)],
             "h": [make_observer("minmax"), MinMaxObserver(axis=-1)]}
    with calibrate.tapped(m, list(stats)) as runtime:
        counting = CountingRuntime(runtime)
        collected = calibrate.collect(m, stats, IterableReader(feeds), runtime=counting)
    assert collected.samples == 5 and counting.runs == 5  # one run per feed feeds all six statistics
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    absmax, moments, hessian, rows = stats["x"]
    np.testing.assert_allclose(absmax.absmax(), np.abs(x).max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(moments.mean_abs(), np.abs(x).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(moments.mean_square(), (x**2).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(hessian.h, x.T @ x, rtol=1e-4)
    np.testing.assert_array_equal(rows.rows(), np.concatenate([f["x"] for f in feeds[:2]]))
    w = m.graph.initializers["w"].const_value.numpy()
    h = np.concatenate([f["x"] @ w for f in feeds])
    lo, hi = stats["h"][0].range()
    assert np.isclose(lo, min(h.min(), 0), atol=1e-5) and np.isclose(hi, max(h.max(), 0), atol=1e-5)


def test_row_statistics_skip_masked_rows_and_keep_bounded_state():
    x = RNG.standard_normal((100, 4)).astype(np.float32)
    x[7, 2] = -np.inf  # an attention-mask-like row: skipped whole
    moments, hessian, sample = ChannelMoments(), Hessian(), RowSample(feeds=3, rows_per_feed=10)
    for _ in range(50):  # many feeds: the state stays one vector, one matrix, 3 x 10 rows
        for s in (moments, hessian, sample):
            s.update(x)
    finite = np.delete(x, 7, axis=0).astype(np.float64)
    assert moments.count == 50 * 99
    np.testing.assert_allclose(moments.mean_square(), (finite**2).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(hessian.h, 50 * finite.T @ finite, rtol=1e-4)
    assert sample.rows().shape == (30, 4) and np.isfinite(sample.rows()).all()
    assert len(even_rows(finite, 10)) == 10
    assert even_rows(finite, 10)[0].tolist() == finite[0].astype(np.float32).tolist()


def test_nothing_to_observe_reads_no_data():
    class Exploding:
        def get_next(self):
            raise AssertionError("read")

    assert calibrate.collect(model(), {}, Exploding()).samples == 0
