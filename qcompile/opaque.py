"""Parts of a graph onnx-ir cannot represent, kept opaque: map-typed outputs (skl2onnx's ZipMap).

onnx-ir has no map type yet, so a classifier whose probabilities leave through ``ZipMap`` (a
sequence of maps) cannot be loaded as a whole. The nodes that produce map-typed graph outputs are
cut off at load time — the *tail* — and the tensors they read become graph outputs of the *body*,
which every pass, calibration and verification work on. Saving puts the tail back unchanged:

    load:  body = graph − tail;  outputs(body) = outputs − map outputs + inputs(tail)
    save:  graph = body + tail;  outputs = the original outputs, in their order

The tail is verified by construction (it is the user's own nodes, untouched); the body is verified
like any graph. A map-typed graph *input* (``DictVectorizer``) cannot be cut this way and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from qcompile.errors import InvalidModelError

META_KEY = "qcompile.opaque_tail"


def has_map(type_proto: onnx.TypeProto) -> bool:
    """Whether a type is, or holds, a map (map, sequence of maps, optional map, ...)."""
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind == "sequence_type":
        return has_map(type_proto.sequence_type.elem_type)
    if kind == "optional_type":
        return has_map(type_proto.optional_type.elem_type)
    return False


@dataclass
class Tail:
    """The cut-off nodes, the original outputs (serialized, in order) and the outputs added to the body."""

    nodes: list[bytes]
    outputs: list[bytes]
    added: list[str] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)


def split_map_tail(proto: onnx.ModelProto, where: Path) -> Tail | None:
    """Cut the map-producing tail off ``proto`` (in place); None when the graph has no map types."""
    graph = proto.graph
    for value in graph.input:
        if has_map(value.type):
            raise InvalidModelError(
                f"input {value.name!r} is map-typed, which qcompile cannot represent yet", where=str(where),
                fix="feed the model tensors (e.g. convert the DictVectorizer step outside the graph)",
            )
    map_values = {v.name for v in [*graph.output, *graph.value_info] if has_map(v.type)}
    if not map_values:
        return None
    producers = {out: node for node in graph.node for out in node.output}
    tail_nodes, stack = [], [v for v in map_values if v in producers]
    while stack:  # map values and every map value they are computed from
        node = producers[stack.pop()]
        if node in tail_nodes:
            continue
        tail_nodes.append(node)
        stack += [name for name in node.input if name in map_values and name in producers]
    tail_outputs = {out for node in tail_nodes for out in node.output}
    inner = [name for node in tail_nodes for name in node.input if name and name not in tail_outputs]
    for node in graph.node:
        if node not in tail_nodes and any(name in tail_outputs for name in node.input):
            raise InvalidModelError(
                f"node {node.name or node.op_type!r} reads a map value, which qcompile cannot represent yet",
                where=str(where), fix="keep map-typed values at the end of the graph",
            )
    typed = _tensor_types(proto, inner)
    tail = Tail(nodes=[n.SerializeToString() for n in tail_nodes],
                outputs=[v.SerializeToString() for v in graph.output])
    tail.opsets = {o.domain: o.version for o in proto.opset_import}
    kept_outputs = [v for v in graph.output if v.name not in tail_outputs]
    existing = {v.name for v in kept_outputs}
    for name in dict.fromkeys(inner):
        if name not in existing:
            kept_outputs.append(typed[name])
            tail.added.append(name)
    remaining = [n for n in graph.node if n not in tail_nodes]
    del graph.node[:]
    graph.node.extend(remaining)
    del graph.output[:]
    graph.output.extend(kept_outputs)
    kept_info = [v for v in graph.value_info if not has_map(v.type)]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return tail


def _tensor_types(proto: onnx.ModelProto, names: list[str]) -> dict[str, onnx.ValueInfoProto]:
    """Value infos for ``names`` (the tail's tensor inputs): declared ones, else inferred."""
    known = {v.name: v for v in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]}
    missing = [n for n in names if n not in known]
    if missing:
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        except Exception:  # inference is best-effort here; the check below says what is missing
            inferred = proto
        known.update({v.name: v for v in inferred.graph.value_info})
    zipmap_inputs = {name for node in proto.graph.node if node.op_type == "ZipMap" for name in node.input}
    out = {}
    for name in names:
        value = known.get(name)
        if name in zipmap_inputs and (value is None or not value.type.tensor_type.HasField("shape")):
            # ZipMap reads float [N, C] by its definition; a graph output needs its shape written
            value = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [f"{name}_N", f"{name}_C"])
        if value is None or value.type.WhichOneof("value") != "tensor_type":
            raise InvalidModelError(f"cannot type {name!r}, the tensor the map-typed output is made from",
                                    fix="export the model with value_info for it")
        out[name] = value
    return out


def attach_tail(proto: onnx.ModelProto, tail: Tail) -> None:
    """Put the tail back onto a saved body (in place): its nodes, and the original outputs in order."""
    graph = proto.graph
    for data in tail.nodes:
        node = onnx.NodeProto()
        node.ParseFromString(data)
        graph.node.append(node)
    outputs = []
    for data in tail.outputs:
        value = onnx.ValueInfoProto()
        value.ParseFromString(data)
        outputs.append(value)
    del graph.output[:]
    graph.output.extend(outputs)
    present = {o.domain for o in proto.opset_import}
    for domain, version in tail.opsets.items():
        if domain not in present:
            proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
