"""End to end on real models: `qcompile demo`, and SmolLM2 optimized with verification."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import qcompile
from qcompile.bench import BenchSettings, bench_models


def test_demo_runs_and_reports(tmp_path, minilm_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qcompile", "demo", "--out-dir", str(tmp_path / "demo"), "--runs", "3", "--json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    fp32, optimized, int8 = report["rows"]
    assert optimized["nodes"] < fp32["nodes"]
    assert report["worst_pass_rel_l2"] <= 1e-5
    assert optimized["r_at_1"] == pytest.approx(fp32["r_at_1"], abs=0.002)
    assert int8["r_at_1"] >= 0.390 and int8["embedding_cosine"] >= 0.99
    assert report["quantization"]["plan"]["quantized_nodes"] >= 20
    assert (tmp_path / "demo" / "minilm.int8.onnx").is_file()
    gate = report["gate"]  # the demo ends with a gate: INT8 vs FP32 cosine on held-out sentences
    cosine = next(c for c in gate["checks"] if c["name"] == "cosine drop")
    assert cosine["passed"] and 0 < cosine["value"] < 0.01 and gate["score"]["samples"] == 16
    assert any(c["name"] == "latency ratio" for c in gate["checks"])
    html = (tmp_path / "demo" / "report.html").read_text()
    assert gate["report"].endswith("report.html") and html.count("data:image/png;base64,") >= 2


@pytest.mark.slow
def test_smollm2_optimize_verified_fewer_nodes(tmp_path):
    from qcompile.models import cached_export, smollm2

    source = cached_export(smollm2.ENTRY)
    result = qcompile.optimize_with_stats(source, verify=True)
    assert result.stats[-1].nodes_after < result.stats[0].nodes_before
    assert max(s.rel_l2 or 0.0 for s in result.stats) <= 1e-5
    out = tmp_path / "smollm2.opt.onnx"
    qcompile.save(result.model, out)
    # Both run on the same feed; the speed ratio itself is measured by tools/bench_optimize.py.
    report = bench_models([source, out], BenchSettings(runs=2, warmup=1, dims={"batch": 1, "sequence": 32}))
    assert len(report["results"]) == 2
