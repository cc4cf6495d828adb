"""analyze and the accuracy budget on a model with a planted bad layer; the budget that cannot be met;
the Ray executor against the in-process one."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile import modelio, records
from qcompile.analyze import analyze, measure_layers
from qcompile.budget import BudgetSpec
from qcompile.calibration import IterableReader
from qcompile.cli import main
from qcompile.evaluators import parse_metric

WIDTH, LAYERS = 64, 4


def _mlp(path) -> None:
    """x -> (MatMul W_i, Relu) x LAYERS -> y: every layer alike, so none is worse by itself (no bias:
    MatMul + Add would fuse into a Gemm of another name)."""
    rng = np.random.default_rng(0)
    nodes, inits, last = [], [], "x"
    for i in range(LAYERS):
        inits.append(numpy_helper.from_array((rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH) * 1.4)
                                             .astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"a{i}"], name=f"layer{i}"))
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("Relu" if i < LAYERS - 1 else "Identity", [f"a{i}"], [out], name=f"act{i}"))
        last = out
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(8, WIDTH)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    path = folder / "mlp.onnx"
    _mlp(path)
    quantized = qcompile.quantize(str(path), IterableReader(_feeds(16, 1)), recipe="int8", min_sqnr_db=None)
    q_path = folder / "mlp.int8.onnx"
    modelio.save(quantized.model, q_path)
    return path, q_path, folder


def _plant(q_path, out, node: str, factor: float = 0.02) -> str:
    """A wrong (too small: clipping) scale on the Q/DQ of ``node``'s input activation; its tensor."""
    model = modelio.load(q_path)
    rec = records.read(model, str(q_path))
    tensor = next(n["activations"][0] for n in rec["nodes"] if n["node"] == node)
    dq_name = next(a["dq"] for a in rec["activations"] if a["tensor"] == tensor)
    dq = next(n for n in model.graph if n.outputs[0].name == dq_name)
    scale = dq.inputs[1]
    scale.const_value = ir_tensor(scale.const_value.numpy() * factor, scale.name)
    modelio.save(model, out)
    return tensor


def ir_tensor(array, name):
    import onnx_ir as ir

    return ir.tensor(np.asarray(array, dtype=np.float32), name=name)


def test_records_name_every_quantized_layer(mlp):
    _, q_path, _ = mlp
    rec = records.read(modelio.load(q_path), "x")
    assert sorted(n["node"] for n in rec["nodes"]) == [f"layer{i}" for i in range(LAYERS)]
    assert all(w["sqnr_db"] > 30 for w in rec["weights"])  # int8 per-channel weights: ~40 dB


def test_analyze_ranks_the_planted_layer_first(mlp):
    ref, q_path, folder = mlp
    planted = folder / "planted.onnx"
    _plant(q_path, planted, "layer2")
    feeds = _feeds(4, 7)
    layers = measure_layers(planted, ref, feeds)
    assert layers[0].node == "layer2"
    assert layers[0].local_sqnr_db < layers[1].local_sqnr_db - 10  # by far
    result = analyze(ref, planted, feeds, parse_metric("cosine"), top=2)
    first = result.layers[0]
    assert first.metric_change < 0 and first.metric_float > result.quantized_value  # float repairs it
    assert abs(result.layers[1].metric_change) < abs(first.metric_change)


def test_budget_repairs_a_planted_layer(mlp, monkeypatch):
    """A wrong scale injected into layer 2's activation parameters during quantization: the budget
    search falls back exactly that layer first, and one layer is enough."""
    ref, _, _ = mlp
    from qcompile import static_int8

    real = static_int8.shared_qparams
    planted = {}

    def wrong_scale(model, plan, ranges, scale_dtype=None):
        params = real(model, plan, ranges, scale_dtype)
        tensor = next(n.inputs[0].name for n in model.graph if n.name == "layer2")
        if tensor in params:
            import dataclasses

            params[tensor] = dataclasses.replace(params[tensor], scale=params[tensor].scale * 0.02)
            planted["tensor"] = tensor
        return params

    monkeypatch.setattr(static_int8, "shared_qparams", wrong_scale)
    # untimed (timing_runs=0): on a model this small, timings cannot tell candidates apart
    spec = BudgetSpec(parse_metric("cosine"), 0.002, _feeds(8, 3), max_trials=8, timing_runs=0)
    result = qcompile.quantize(str(ref), IterableReader(_feeds(16, 1)), recipe="int8", budget=spec)
    budget = result.budget
    assert planted and not budget.trials[0].within  # the most aggressive plan is over budget
    assert budget.met and budget.kept_float() == ["layer2"]
    assert result.plan.kept_float["layer2"] == "kept float by the accuracy budget"
    assert set(result.plan.quantized_nodes) == {"layer0", "layer1", "layer3"}


def test_impossible_budget_writes_the_closest_and_the_log(mlp, tmp_path):
    ref, _, _ = mlp
    data = tmp_path / "held.npz"
    np.savez(data, x=np.stack([f["x"] for f in _feeds(4, 5)]))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(8, 1)]))
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(ref), "-o", str(out), "--calib", str(calib),
                                       "--accuracy-budget", "0", "--budget-data", str(data), "--budget-trials", "2",
                                       "--metric", "cosine"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert not out.exists()
    closest = tmp_path / "q.closest.onnx"
    onnx.checker.check_model(str(closest))
    log = json.loads((tmp_path / "q.onnx.budget.json").read_text())
    assert not log["met"] and len(log["trials"]) == 2 and "closest" in result.output
    sqnr = CliRunner().invoke(main, ["quantize", str(ref), "-o", str(out), "--calib", str(calib),
                                     "--accuracy-budget", "0.1", "--budget-data", str(data), "--metric", "sqnr"])
    assert sqnr.exit_code == 2 and not out.exists()  # sqnr has no relative drop: a usage error


def test_ray_executor_equals_in_process(mlp, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)  # Ray workers start in the driver's folder: not the checkout, whose qcompile/ shadows
    from qcompile.executor import InProcess, RayExecutor

    ref, q_path, folder = mlp
    planted = folder / "planted-ray.onnx"
    _plant(q_path, planted, "layer1")
    feeds = _feeds(4, 9)
    local = analyze(ref, planted, feeds, parse_metric("cosine"), top=3, executor=InProcess())
    executor = RayExecutor(num_cpus=2)
    try:
        assert ray.is_initialized() and executor.parallelism == 2
        remote = analyze(ref, planted, feeds, parse_metric("cosine"), top=3, executor=executor)
    finally:
        executor.close()
    assert [layer.node for layer in remote.layers] == [layer.node for layer in local.layers]
    assert [layer.metric_change for layer in remote.layers[:3]] == pytest.approx(
        [layer.metric_change for layer in local.layers[:3]], rel=1e-9, abs=1e-12)
    assert local.layers[0].node == "layer1" and local.layers[0].metric_change < 0
    assert remote.quantized_value == pytest.approx(local.quantized_value, rel=1e-12)


def test_sweep_measures_runnable_targets_and_reports(mlp, tmp_path):
    ref, _, _ = mlp
    calib, data = tmp_path / "calib.npz", tmp_path / "held.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(8, 1)]))
    np.savez(data, x=np.stack([f["x"] for f in _feeds(4, 5)]))
    report = tmp_path / "sweep.md"
    result = CliRunner().invoke(main, ["sweep", str(ref), "int8", "w8-weight-only", "--targets", "ort-cpu,tensorrt",
                                       "--calib", str(calib), "--data", str(data), "-o", str(tmp_path / "out"),
                                       "--json", "--report", str(report)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {(r["recipe"], r["target"]): r for r in json.loads(result.stdout)["rows"]}
    assert len(rows) == 4
    for recipe in ("int8", "w8-weight-only"):
        cpu = rows[(recipe, "ort-cpu")]
        assert 0.99 < cpu["value"] <= 1.0 and cpu["latency_ms"] > 0
        onnx.checker.check_model(cpu["path"])
        assert rows[(recipe, "tensorrt")]["value"] is None and "not evaluated" in rows[(recipe, "tensorrt")]["note"]
    assert "data:image/png;base64," in report.read_text()  # the latency-vs-metric scatter


# --- the static recipes' default: a 1 % budget on samples held out of calibration ---------------------------


def test_held_out_split_lends_every_fourth_sample():
    from qcompile.calibration import HeldOutSplit

    feeds = _feeds(20, 2)
    split = HeldOutSplit(IterableReader(feeds), every=4, minimum=4, limit=16)
    passed = list(iter(split.get_next, None))
    assert split.split and len(passed) == 15 and len(split.heldout) == 5
    index = {id(f["x"]): i for i, f in enumerate(feeds)}
    assert [index[id(f["x"])] for f in split.heldout] == [3, 7, 11, 15, 19]
    assert [index[id(f["x"])] for f in passed] == [i for i in range(20) if i % 4 != 3]  # in order, none twice
    small = HeldOutSplit(IterableReader(feeds[:12]), every=4, minimum=4, limit=16)
    assert len(list(iter(small.get_next, None))) == 12 and not small.split and small.heldout == []
    capped = HeldOutSplit(IterableReader(feeds), every=4, minimum=4, limit=2)
    assert len(list(iter(capped.get_next, None))) == 18 and len(capped.heldout) == 2


def _wrong_scale_on(monkeypatch, node: str) -> dict:
    """Quantization with a wrong (clipping) activation scale on ``node``'s input; what was planted."""
    import dataclasses

    from qcompile import static_int8

    real, planted = static_int8.shared_qparams, {}

    def wrong_scale(model, plan, ranges, scale_dtype=None):
        params = real(model, plan, ranges, scale_dtype)
        tensor = next(n.inputs[0].name for n in model.graph if n.name == node)
        if tensor in params:
            params[tensor] = dataclasses.replace(params[tensor], scale=params[tensor].scale * 0.02)
            planted["tensor"] = tensor
        return params

    monkeypatch.setattr(static_int8, "shared_qparams", wrong_scale)
    return planted


def test_default_budget_chooses_what_stays_float(mlp, monkeypatch):
    """No budget asked for, 16 calibration samples: the recipe's 1 % cosine budget is measured on
    the 4 held out of calibration (12 calibrate) and repairs the planted layer; the SQNR guard,
    asked for instead, decides by its own measure and measures no budget."""
    ref, _, _ = mlp
    planted = _wrong_scale_on(monkeypatch, "layer2")
    result = qcompile.quantize(str(ref), IterableReader(_feeds(16, 1)), recipe="int8")
    assert planted and result.budget is not None and result.budget.met
    spec = result.budget.spec
    assert spec.metric.name == "cosine" and spec.max_drop == 0.01 and len(spec.feeds) == 4 and not spec.required
    assert result.calibration.samples == 12
    assert result.budget.kept_float() == ["layer2"]
    assert any("every 4th calibration sample" in note for note in result.notes)
    guard = qcompile.quantize(str(ref), IterableReader(_feeds(16, 1)), recipe="int8", min_sqnr_db=28.0)
    assert guard.budget is None and guard.calibration.samples == 16
    assert "kept float by the accuracy budget" not in guard.plan.kept_float.values()


def test_default_budget_without_data_falls_back_to_the_guard(mlp):
    """8 calibration samples are too few to lend 4: all 8 calibrate, the guard decides, and a note
    says so; random calibration data lends nothing either."""
    ref, _, _ = mlp
    result = qcompile.quantize(str(ref), IterableReader(_feeds(8, 1)), recipe="int8")
    assert result.budget is None and result.calibration.samples == 8
    assert any("accuracy budget not measured" in n and "28 dB SQNR guard" in n for n in result.notes), result.notes
    from qcompile.calibration import random_reader
    from qcompile.specs import input_specs

    reader = random_reader(input_specs(modelio.load(ref)), 4)
    rand = qcompile.quantize(str(ref), reader, recipe="int8")
    assert rand.budget is None and any("calibration data is random" in n for n in rand.notes)


def test_default_budget_cli_is_deterministic_and_writes_no_log(mlp, tmp_path):
    ref, _, _ = mlp
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(16, 1)]))
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}" / "q.onnx"
        out.parent.mkdir()
        result = CliRunner().invoke(main, ["quantize", str(ref), "-o", str(out), "--calib", str(calib), "--json"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["accuracy_budget"]["samples"] == 4 and report["accuracy_budget"]["met"]
        # the all-quantized candidate is within budget: nothing falls back, so no per-layer measurement
        assert len(report["accuracy_budget"]["trials"]) == 1 and report["accuracy_budget"]["fallback_order"] == []
        assert "path" not in report["accuracy_budget"]["trials"][0]  # a deleted temporary file: not reported
        assert report["accuracy_budget"]["layers"] == LAYERS
        assert f"0 of {LAYERS} layers kept float" in " ".join(report["notes"])
        assert report["calibration"]["samples"] == 12
        assert report["recipe"]["accuracy_budget"] == 0.01
        assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]  # no search log: not asked for
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_asked_budget_holds_out_of_a_users_calibration(mlp, tmp_path):
    """--accuracy-budget with no --budget-data: held out of the user's own calibration data, with
    the log; too few samples to lend is the user's error (exit 2, nothing written); the guard and
    the budget together are a usage error."""
    ref, _, _ = mlp
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(20, 1)]))
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(ref), "-o", str(out), "--calib", str(calib),
                                       "--accuracy-budget", "0.02", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accuracy_budget"]["samples"] == 5 and report["calibration"]["samples"] == 15
    assert json.loads((tmp_path / "q.onnx.budget.json").read_text())["met"]
    small = tmp_path / "small.npz"
    np.savez(small, x=np.stack([f["x"] for f in _feeds(8, 1)]))
    few = CliRunner().invoke(main, ["quantize", str(ref), "-o", str(tmp_path / "few.onnx"), "--calib", str(small),
                                    "--accuracy-budget", "0.02"])
    assert few.exit_code == 2 and "held-out" in few.output and not (tmp_path / "few.onnx").exists()
    both = CliRunner().invoke(main, ["quantize", str(ref), "-o", str(tmp_path / "both.onnx"), "--calib", str(calib),
                                     "--accuracy-budget", "0.02", "--min-sqnr", "30"])
    assert both.exit_code == 2 and "give one" in both.output


def test_recipe_files_write_off_for_a_choice_turned_off(tmp_path):
    from qcompile.errors import InputSpecError
    from qcompile.recipes import Recipe, preset

    guard_only = preset("int8").choosing_float(min_sqnr_db=30.0)
    assert guard_only.accuracy_budget is None and guard_only.min_sqnr_db == 30.0
    path = tmp_path / "r.toml"
    guard_only.save(path)
    assert 'accuracy_budget = "off"' in path.read_text()
    assert Recipe.load(path) == guard_only
    neither = preset("int8").choosing_float(min_sqnr_db=None, accuracy_budget=None)
    neither.save(path)
    assert Recipe.load(path) == neither
    path.write_text('accuracy_budget = "loose"\n')
    with pytest.raises(InputSpecError, match="accuracy_budget"):
        Recipe.load(path)
    preset("w4-weight-only").save(path)  # a weight-only recipe has no budget, and says so
    assert Recipe.load(path) == preset("w4-weight-only")
    path.write_text('kind = "weight-only"\nbits = 4\n')
    assert Recipe.load(path).accuracy_budget is None  # not the static recipes' default
    path.write_text('kind = "weight-only"\naccuracy_budget = 0.02\n')  # was silently ignored
    with pytest.raises(InputSpecError, match="static recipes only"):
        Recipe.load(path)


def test_a_run_failing_on_the_optimized_model_reverifies_and_calibrates_on_every_sample(mlp, monkeypatch):
    """The optimized (not yet checked) model failing on a calibration sample is qcompile's to find:
    the passes are re-verified with that sample, and calibration is redone on every sample read —
    those after the failing one included (the reader cannot be read twice)."""
    from qcompile import static_int8
    from qcompile.runtimes import BackendError

    ref, _, _ = mlp
    real, calls = static_int8.collect_ranges, []

    def failing_once(model, tensors, reader, **kwargs):
        calls.append(bool(kwargs.get("check_feeds")))
        if len(calls) == 1:
            assert calls[0], "the optimized model is unchecked here: the test needs a model the passes change"
            reader.get_next(), reader.get_next()  # two samples in, the third fails
            raise BackendError("onnxruntime failed to run: planted")
        return real(model, tensors, reader, **kwargs)

    monkeypatch.setattr(static_int8, "collect_ranges", failing_once)
    result = qcompile.quantize(str(ref), IterableReader(_feeds(10, 1)), recipe="int8", min_sqnr_db=None)
    assert len(calls) == 2 and result.calibration.samples == 10
    assert set(result.plan.quantized_nodes) == {f"layer{i}" for i in range(LAYERS)}


def test_a_budget_with_a_weight_only_recipe_is_refused_naming_the_static_ones(mlp, tmp_path):
    ref, _, _ = mlp
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(16, 1)]))
    result = CliRunner().invoke(main, ["quantize", str(ref), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                                       "--recipe", "w8-weight-only", "--accuracy-budget", "0.01"])
    assert result.exit_code == 2 and not (tmp_path / "q.onnx").exists()
    assert "choose int8, w8a8-smoothquant, fp8" in " ".join(result.output.split())
