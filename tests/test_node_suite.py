"""ONNX's own operator suite (the node cases in the onnx wheel, and its PyTorch-exported and simple
model folders) through optimize and quantize.

One run of tools/node_suite.py over every case (two worker processes, one ORT thread each), then:
optimize changes no runnable case and crashes on none, refusals are at most 1 % and each has a
reason; every case with a float Conv/ConvTranspose/MatMul/Gemm quantizes to a model that runs and
stays within the INT8 rounding-noise bound stated in the tool (QUANT_MARGIN).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import node_suite  # noqa: E402

#: Quantize refusals that are known qcompile bugs outside the FP32 passes (see the reasons).
# Batched (rank > 2) MatMul weights were refused until they got per-tensor scales (ORT's fused
# MatMulIntegerToFloat takes only a scalar zero point for a batched B): no known refusal is left.
KNOWN_QUANT_REFUSALS: dict[str, str] = {}


def _listed(items) -> str:
    return "\n".join(f"  {i.name} ({getattr(i, 'variant', '')}): {i.detail}" for i in items)


@pytest.fixture(scope="module")
def suite() -> node_suite.SuiteResult:
    return node_suite.run_suite(node_suite.load_cases(suites=node_suite.SUITES), quantize=True, jobs=2, threads=1)


def test_the_suite_is_there(suite):
    totals = suite.totals()
    assert totals["runnable"] >= 1400, totals  # ORT refusing everything would make the rest vacuous
    assert len({q.name for q in suite.quant}) >= 100
    folders = [c for c in suite.cases if "/" in c.name and c.status != "not-runnable"]
    assert len(folders) >= 90  # pytorch-converted, pytorch-operator, simple


def test_sequence_folding_writes_only_what_the_opset_has():
    # simple/test_sequence_model5 and 8 (opset 12): onnxscript's SplitToSequence / ConcatFromSequence
    # rewrites wrote Split and Unsqueeze with opset 13's inputs; constant-folding was refused (exit 3).
    cases = node_suite.load_cases("simple/test_sequence_model[58]", suites=("simple",))
    assert len(cases) == 2
    suite = node_suite.run_suite(cases, quantize=False)
    assert [c.status for c in suite.cases] == ["ok", "ok"], _listed(suite.cases)


def test_optimize_changes_and_crashes_on_no_case(suite):
    assert not suite.by_status("changed"), "outputs changed:\n" + _listed(suite.by_status("changed"))
    assert not suite.by_status("crashed"), "crashed:\n" + _listed(suite.by_status("crashed"))


def test_refusals_are_few_and_each_has_a_reason(suite):
    refused = suite.by_status("refused")
    print("refused:\n" + _listed(refused))
    assert len(refused) <= 0.01 * suite.totals()["runnable"], _listed(refused)
    assert all(r.detail for r in refused)


def test_quantized_models_run_and_stay_within_the_int8_bound(suite):
    bad = [q for q in suite.quant if q.status in ("failed", "crashed", "error")]
    assert not bad, "quantize:\n" + _listed(bad)
    frozen = [q for q in suite.quant if q.variant == "frozen-weights" and q.quantized_nodes]
    assert len(frozen) >= 30  # the INT8 path is exercised, not only models left float
    assert all(q.ratio is not None and q.ratio <= node_suite.QUANT_MARGIN for q in frozen)


def test_quantize_refuses_only_known_cases(suite):
    refused = [q for q in suite.quant if q.status == "refused"]
    unknown = [q for q in refused if q.name not in KNOWN_QUANT_REFUSALS]
    assert not unknown, "quantize refused:\n" + _listed(unknown)


def test_quantize_refuses_no_case(suite):
    refused = [q for q in suite.quant if q.status == "refused"]
    assert not refused, _listed(refused)
