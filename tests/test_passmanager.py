"""The pass manager: stats, fixed point, and verification that catches a wrong pass by name."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import ReluToSigmoid, model_from_text

from qcompile import PassManager, VerificationError, VerifyOptions
from qcompile.errors import PassFailedError
from qcompile.passes import make_pass

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
    assert info.value.exit_code == 1


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
