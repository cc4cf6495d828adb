"""Zoo entries on real data, and the FP32 pipeline on real exports."""

from __future__ import annotations

import numpy as np
import pytest

import qcompile
from qcompile.bench import BenchSettings, bench_models
from qcompile.models import ZOO, cached_export, get_entry, minilm


def test_minilm_optimized_is_verified_smaller_and_keeps_retrieval(minilm_path, tmp_path):
    result = qcompile.optimize_with_stats(minilm_path, verify=True)
    stats = result.stats
    assert stats[-1].nodes_after < stats[0].nodes_before * 0.7
    assert all(s.verified in (True, None) for s in stats)
    assert max(s.rel_l2 or 0.0 for s in stats) <= 1e-5
    ops = {n.op_type for n in result.model.graph}
    assert "Gelu" in ops and "LayerNormalization" in ops and "Erf" not in ops
    out = tmp_path / "minilm.opt.onnx"
    qcompile.save(result.model, out)
    scores = minilm.evaluate(out, reference=minilm_path)
    assert scores["pairs"] == 748
    assert scores["r_at_1"] == pytest.approx(0.3997, abs=0.002)
    assert scores["embedding_cosine"] > 0.99999


def test_minilm_calibration_reader_follows_ort_protocol():
    reader = minilm.ENTRY.calibration(3)
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    assert len(feeds) == 3
    assert set(feeds[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert feeds[0]["input_ids"].dtype == np.int64 and feeds[0]["input_ids"].shape[0] == 1


def test_digits_cnn_trains_deterministically_and_bn_folds(digits_path, tmp_path):
    scores = get_entry("digits_cnn").evaluate(digits_path)
    assert scores["top1"] >= 0.97
    model = qcompile.optimize(digits_path, verify=True)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph)
    out = tmp_path / "digits.opt.onnx"
    qcompile.save(model, out)
    assert get_entry("digits_cnn").evaluate(out)["top1"] == scores["top1"]


def test_resnet18_random_weights_flagged_and_optimizes(tmp_path):
    entry = ZOO["resnet18"]
    assert not entry.real_weights and "RANDOM" in entry.description
    assert entry.evaluate("unused") == {}
    path = cached_export(entry)
    result = qcompile.optimize_with_stats(path, verify=True, verify_options=qcompile.VerifyOptions(samples=1))
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph)
    assert result.stats[-1].nodes_after < result.stats[0].nodes_before


def test_gpt_synth_width_depth_options(tmp_path):
    entry = ZOO["gpt_synth"]
    path = cached_export(entry, {"width": 64, "depth": 1, "heads": 2, "vocab": 256})
    model = qcompile.load(path)
    from qcompile.models.gpt_synth import param_count

    params = sum(v.const_value.size for v in model.graph.initializers.values())
    expected = param_count(width=64, depth=1, vocab=256, max_seq=1024)
    assert abs(params - expected) / expected < 0.01
    report = bench_models([path], BenchSettings(runs=2, warmup=1, dims={"batch": 1, "sequence": 16}))
    assert report["results"][0]["runs"] == 2
