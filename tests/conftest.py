"""Shared helpers: tiny models from ONNX text, ORT runs, and zoo exports cached outside git."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest


class ReluToSigmoid(ir.passes.InPlacePass):
    """A deliberately wrong pass: it changes what the model computes (for verification tests)."""

    name = "relu-to-sigmoid"

    def call(self, model):
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"
                return ir.passes.PassResult(model, True)
        return ir.passes.PassResult(model, False)


def model_from_text(text: str) -> ir.Model:
    """An onnx-ir model from ONNX textual syntax, checked first."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def run_ort(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def floats(values) -> str:
    """Comma-separated floats for ONNX text tensor literals."""
    return ", ".join(f"{float(v):.6f}" for v in np.ravel(values))


@pytest.fixture(scope="session")
def minilm_path():
    from qcompile.models import cached_export, minilm

    return cached_export(minilm.ENTRY)


@pytest.fixture(scope="session")
def digits_path():
    from qcompile.models import cached_export, digits_cnn

    return cached_export(digits_cnn.ENTRY)


@pytest.fixture
def int8_kernels_win(monkeypatch):
    """The ort-cpu kernel probe as on a CPU where every INT8 kernel beats FP32, for tests about the
    graph qcompile writes rather than this CPU's kernels (on a Zen 2, INT8 Conv is 0.8x FP32 and the
    policy rightly keeps every Conv float)."""
    from qcompile.targets.ort_cpu import kernel_probe

    monkeypatch.setattr(kernel_probe, "probe",
                        lambda **_: {case.op_class: 1.5 for case in kernel_probe.PROBE_CASES})
