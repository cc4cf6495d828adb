"""The one orchestrator: qcompile.quantize and the CLI are thin layers over Pipeline, every recipe
kind gives the same Result with one phase clock, the checks and the speed guard."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
from click.testing import CliRunner

import qcompile
from conftest import floats, model_from_text
from qcompile.calibration import IterableReader
from qcompile.cli import main

RNG = np.random.default_rng(0)
HIDDEN = 128


def block() -> "qcompile.ir.Model":
    w1 = floats(RNG.standard_normal(HIDDEN * HIDDEN) * 0.1)
    w2 = floats(RNG.standard_normal(HIDDEN * HIDDEN) * 0.1)
    return model_from_text(f"""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[1, 8, {HIDDEN}] x) => (float[1, 8, {HIDDEN}] y)
      <float[{HIDDEN}, {HIDDEN}] w1 = {{{w1}}}, float[{HIDDEN}, {HIDDEN}] w2 = {{{w2}}}> {{
      h = MatMul(x, w1)
      r = Relu(h)
      o = MatMul(r, w2)
      y = Add(o, x)
    }}""")


def calib(n: int = 8) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 8, HIDDEN)).astype(np.float32)} for _ in range(n)]


def test_api_and_cli_write_the_same_bytes(tmp_path):
    model_path, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    qcompile.save(block(), model_path)
    np.savez(data, x=np.stack([f["x"] for f in calib()]))
    result = qcompile.quantize(str(model_path), IterableReader(calib()), recipe="int8", target="onnx-qdq",
                               verify_options=qcompile.VerifyOptions(each_pass=False, feeds=calib(2)))
    assert result.recipe.target == "onnx-qdq"  # the recorded recipe reproduces the run
    api = tmp_path / "api.onnx"
    qcompile.save(result.model, api)
    cli = tmp_path / "cli.onnx"
    done = CliRunner().invoke(main, ["quantize", str(model_path), "-o", str(cli), "--target", "onnx-qdq",
                                     "--calib", str(data), "--runs", "1", "--json"])
    assert done.exit_code == 0, done.output
    assert hashlib.sha256(api.read_bytes()).digest() == hashlib.sha256(cli.read_bytes()).digest()
    report = json.loads(done.stdout)
    assert report["kind"] == "static-int8" and report["target"] == "onnx-qdq"
    assert report["recipe"]["target"] == "onnx-qdq"


def test_every_recipe_kind_gives_one_result_with_phases_checks_and_the_speed_guard():
    for recipe in ("int8", "w8-weight-only"):
        started = time.perf_counter()
        result = qcompile.quantize(block(), IterableReader(calib()), recipe=recipe, guard_runs=2,
                                   include_lm_head=True if recipe != "int8" else None)
        wall = time.perf_counter() - started
        assert isinstance(result, qcompile.Result)
        assert result.kind == ("static-int8" if recipe == "int8" else "weight-only")
        for phase in ("load", "reference", "optimize", "lower", "check", "speed_guard"):
            assert phase in result.phase_seconds, (recipe, result.phase_seconds)
        assert abs(sum(result.phase_seconds.values()) - wall) < 0.25 * wall + 0.2  # the phases cover the run
        assert result.latency is not None and result.latency["results"][1]["speedup_vs_baseline"] > 0
        assert result.accuracy.worst().sqnr_db > 20  # checked against the float model before it is returned
        assert set(result.to_json()) >= {"kind", "target", "phase_seconds", "phase_peak_rss_mb", "accuracy_vs_float"}
