"""The pass manager: stats, fixed point, and verification that catches a wrong pass by name."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import ReluToSigmoid, model_from_text, op_types
from qcompile import PassManager, VerificationError, VerifyOptions
from qcompile.errors import PassFailedError
from qcompile.passes import make_pass
from qcompile.passmanager import DUMP_DIR_ENV, InstrumentedPass

TEXT = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[batch, 4] x) => (float[batch, 4] y) {
  c = Constant <value = float[4] {1, 2, 3, 4}> ()
  d = Add(c, c)
  a = Identity(x)
  r = Relu(a)
  y = Add(r, d)
}"""


class Crashes(ir.passes.InPlacePass):
    name = "crashes"

    def call(self, model):
        raise ValueError("boom")


def test_stats_recorded_per_pass():
    model = model_from_text(TEXT)
    passes = [make_pass("constant-folding"), make_pass("identity"), make_pass("dead-code")]
    result = PassManager(passes, verify=True)(model)
    names = [s.name for s in result.stats]
    assert names[:3] == ["constant-folding", "identity", "dead-code"]
    folding = result.stats[0]
    assert folding.modified and folding.verified and folding.rel_l2 == 0.0
    assert folding.nodes_before == 5 and folding.nodes_after < 5
    assert all(s.seconds >= 0 for s in result.stats)
    assert result.modified
    assert result.stats[-1].nodes_after == 2  # Relu, Add


def test_fixed_point_stops_early():
    model = model_from_text(TEXT)
    result = PassManager([make_pass("identity")], steps=5)(model)
    assert [s.modified for s in result.stats] == [True, False]


def test_verification_names_the_pass_that_changed_semantics():
    model = model_from_text(TEXT)
    manager = PassManager([make_pass("identity"), ReluToSigmoid()], verify=True,
                          verify_options=VerifyOptions(dims={"batch": 3}))
    with pytest.raises(VerificationError) as info:
        manager(model)
    assert "relu-to-sigmoid" in str(info.value)
    assert "rel L2" in str(info.value)
    assert info.value.exit_code == 3  # qcompile's bug, not the input's
    assert info.value.stage == "relu-to-sigmoid"


def test_wrong_pass_passes_without_verification():
    # Without verify the manager trusts the pass: this is what verify mode is for.
    model = model_from_text(TEXT)
    result = PassManager([ReluToSigmoid()], verify=False)(model)
    assert result.stats[0].verified is None


def test_crashing_pass_is_reported_by_name():
    model = model_from_text(TEXT)
    with pytest.raises(PassFailedError, match="crashes"):
        PassManager([Crashes()])(model)


def test_user_feeds_are_used_for_verification():
    model = model_from_text(TEXT)
    feeds = [{"x": np.full((2, 4), -1.0, dtype=np.float32)}]  # Relu(-1) = 0, Sigmoid(-1) = 0.27
    with pytest.raises(VerificationError):
        PassManager([ReluToSigmoid()], verify=True, verify_options=VerifyOptions(feeds=feeds))(model)


def test_end_only_verification_still_catches_a_wrong_pass():
    model = model_from_text(TEXT)
    manager = PassManager([make_pass("identity"), ReluToSigmoid()], verify=True,
                          verify_options=VerifyOptions(each_pass=False))
    with pytest.raises(VerificationError, match="all passes"):
        manager(model)


class ToUnknownCustomOp(ir.passes.InPlacePass):
    """Valid ONNX (custom domain) that no runtime here can run."""

    name = "to-unknown-op"

    def call(self, model):
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type, node.domain = "NoSuchKernel", "com.example"
                model.opset_imports["com.example"] = 1
                return ir.passes.PassResult(model, True)
        return ir.passes.PassResult(model, False)


def test_pass_producing_an_unrunnable_model_is_named():
    model = model_from_text(TEXT)
    with pytest.raises(VerificationError, match="to-unknown-op.*cannot run"):
        PassManager([ToUnknownCustomOp()], verify=True)(model)


def test_rollback_keeps_the_model_before_a_wrong_pass_and_goes_on():
    model = model_from_text(TEXT)
    manager = PassManager([ReluToSigmoid(), make_pass("identity"), make_pass("dead-code")], verify=True,
                          rollback=True, steps=2)
    result = manager(model)
    ops = [n.op_type for n in result.model.graph]
    assert "Relu" in ops and "Sigmoid" not in ops  # the wrong rewrite was undone
    assert "Identity" not in ops  # the passes after it still ran
    assert [s.name for s in result.rolled_back] == ["relu-to-sigmoid"]  # once: skipped in the second sweep
    assert "rolled back" in result.warnings()[0] and "rel L2" in result.warnings()[0]
    assert result.end_to_end is not None and result.end_to_end.worst().rel_l2 <= 1e-6


def test_rollback_undoes_a_crashing_pass():
    model = model_from_text(TEXT)
    result = PassManager([Crashes(), make_pass("identity")], verify=True, rollback=True)(model)
    assert result.rolled_back[0].name == "crashes" and "ValueError: boom" in result.rolled_back[0].error
    assert "Identity" not in [n.op_type for n in result.model.graph]


def test_end_only_verification_with_rollback_finds_the_pass():
    model = model_from_text(TEXT)
    manager = PassManager([make_pass("identity"), ReluToSigmoid()], verify=True, rollback=True,
                          verify_options=VerifyOptions(each_pass=False))
    result = manager(model)
    assert [s.name for s in result.rolled_back] == ["relu-to-sigmoid"]
    assert [n.op_type for n in result.model.graph].count("Relu") == 1


class PerturbsALittle(ir.passes.InPlacePass):
    """Adds 3e-5 relative noise: beyond an exact rewrite's bound, within a fusion's stated one."""

    name = "perturbs"
    rel_l2_bound = 1e-4

    def call(self, model):
        for node in model.graph:
            if node.op_type == "Add" and node.inputs[1].const_value is not None:
                value = node.inputs[1]
                value.const_value = ir.tensor(value.const_value.numpy() * np.float32(1 + 3e-5))
                return ir.passes.PassResult(model, True)
        return ir.passes.PassResult(model, False)


def test_each_pass_is_held_to_its_own_stated_bound():
    text = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[batch, 4] x) => (float[batch, 4] y) <float[4] c = {1, 2, 3, 4}> {
  y = Add(x, c)
}"""
    ok = PassManager([PerturbsALittle()], verify=True)(model_from_text(text))
    assert ok.stats[0].verified and ok.stats[0].bound == 1e-4 and 1e-5 < ok.stats[0].rel_l2 < 1e-4
    with pytest.raises(VerificationError, match="perturbs"):  # the user's explicit tolerance wins
        PassManager([PerturbsALittle()], verify=True, verify_options=VerifyOptions(rel_l2=1e-5))(model_from_text(text))


IMAGE_TEXT = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[N, 3, H, W] x) => (float[N, 3, h, w] y) {
  scales = Constant <value = float[4] {1, 1, 32, 32}> ()
  p = MaxPool <kernel_shape = [32, 32], strides = [32, 32]> (x)
  u = Resize <mode = "nearest"> (p, , scales)
  y = Add(u, x)
}"""


def test_feed_search_finds_sizes_on_which_the_original_runs():
    # The model only runs when H and W are multiples of 32 (pool by 32, upsample by 32, add):
    # the default size 16 fails, 224 fits.
    model = model_from_text(IMAGE_TEXT)
    result = PassManager([make_pass("identity")], verify=True)(model)
    assert result.feeds == "image 224x224"


def test_original_that_runs_on_no_size_tried_is_the_inputs_fault():
    from qcompile.errors import InputModelError

    text = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) {
  c = Constant <value = float[1, 3, 1, 5] {1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5}> ()
  y = Add(x, c)
}"""
    with pytest.raises(InputModelError, match="did not run.*--dim") as info:
        PassManager([make_pass("identity")], verify=True)(model_from_text(text))
    assert info.value.exit_code == 2


def test_end_only_verification_restarts_from_the_original_when_a_pass_crashes():
    model = model_from_text(TEXT)
    result = PassManager([make_pass("identity"), Crashes()], verify=True, rollback=True,
                         verify_options=VerifyOptions(each_pass=False))(model)
    assert [s.name for s in result.rolled_back] == ["crashes"]
    assert "Identity" not in [n.op_type for n in result.model.graph]


def test_fp16_outputs_are_held_to_their_resolution_not_below_it():
    from qcompile.passmanager import output_bound

    assert output_bound(1e-5, "float16") == 1e-3 and output_bound(1e-5, "float32") == 1e-5
    assert output_bound(1e-2, "float16") == 1e-2  # a looser stated bound still applies


def test_passes_run_wrapped_in_onnx_irs_own_pass_manager(monkeypatch):
    seen = []
    call = ir.passes.PassManager.call

    def spy(self, model):
        seen.append((self.steps, self.early_stop, list(self.passes)))
        return call(self, model)

    monkeypatch.setattr(ir.passes.PassManager, "call", spy)
    passes, final = [make_pass("identity"), make_pass("dead-code")], [make_pass("clear-shapes")]
    result = PassManager(passes, steps=3, finalize=final)(model_from_text(TEXT))
    (steps, early_stop, sweep), (once, _, last) = seen  # the sweeps, then the finalize passes
    assert (steps, early_stop, once) == (3, True, 1)
    assert all(isinstance(p, InstrumentedPass) for p in sweep + last)
    assert [p.inner for p in sweep] == passes and [p.inner for p in last] == final
    assert all(p.in_place == p.inner.in_place and p.changes_input == p.inner.changes_input for p in sweep + last)
    assert [s.name for s in result.stats] == ["identity", "dead-code", "identity", "dead-code", "clear-shapes"]


class ChangesTwice(ir.passes.InPlacePass):
    """Reports a change on its first two runs and none after: the third sweep finds the fixed point."""

    name = "changes-twice"

    def __init__(self):
        self.calls = 0

    def call(self, model):
        self.calls += 1
        return ir.passes.PassResult(model, self.calls <= 2)


def test_early_stop_at_a_fixed_point_counts_the_sweeps(monkeypatch):
    sweeps = []
    sweep = ir.passes.Sequential.call  # onnx-ir's PassManager runs one sweep per call of it
    monkeypatch.setattr(ir.passes.Sequential, "call", lambda self, model: sweeps.append(self) or sweep(self, model))
    counter = ChangesTwice()
    result = PassManager([counter], steps=5)(model_from_text(TEXT))
    assert counter.calls == 3 and len(sweeps) == 3
    assert [s.modified for s in result.stats] == [True, True, False] and result.modified
    bounded = ChangesTwice()
    result = PassManager([bounded], steps=2)(model_from_text(TEXT))  # steps bound the sweeps
    assert bounded.calls == 2 and [s.modified for s in result.stats] == [True, True]


def test_dump_dir_gets_one_loadable_file_per_pass_that_changed_the_model(tmp_path):
    passes = [make_pass("identity"), make_pass("constant-folding"), make_pass("dead-code")]
    result = PassManager(passes, steps=2, dump_dir=tmp_path / "dumps")(model_from_text(TEXT))
    changed = [(i, s) for i, s in enumerate(result.stats) if s.modified]
    assert len(changed) >= 2 and len(result.stats) > len(changed)
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == [f"{i:02d}-{s.name}.onnx" for i, s in changed]
    for i, s in changed:
        proto = onnx.load(tmp_path / "dumps" / f"{i:02d}-{s.name}.onnx")
        onnx.checker.check_model(proto, full_check=True)
        assert len(proto.graph.node) == s.nodes_after


def test_dump_dir_from_the_environment_and_off_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(DUMP_DIR_ENV, raising=False)
    assert PassManager([make_pass("identity")]).dump_dir is None
    monkeypatch.setenv(DUMP_DIR_ENV, str(tmp_path))
    PassManager([make_pass("identity")])(model_from_text(TEXT))
    assert [p.name for p in tmp_path.iterdir()] == ["00-identity.onnx"]


def test_errors_reach_the_caller_as_raised_not_wrapped_in_onnx_irs_pass_error():
    with pytest.raises(PassFailedError) as info:
        PassManager([make_pass("identity"), Crashes()], steps=3)(model_from_text(TEXT))
    assert not isinstance(info.value, ir.passes.PassError)
    assert info.value.what == "pass 'crashes' crashed: ValueError: boom" and info.value.stage == "crashes"


def test_rollback_of_an_in_place_pass_restores_the_same_model_object():
    model = model_from_text(TEXT)
    result = PassManager([ReluToSigmoid(), make_pass("identity")], verify=True, rollback=True)(model)
    assert result.model is model  # onnx-ir's in-place contract holds through the rollback
    assert "Relu" in op_types(model) and "Sigmoid" not in op_types(model) and "Identity" not in op_types(model)


class FunctionalReluToSigmoid(ir.passes.FunctionalPass):
    name = "functional-relu-to-sigmoid"

    def call(self, model):
        return ReluToSigmoid().call(model.clone())


def test_functional_passes_keep_meta_and_are_rolled_back_and_skipped():
    model = model_from_text(TEXT)
    model.meta["qcompile.test"] = "kept"
    passes = [FunctionalReluToSigmoid(), ir.passes.functionalize(make_pass("identity"))]
    result = PassManager(passes, verify=True, rollback=True, steps=2)(model)
    assert [s.name for s in result.rolled_back] == ["functional-relu-to-sigmoid"]  # skipped in sweep 2
    assert [s.modified for s in result.stats] == [False, True, False]
    assert result.model is not model and result.model.meta["qcompile.test"] == "kept"
    assert "Relu" in op_types(result.model) and "Identity" not in op_types(result.model)


def _saturated_detector(gain: float = 300.0, offset: float = 100.0, beta: float = -15.0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Sigmoid where the BN cancels a large mean (``offset``: x = 100 +
    noise) and scales the rest by ``gain``: every output is a saturated sigmoid (< 1e-6), so float
    rounding alone moves it by a large relative amount (a detector that sees nothing in its feeds)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).uniform(0.5, 1.5, (8, 4, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(8, np.float32), "g"),
             numpy_helper.from_array(np.full(8, beta, np.float32), "b"),
             numpy_helper.from_array((offset * w.sum(axis=(1, 2, 3))).astype(np.float32), "m"),
             numpy_helper.from_array(np.full(8, 1.0 / gain**2, np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["z"], epsilon=1e-12),
             helper.make_node("Sigmoid", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_pass_is_held_to_the_models_own_float_noise_not_below_it():
    """PP-OCRv5's detector on random feeds: its BatchNorm fold moves the (saturated) output by 5 %
    rel L2, and so does ORT's own fold of the same graph. A bound below that noise means nothing:
    the fold is kept, with the noise it was measured against; a wrong pass is still caught."""
    from qcompile.passmanager import float_noise

    feeds = [{"x": (100 + np.random.default_rng(1).normal(0, 1e-3, (1, 4, 8, 8))).astype(np.float32)}]
    options = VerifyOptions(feeds=feeds, each_pass=True)
    result = PassManager([make_pass("fuse-batchnorm")], verify=True, rollback=True,
                         verify_options=options)(ir.from_proto(_saturated_detector()))
    stat = result.stats[0]
    assert stat.modified and stat.verified and not stat.rolled_back
    assert stat.rel_l2 > stat.bound  # missed the pass's own bound ...
    assert stat.float_noise is not None and stat.rel_l2 <= 2.0 * stat.float_noise  # ... not the model's noise
    assert "BatchNormalization" not in op_types(result.model)
    # the same graph, better conditioned: the noise is float rounding and the bound decides alone
    from qcompile.passmanager import run_feeds

    calm = ir.from_proto(_saturated_detector(gain=1.0, offset=0.0, beta=0.0))
    normal = [{"x": np.random.default_rng(1).normal(size=(1, 4, 8, 8)).astype(np.float32)}]
    noise = float_noise(calm, normal, run_feeds(calm, normal))
    assert noise["y"] < 1e-5
    wrong = [{"x": np.full((2, 4), -1.0, dtype=np.float32)}]  # a wrong pass is far above any float noise
    with pytest.raises(VerificationError, match="relu-to-sigmoid.*ORT's own optimizations move it by"):
        PassManager([ReluToSigmoid()], verify=True, verify_options=VerifyOptions(feeds=wrong))(model_from_text(TEXT))
