"""`qcompile gate`: exit codes on passing, failing and broken pairs; JSON and JUnit read back; metrics."""

from __future__ import annotations

import json
import math
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

import qcompile
from conftest import model_from_text
from qcompile.cli import main
from qcompile.evaluators import parse_metric, score_models


def _linear(scale: float) -> str:
    weights = ", ".join(f"{scale * ((i * 7) % 11 - 5) / 5:.4f}" for i in range(32))
    return f"""
<ir_version: 9, opset_import: ["" : 17]>
g (float[batch, 8] x) => (float[batch, 4] y, float[batch, 4] z) {{
  w = Constant <value = float[8, 4] {{{weights}}}> ()
  m = MatMul(x, w)
  y = Relu(m)
  z = Sigmoid(m)
}}"""


@pytest.fixture()
def pair(tmp_path):
    """(reference, same model, a candidate with 1 % larger weights, feeds file)."""
    paths = {}
    for name, scale in (("ref", 1.0), ("same", 1.0), ("off", 1.01)):
        paths[name] = tmp_path / f"{name}.onnx"
        qcompile.save(model_from_text(_linear(scale)), paths[name])
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(6, 2, 8)).astype(np.float32))
    return paths["ref"], paths["same"], paths["off"], data


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_identical_pair_passes_with_json(pair):
    ref, same, _, data = pair
    result = invoke("gate", ref, same, "--data", data, "--metric", "cosine", "--max-drop", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["score"]["reference"] == 1.0 and report["score"]["samples"] == 6
    assert report["score"]["candidate"] == pytest.approx(1.0, abs=1e-12)


def test_failing_pair_exits_1_and_junit_reads_back(pair, tmp_path):
    ref, _, off, data = pair
    junit, html = tmp_path / "gate.xml", tmp_path / "gate.html"
    result = invoke("gate", ref, off, "--data", data, "--metric", "rel_l2:y", "--max", "1e-3",
                    "--junit", junit, "--report", html)
    assert result.exit_code == 1
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "1" and suite.get("failures") == "1"
    case = suite.find("testcase")
    assert case.find("failure") is not None and "rel_l2:y" in case.get("name")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    # the output scales with the weights (Relu is positively homogeneous): rel L2 is exactly the 1 % change
    assert float(props["candidate_value"]) == pytest.approx(0.01, rel=1e-3)
    assert "FAIL" in html.read_text()


def test_latency_ratio_check_is_reported(pair):
    ref, same, _, data = pair
    result = invoke("gate", ref, same, "--data", data, "--metric", "cosine", "--max-latency-ratio", "100",
                    "--runs", "3", "--json")
    assert result.exit_code == 0
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["latency ratio"]["passed"] and checks["latency ratio"]["value"] > 0


@pytest.mark.parametrize("broken", ["missing", "inputs", "garbage"])
def test_broken_pairs_exit_2(pair, tmp_path, broken):
    ref, _, _, data = pair
    cand = tmp_path / "broken.onnx"
    if broken == "inputs":  # a candidate that takes other inputs than the data holds
        qcompile.save(model_from_text(_linear(1.0).replace("float[batch, 8] x", "float[batch, 8] other")
                                      .replace("MatMul(x, w)", "MatMul(other, w)")), cand)
    elif broken == "garbage":
        cand.write_bytes(b"not an onnx file")
    result = invoke("gate", ref, cand, "--data", data, "--metric", "cosine", "--max-drop", "0.01")
    assert result.exit_code == 2


def test_usage_errors_exit_2(pair):
    ref, same, _, data = pair
    assert invoke("gate", ref, same, "--data", data, "--metric", "sqnr", "--max-drop", "0.1").exit_code == 2
    assert invoke("gate", ref, same, "--data", data, "--metric", "nonsense").exit_code == 2
    assert invoke("gate", ref, same, "--metric", "cosine").exit_code == 2  # no data


def test_user_metric_and_its_direction(pair, tmp_path, monkeypatch):
    ref, _, off, data = pair
    (tmp_path / "my_metric.py").write_text(textwrap.dedent("""
        import numpy as np
        def gap(ref, cand, feed):
            return float(np.max(np.abs(ref["z"] - cand["z"])))
        gap.higher_is_better = False
    """))
    monkeypatch.chdir(tmp_path)
    metric = parse_metric("my_metric:gap")
    assert metric.kind == "user" and not metric.higher_is_better
    feeds = [{"x": np.ones((1, 8), np.float32)}]
    score = score_models(metric, ref, off, feeds)
    assert score.reference == 0.0 and score.candidate > 0
    assert invoke("gate", ref, off, "--data", data, "--metric", "my_metric:gap", "--max", "1.0").exit_code == 0
    assert invoke("gate", ref, off, "--data", data, "--metric", "my_metric:gap", "--max", "1e-9").exit_code == 1


def test_perplexity_matches_a_direct_computation(tmp_path):
    """A bigram 'LM' (logits = one-hot embedding rows @ table): perplexity by hand equals the metric's."""
    vocab = 5
    table = np.round(np.random.default_rng(1).normal(size=(vocab, vocab)), 6).astype(np.float32)  # as printed
    text = f"""
<ir_version: 9, opset_import: ["" : 17]>
g (int64[1, seq] input_ids) => (float[1, seq, {vocab}] logits) {{
  t = Constant <value = float[{vocab}, {vocab}] {{{", ".join(f"{v:.6f}" for v in table.ravel())}}}> ()
  logits = Gather <axis = 0> (t, input_ids)
}}"""
    path = tmp_path / "lm.onnx"
    qcompile.save(model_from_text(text), path)
    ids = np.array([[0, 3, 1, 4, 2, 2, 0]], dtype=np.int64)
    score = score_models(parse_metric("perplexity"), path, path, [{"input_ids": ids}])
    rows = table.astype(np.float64)[ids[0, :-1]]
    log_probs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
    expected = math.exp(-np.mean(log_probs[np.arange(len(rows)), ids[0, 1:]]))
    assert score.reference == pytest.approx(expected, rel=1e-9) and score.candidate == score.reference
    assert score.drop == 0.0


def test_drop_definitions():
    cosine, rel, ppl = parse_metric("cosine"), parse_metric("rel_l2"), parse_metric("perplexity")
    assert cosine.drop(1.0, 0.99) == pytest.approx(0.01)
    assert rel.drop(0.0, 0.02) == pytest.approx(0.02)  # reference 0: the difference itself
    assert ppl.drop(10.0, 10.5) == pytest.approx(0.05) and ppl.drop(10.0, 9.0) == pytest.approx(-0.1)
    assert parse_metric("sqnr").drop(math.inf, 30.0) is None
    assert cosine.drop(1.0, math.nan) == math.inf
