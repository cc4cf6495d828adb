"""A JSON-ready summary of a model: opsets, inputs/outputs, op histogram, parameters, bytes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir

from qcompile import specs
from qcompile.passmanager import count_nodes


def summarize(model: ir.Model, path: str | Path | None = None) -> dict:
    """Everything `qcompile inspect` reports, as plain JSON types."""
    ops = Counter(
        f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    initializers = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    external = [t for t in initializers if isinstance(t, ir.ExternalTensor)]
    return {
        "path": str(path) if path else None,
        "ir_version": model.ir_version,
        "producer": " ".join(filter(None, [model.producer_name, model.producer_version])) or None,
        "opsets": {domain or "ai.onnx": version for domain, version in sorted(model.opset_imports.items())},
        "inputs": [s.to_json() for s in specs.input_specs(model)],
        "outputs": [
            {
                "name": v.name,
                "dtype": str(v.dtype.numpy()) if v.dtype is not None else None,
                "shape": [d if isinstance(d, int) else (d.value if d is not None else None) for d in (v.shape or [])]
                if v.shape is not None else None,
            }
            for v in model.graph.outputs
        ],
        "nodes": count_nodes(model),
        "op_histogram": dict(ops.most_common()),
        "initializers": len(initializers),
        "parameters": int(sum(t.size for t in initializers)),
        "initializer_bytes": int(sum(t.nbytes for t in initializers)),
        "external_data": {
            "tensors": len(external),
            "bytes": int(sum(t.nbytes for t in external)),
            "files": sorted({str(t.location) for t in external}),
        },
    }
