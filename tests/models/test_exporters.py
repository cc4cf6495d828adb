"""Both torch exporters: MiniLM exported by TorchScript (opset 17) and by dynamo (opset 18) goes
through the W8A8 + SmoothQuant recipe with every projection in INT8, attention scores, Softmax and
normalisations in float, and keeps its retrieval quality."""

from __future__ import annotations

import pytest

import qcompile
from conftest import op_types
from qcompile.models import cached_export, minilm
from qcompile.recipes import preset, run_recipe


@pytest.mark.parametrize("exporter, opset", [("torchscript", 17), ("dynamo", 18)])
def test_minilm_w8a8_smoothquant_from_both_exporters(exporter, opset, tmp_path):
    path = cached_export(minilm.ENTRY, {"exporter": exporter})
    fp32 = qcompile.load(path)
    assert fp32.opset_imports[""] == opset
    result = run_recipe(path, preset("w8a8-smoothquant"), minilm.ENTRY.calibration(64))
    out = tmp_path / "minilm.w8a8.onnx"
    qcompile.save(result.model, out)

    graph = {n.name: n for n in result.model.graph}
    quantized_matmuls = [n for n in result.plan.quantized_nodes if n in graph and graph[n].op_type == "MatMul"]
    assert len(quantized_matmuls) >= 30  # 6 layers x (Q, K, V, output, FFN in, FFN out), minus SQNR-kept ones
    for node in result.model.graph:  # what must stay float does
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert all(i is None or i.producer() is None or i.producer().op_type != "DequantizeLinear"
                       for i in node.inputs[:1]), node.name
    assert result.smoothquant and result.smoothquant["groups"] >= 6
    assert "QuantizeLinear" in op_types(result.model)

    scores = minilm.evaluate(out, reference=path)
    assert scores["r_at_1"] >= 0.390
    assert scores["embedding_cosine"] >= 0.99


@pytest.mark.slow
def test_smollm2_dynamo_export_w8a8_smoothquant_keeps_perplexity(tmp_path):
    """SmolLM2 from the dynamo exporter (opset 18): RMSNorm scales take the SmoothQuant factors and the
    W8A8 model stays within 2 % of FP32 perplexity (the TorchScript export is in tools/bench_llm.py)."""
    from qcompile.models import smollm2

    path = cached_export(smollm2.ENTRY, {"exporter": "dynamo"})
    model = qcompile.load(path)
    assert model.opset_imports[""] == 18
    fp32 = smollm2.evaluate(path)["perplexity"]
    # The tied LM head (MatMul on Transpose(lm_head.weight), a constant fold-weights folds) is kept
    # float, as it was before it could be quantized: this tests the folding, not the head in INT8.
    head = next(node.name for node in model.graph if any(v.name == "logits" for v in node.outputs))
    recipe = preset("w8a8-smoothquant").with_(samples=16, exclude=(head,)).choosing_float(min_sqnr_db=34.0)
    result = run_recipe(path, recipe, smollm2.calibration(16))  # the guard: this tests the folding, not the budget
    out = tmp_path / "smollm2.w8a8.onnx"
    qcompile.save(result.model, out)
    assert result.smoothquant["groups"] >= 60  # two RMSNorm-fed groups per layer, 30 layers
    assert len(result.plan.quantized_nodes) >= 100
    assert smollm2.evaluate(out)["perplexity"] <= 1.02 * fp32
