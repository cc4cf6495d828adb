"""Comparison metrics against hand-computed values; the timing harness statistics; specs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import model_from_text
from qcompile import specs
from qcompile.errors import InputSpecError
from qcompile.metrics import OutputComparison, compare_outputs
from qcompile.runtimes.timing import ratios, summarize, time_side_by_side


def test_metrics_match_numpy_reference():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10)).astype(np.float32)
    cand = ref + rng.standard_normal((4, 10)).astype(np.float32) * 0.1
    cand[0] = ref[0]
    out = OutputComparison("y")
    out.add(ref, cand)
    a, b = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    assert out.max_abs == pytest.approx(np.max(np.abs(a - b)))
    assert out.rel_l2 == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a))
    assert out.cosine == pytest.approx(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert out.sqnr_db == pytest.approx(10 * math.log10((a @ a) / ((a - b) @ (a - b))))
    assert out.top1 == pytest.approx(np.mean(np.argmax(ref, -1) == np.argmax(cand, -1)))


def test_metrics_accumulate_over_samples():
    ref = [np.array([1.0, 0.0]), np.array([0.0, 2.0])]
    cand = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    result = compare_outputs(({"y": r}, {"y": c}) for r, c in zip(ref, cand))
    y = result.outputs["y"]
    assert y.samples == 2
    assert y.rel_l2 == pytest.approx(math.sqrt(1.0 / 5.0))
    assert y.max_abs == 1.0


def test_identical_and_mismatched_outputs():
    same = OutputComparison("y")
    same.add(np.ones(3), np.ones(3))
    assert same.rel_l2 == 0.0 and same.sqnr_db == math.inf and same.cosine == pytest.approx(1.0)
    shape = OutputComparison("y")
    shape.add(np.ones(3), np.ones(4))
    assert shape.rel_l2 == math.inf and shape.shape_mismatch
    nan = OutputComparison("y")
    nan.add(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    assert nan.nonfinite_mismatch == 1 and nan.rel_l2 == math.inf
    both_inf = OutputComparison("y")
    both_inf.add(np.array([1.0, -np.inf]), np.array([1.0, -np.inf]))
    assert both_inf.rel_l2 == 0.0


def test_timing_summary_statistics():
    result = summarize("x", [0.001, 0.002, 0.003, 0.004, 0.010], warmup=1, items_per_run=2)
    assert result.min_ms == pytest.approx(1.0) and result.median_ms == pytest.approx(3.0)
    assert result.mean_ms == pytest.approx(4.0) and result.p90_ms == pytest.approx(10.0)
    assert result.throughput == pytest.approx(2 / 0.003)


def test_side_by_side_interleaves_and_counts():
    calls = []
    results = time_side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=4, warmup=1)
    assert calls.count("a") == 5 and calls.count("b") == 5
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rotation: who goes first alternates
    assert results["a"].runs == 4
    assert set(ratios(results, "a")) == {"a", "b"} and ratios(results, "a")["a"] == 1.0


def test_random_feed_respects_specs_and_overrides():
    model = model_from_text("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, float[batch, 3] f) => (float[batch, seq, 4] y)
      <float[50, 4] table = {FILL}> {
      y = Gather(table, input_ids)
    }""".replace("FILL", ", ".join(["0.5"] * 200)))
    input_specs = specs.input_specs(model)
    ids = next(s for s in input_specs if s.name == "input_ids")
    assert ids.int_high == 50
    feed = specs.random_feed(input_specs, seed=3, dims={"seq": 7}, batch=2)
    assert feed["input_ids"].shape == (2, 7) and feed["input_ids"].max() < 50
    assert (feed["attention_mask"] == 1).all() and feed["f"].shape == (2, 3)
    again = specs.random_feed(input_specs, seed=3, dims={"seq": 7}, batch=2)
    assert all(np.array_equal(feed[k], again[k]) for k in feed)
    specs.validate_feed(input_specs, feed)
    bad = dict(feed, f=feed["f"].astype(np.float64))
    with pytest.raises(InputSpecError, match="'f'.*dtype"):
        specs.validate_feed(input_specs, bad)
    with pytest.raises(InputSpecError, match="lacks input 'f'"):
        specs.validate_feed(input_specs, {k: v for k, v in feed.items() if k != "f"})
    with pytest.raises(InputSpecError, match="NAME=POSITIVE_INT"):
        specs.parse_dims(["seq"])
