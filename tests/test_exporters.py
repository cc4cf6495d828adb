"""Both torch exporters: MiniLM exported by TorchScript (opset 17) and by dynamo (opset 18) goes
through the W8A8 + SmoothQuant recipe with every projection in INT8, attention scores, Softmax and
normalisations in float, and keeps its retrieval quality."""

from __future__ import annotations

import pytest
from conftest import op_types

import qcompile
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
