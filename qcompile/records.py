"""What the pipeline quantized, kept in the model (metadata ``qcompile.quantization``, JSON).

``qcompile analyze`` and the accuracy-budget search match a quantized tensor with its float twin
through these records, never by guessing from names:

    activations  [{"tensor": float value (the Q input), "dq": the DQ output, "consumers": [node],
                   "scaled": bool}]     scaled: SmoothQuant divided it by s (its float twin is X / s)
    weights      [{"tensor": float initializer, "dq": the DQ output, "consumers": [node],
                   "sqnr_db": its own quantization SQNR, "scaled": bool}]
    nodes        [{"node": name, "op_type", "output": its first output, "activations": [tensor],
                   "weights": [tensor]}]

A value that kept its name through the optimize passes is the same tensor as in the input model
(passes give new values new names), so ``tensor`` names the twin in the float model given to
qcompile unless ``scaled``.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from qcompile.errors import InputSpecError

META_KEY = "qcompile.quantization"
VERSION = 1


def build(model: ir.Model, quantized: set[str], activation_dq: dict[str, str], weight_dq: dict[str, str],
          weight_sqnr_db: dict[str, float], scaled: set[str]) -> dict:
    """Records for ``model`` as lowered (DQ outputs by float name, from the Q/DQ lowering pass);
    ``quantized``: the plan's quantized nodes (others may read a DQ output too: a Shape, say)."""
    dq_to_activation = {dq: name for name, dq in activation_dq.items()}
    dq_to_weight = {dq: name for name, dq in weight_dq.items()}
    readers: dict[str, list[str]] = {}
    nodes = []
    for node in model.graph:
        acts = [dq_to_activation[v.name] for v in node.inputs if v is not None and v.name in dq_to_activation]
        weights = [dq_to_weight[v.name] for v in node.inputs if v is not None and v.name in dq_to_weight]
        for name in acts + weights:
            readers.setdefault(name, []).append(node.name)
        if node.name in quantized and (acts or weights):
            nodes.append({"node": node.name, "op_type": node.op_type, "output": node.outputs[0].name,
                          "activations": acts, "weights": weights})
    smoothed_nodes = {n["node"] for n in nodes if any(a in scaled for a in n["activations"])}
    return {
        "version": VERSION,
        "activations": [{"tensor": name, "dq": dq, "consumers": readers.get(name, []), "scaled": name in scaled}
                        for name, dq in activation_dq.items()],
        "weights": [{"tensor": name, "dq": dq, "consumers": readers.get(name, []),
                     "sqnr_db": _finite(weight_sqnr_db.get(name)),
                     "scaled": any(c in smoothed_nodes for c in readers.get(name, []))}
                    for name, dq in weight_dq.items()],
        "nodes": nodes,
    }


def _finite(x: float | None) -> float | str | None:
    return x if x is None or x == x and abs(x) != float("inf") else str(x)


def attach(model: ir.Model, records: dict) -> None:
    model.metadata_props[META_KEY] = json.dumps(records, separators=(",", ":"))


def read(model: ir.Model, where: str) -> dict:
    """The records of a model qcompile quantized; a model without them is the input's error."""
    text = model.metadata_props.get(META_KEY)
    if text is None:
        raise InputSpecError("the model has no qcompile quantization records (quantized by another tool, or "
                             "an older qcompile)", where=where, fix="quantize it with `qcompile quantize`")
    records = json.loads(text)
    if records.get("version") != VERSION:
        raise InputSpecError(f"quantization records version {records.get('version')} is not {VERSION}",
                             where=where, fix="quantize it again with this qcompile")
    return records
