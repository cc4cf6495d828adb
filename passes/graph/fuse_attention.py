"""Causal self-attention of exported decoders fused into ONNX Runtime's GroupQueryAttention.

The exported form (Hugging Face Llama/GPT through torch's exporters), per layer::

    q = T(Reshape(q_proj))  k = T(Reshape(k_proj))  v = T(Reshape(v_proj))      T = Transpose(0, 2, 1, 3)
    q, k = rope(q), rope(k)      rope(t) = t * cos + rotate_half(t) * sin     (optional: learned positions)
    K = Concat(past_key, k);  V = Concat(past_value, v)                      (optional: no cache)
    p = Softmax(c * q @ repeat(K)^T + causal_bias);  y = Reshape(T(p @ repeat(V)))   [B, S, H*D]

becomes, when q, k, v are projections of one x (three MatMuls with constant weights, or one fused
QKV MatMul split in three)::

    qkv = MatMul(x, [Wq | Wk | Wv])                     (+ [bq | bk | bv])
    y, K, V = GroupQueryAttention(qkv, past_key, past_value, seqlens_k, total_length,
                                  cos_cache, sin_cache, position_ids, do_rotary=1, scale=c)

and otherwise ``RotaryEmbedding(q_proj, position_ids)``, ``RotaryEmbedding(k_proj, position_ids)``
and ``GroupQueryAttention(q', k', v_proj, past_key, past_value, seqlens_k, total_length)``.
``seqlens_k = sum(attention_mask, 1) - 1`` and ``total_length = attention_mask.shape[1]`` are
computed once. The rotary tables are the model's own: its cos/sin subgraph is evaluated (ONNX's
reference evaluator) on positions 0 .. max_positions-1 (the recorded context length, else 4096),
and used only if it has the rotate-half layout (both halves equal). ``repeat`` (GQA's
Unsqueeze/Expand/Reshape) is matched by shape.

Contract, as ONNX Runtime GenAI's builder has it: the attention mask is ones with right padding
at most (what a generation loop feeds), and in a prompt the position ids count up from the first
(the kernel reads the first one); GroupQueryAttention is causal, so an attention is fused only
when its additive bias comes from a comparison (a causal mask) and reads no float input.
Semantics are checked numerically by the pass manager like every fusion. Only for ONNX Runtime
targets (``CONTRIB_PASSES``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

MS = "com.microsoft"
DEFAULT_MAX_POSITIONS = 4096
COMPARISONS = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Trilu"})


def _producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type in op_types and node.domain in ("", "ai.onnx") else None


def _perm(node: ir.Node | None) -> list[int] | None:
    if node is None:
        return None
    attr = node.attributes.get("perm")
    return None if attr is None else list(attr.as_ints())


def _scalar(value: ir.Value | None) -> float | None:
    const = None if value is None else ir.convenience.get_const_tensor(value)
    return None if const is None or const.size != 1 else float(const.numpy().reshape(()))


def _static(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or shape.rank() <= abs(axis) - (1 if axis < 0 else 0):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


@dataclass
class Heads:
    """One side of the attention: the projection [B, S, N*D] it starts from and the rope (if any)."""

    projection: ir.Value
    heads: int
    cos: ir.Value | None = None
    sin: ir.Value | None = None


def _split_heads(t: ir.Value) -> Heads | None:
    """t = Transpose(Reshape(x, [B, S, N, D]), (0, 2, 1, 3)), x rank 3 with last dim N*D."""
    transpose = _producer(t, "Transpose")
    if _perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None
    x = reshape.inputs[0]
    width = _width(x)
    if width is None or (x.shape is not None and x.shape.rank() != 3):
        return None
    heads, dim = _static(t, 1), _static(t, 3)
    if heads is None or dim is None:
        heads, dim = _trailing_dims(reshape.inputs[1], width)
    if heads is None or dim is None or width != heads * dim:
        return None
    return Heads(x, heads)


def _target_width(shape: ir.Value | None) -> int | None:
    """The last element of a Reshape's target: a constant's, or a Concat's constant last part."""
    const = None if shape is None else ir.convenience.get_const_tensor(shape)
    if const is None:
        concat = _producer(shape, "Concat")
        const = None if concat is None else ir.convenience.get_const_tensor(concat.inputs[-1])
    return None if const is None or const.size < 1 else int(const.numpy().reshape(-1)[-1])


def _target_rank(shape: ir.Value | None) -> int | None:
    const = None if shape is None else ir.convenience.get_const_tensor(shape)
    if const is not None:
        return const.size
    concat = _producer(shape, "Concat")
    if concat is None:
        return None
    sizes = [None if v is None or v.shape is None else _static(v, 0) for v in concat.inputs]
    return None if None in sizes else sum(sizes)


def _width(x: ir.Value | None) -> int | None:
    """The last dim of a projection: from its shape, else from its MatMul's constant weight."""
    if x is None:
        return None
    if x.shape is not None:
        return _static(x, -1)
    node = _producer(x, "Add")
    if node is not None:  # projection + bias
        x = next((v for v in node.inputs if v is not None and v.const_value is None), None)
    node = _producer(x, "MatMul")
    weight = None if node is None else node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    return int(weight.const_value.shape[1])


def _trailing_dims(shape: ir.Value | None, width: int) -> tuple[int | None, int | None]:
    """(N, D) from a Reshape's target [.., .., N, D]: a constant, or a Concat whose last two parts
    are constants (exporters compute B and S from Shape); -1 for N means width / D."""
    const = None if shape is None else ir.convenience.get_const_tensor(shape)
    if const is not None:
        tail = [int(v) for v in const.numpy().reshape(-1)[-2:]]
    else:
        concat = _producer(shape, "Concat")
        if concat is None or len(concat.inputs) < 2:
            return None, None
        parts = [ir.convenience.get_const_tensor(v) for v in concat.inputs[-2:] if v is not None]
        if len(parts) != 2 or any(p is None or p.size != 1 for p in parts):
            return None, None
        tail = [int(p.numpy().reshape(())) for p in parts]
    heads, dim = tail
    if dim <= 0:
        return None, None
    return (width // dim if heads == -1 else heads), dim


def _unsqueezed(value: ir.Value) -> ir.Value | None:
    """v where value = Unsqueeze(v, [1]) (cos/sin broadcast over heads)."""
    node = _producer(value, "Unsqueeze")
    if node is None or len(node.inputs) < 2:
        return None
    axes = ir.convenience.get_const_tensor(node.inputs[1])
    return node.inputs[0] if axes is not None and list(axes.numpy().reshape(-1)) == [1] else None


def _rotate_half_of(value: ir.Value) -> ir.Value | None:
    """t where value = Concat(Neg(Slice(t, ...)), Slice(t, ...), axis=-1)."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis", 0) not in (-1, 3):
        return None
    neg = _producer(concat.inputs[0], "Neg")
    first, second = (None if neg is None else _producer(neg.inputs[0], "Slice")), _producer(concat.inputs[1], "Slice")
    if first is None or second is None or first.inputs[0] is not second.inputs[0]:
        return None
    return first.inputs[0]


def _rope(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(t, cos, sin) where value = t * U(cos) + rotate_half(t) * U(sin), any operand order."""
    add = _producer(value, "Add")
    if add is None:
        return None
    products = [_producer(v, "Mul") for v in add.inputs]
    if None in products:
        return None
    for plain, rotated in (products, products[::-1]):
        for t, cos_u in (plain.inputs, plain.inputs[::-1]):
            for half, sin_u in (rotated.inputs, rotated.inputs[::-1]):
                if _rotate_half_of(half) is t:
                    cos, sin = _unsqueezed(cos_u), _unsqueezed(sin_u)
                    if cos is not None and sin is not None:
                        return t, cos, sin
    return None


def _heads(value: ir.Value) -> Heads | None:
    """The projection behind a (possibly rotated) [B, N, S, D] query or key."""
    rope = _rope(value)
    if rope is None:
        return _split_heads(value)
    heads = _split_heads(rope[0])
    if heads is not None:
        heads.cos, heads.sin = rope[1], rope[2]
    return heads


def _repeated(value: ir.Value) -> ir.Value:
    """K where value = Reshape(Expand(Unsqueeze(K, [2]), ...), ...) (repeat_kv), else value."""
    reshape = _producer(value, "Reshape")
    expand = None if reshape is None else _producer(reshape.inputs[0], "Expand")
    unsqueeze = None if expand is None else _producer(expand.inputs[0], "Unsqueeze")
    if unsqueeze is None or len(unsqueeze.inputs) < 2:
        return value
    axes = ir.convenience.get_const_tensor(unsqueeze.inputs[1])
    return unsqueeze.inputs[0] if axes is not None and list(axes.numpy().reshape(-1)) == [2] else value


def _cached(value: ir.Value, graph_inputs: set[int]) -> tuple[ir.Value | None, ir.Value]:
    """(past, new) where value = Concat(past, new, axis=2) and past is a graph input; else (None, value)."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis", 0) not in (2, -2):
        return None, value
    past = concat.inputs[0]
    return (past, concat.inputs[1]) if past is not None and id(past) in graph_inputs else (None, value)


def _causal_bias(value: ir.Value, float_inputs: set[int]) -> bool:
    """The bias is built by a comparison (a causal mask) and reads no float graph input."""
    seen, stack, compares = set(), [value], False
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in float_inputs:
            return False
        node = v.producer()
        if node is None or node.op_type == "Shape":  # a shape reads no values
            continue
        compares |= node.op_type in COMPARISONS
        stack.extend(x for x in node.inputs if x is not None)
    return compares


@dataclass
class Match:
    output: ir.Value            # the [B, S, H*D] attention output
    query: Heads
    key: Heads
    value: ir.Value             # the value projection [B, S, KVH*D]
    past_key: ir.Value | None
    past_value: ir.Value | None
    present_key: ir.Value       # the Concat outputs (or the new k/v without a cache)
    present_value: ir.Value
    scale: float


def match(softmax: ir.Node, graph_inputs: set[int], float_inputs: set[int]) -> Match | None:
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    add = _producer(softmax.inputs[0], "Add")
    if add is None:
        return None
    for scaled, bias in (add.inputs, add.inputs[::-1]):
        found = _match_scores(scaled, bias, softmax, graph_inputs, float_inputs)
        if found is not None:
            return found
    return None


def _match_scores(scaled, bias, softmax, graph_inputs, float_inputs) -> Match | None:
    scale, qk = 1.0, scaled
    node = _producer(scaled, "Mul", "Div")
    if node is not None:
        for product, constant in (node.inputs, node.inputs[::-1] if node.op_type == "Mul" else ()):
            c = _scalar(constant)
            if c is not None and c != 0.0:
                scale, qk = (c if node.op_type == "Mul" else 1.0 / c), product
                break
        else:
            return None
    matmul = _producer(qk, "MatMul")
    if matmul is None or not _causal_bias(bias, float_inputs):
        return None
    transpose = _producer(matmul.inputs[1], "Transpose")
    if _perm(transpose) != [0, 1, 3, 2]:
        return None
    present_key = _repeated(transpose.inputs[0])
    query, (past_key, new_key) = _heads(matmul.inputs[0]), _cached(present_key, graph_inputs)
    key = _heads(new_key)
    uses = list(softmax.outputs[0].uses())
    if query is None or key is None or len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 0:
        return None
    pv = uses[0][0]
    present_value = _repeated(pv.inputs[1])
    past_value, new_value = _cached(present_value, graph_inputs)
    value = _split_heads(new_value)
    out_uses = list(pv.outputs[0].uses())
    if value is None or len(out_uses) != 1 or _perm(out_uses[0][0]) != [0, 2, 1, 3]:
        return None
    final_uses = list(out_uses[0][0].outputs[0].uses())
    if len(final_uses) != 1 or final_uses[0][0].op_type != "Reshape":
        return None
    output = final_uses[0][0].outputs[0]
    width = (_static(output, -1) if output.shape is not None else None) or _target_width(final_uses[0][0].inputs[1])
    if width == -1 and _target_rank(final_uses[0][0].inputs[1]) == 3:  # [B, S, -1]: H*D by construction
        width = _width(query.projection)
    if width != _width(query.projection) or (past_key is None) != (past_value is None):
        return None
    if value.heads != key.heads or query.heads % key.heads or (query.cos is None) != (key.cos is None):
        return None
    if query.cos is not None and (query.cos is not key.cos or query.sin is not key.sin):
        return None
    return Match(output, query, key, value.projection, past_key, past_value, present_key, present_value, scale)


def _rotary_tables(graph: ir.Graph, cos: ir.Value, sin: ir.Value, max_positions: int):
    """(position input, cos_cache, sin_cache [max_positions, D/2]) from the model's own cos/sin
    subgraph, or None when it reads anything but one int64 graph input or is not rotate-half."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    nodes, leaves, seen, stack = [], [], set(), [cos, sin]
    graph_inputs = {id(v) for v in graph.inputs}
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in graph_inputs:
            leaves.append(v)
            continue
        node = v.producer()
        if node is None:
            if v.const_value is None:
                return None
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type in ("If", "Loop", "Scan"):
            return None
        nodes.append(node)
        stack.extend(x for x in node.inputs if x is not None)
    if len(leaves) != 1 or leaves[0].dtype != ir.DataType.INT64:
        return None
    position = leaves[0]
    order = {id(n): i for i, n in enumerate(graph)}
    nodes = sorted(set(nodes), key=lambda n: order[id(n)])
    constants = {id(x): x for n in nodes for x in n.inputs if x is not None and x.const_value is not None}
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], "rotary",
            [onnx.helper.make_tensor_value_info(position.name, onnx.TensorProto.INT64, None)],
            [onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT, None) for v in (cos, sin)],
            [ir.serde.serialize_tensor(v.const_value) for v in constants.values()
             if v.name not in {x.name for n in nodes for x in n.outputs}]),
        opset_imports=[onnx.helper.make_opsetid("", graph.opset_imports.get("", 17))])
    try:
        cos_table, sin_table = ReferenceEvaluator(proto).run(
            None, {position.name: np.arange(max_positions, dtype=np.int64)[None, :]})
    except Exception:  # a subgraph the reference evaluator cannot run: leave the attention unfused
        return None
    cos_table, sin_table = (np.asarray(t, dtype=np.float32).reshape(max_positions, -1) for t in (cos_table, sin_table))
    half = cos_table.shape[1] // 2
    if cos_table.shape[1] % 2 or not (np.array_equal(cos_table[:, :half], cos_table[:, half:])
                                      and np.array_equal(sin_table[:, :half], sin_table[:, half:])):
        return None
    return position, cos_table[:, :half].copy(), sin_table[:, :half].copy()


def _max_positions(model: ir.Model) -> int:
    facts = model.metadata_props.get("qcompile.decoder")
    try:
        return int(json.loads(facts)["context_length"]) if facts else DEFAULT_MAX_POSITIONS
    except (ValueError, KeyError, TypeError):
        return DEFAULT_MAX_POSITIONS


class AttentionFusionPass(ir.passes.InPlacePass):
    """Fuse every matched causal attention (see the module docstring); ``count`` fused."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "fuse-attention"
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.count = 0
        graph = model.graph
        graph_inputs = {id(v) for v in graph.inputs}
        float_inputs = {id(v) for v in graph.inputs if v.dtype is not None and v.dtype.is_floating_point()}
        mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
        matches = [m for node in list(graph) if node.op_type == "Softmax" and node.domain in ("", "ai.onnx")
                   for m in [match(node, graph_inputs, float_inputs)] if m is not None]
        if not matches or mask is None or mask.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            return ir.passes.PassResult(model, False)
        tables: dict[tuple[int, int], tuple | None] = {}
        lengths = None
        for m in matches:
            rotary = None
            if m.query.cos is not None:
                key = (id(m.query.cos), id(m.query.sin))
                if key not in tables:
                    tables[key] = _rotary_tables(graph, m.query.cos, m.query.sin, _max_positions(model))
                rotary = tables[key]
                if rotary is None:
                    continue
            if lengths is None:
                lengths = _sequence_lengths(graph, mask)
            self._fuse(graph, m, rotary, lengths, len(tables))
            self.count += 1
        if self.count:
            model.opset_imports.setdefault(MS, 1)
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, bool(self.count))

    def _fuse(self, graph: ir.Graph, m: Match, rotary, lengths, table_id: int) -> None:
        anchor = m.output.producer()
        seqlens, total = lengths
        packed, new_nodes = _packed_projection(graph, m)
        attributes = {"num_heads": m.query.heads, "kv_num_heads": m.key.heads, "scale": float(m.scale)}
        rotary_inputs: list[ir.Value | None] = []
        if rotary is not None:
            position, cos_table, sin_table = rotary
            cos_cache, sin_cache = (_initializer(graph, f"qcompile_rotary_{kind}_{table_id}", table)
                                    for kind, table in (("cos", cos_table), ("sin", sin_table)))
            rotary_inputs = [cos_cache, sin_cache, position]
        if packed is not None:  # one projection; the rope (with the model's position ids) inside the kernel
            qkv = [packed, None, None]
            if rotary is not None:
                attributes.update(do_rotary=1, rotary_interleaved=0)
        else:
            query, key = m.query.projection, m.key.projection
            if rotary is not None:
                rotated = []
                for projection, heads in ((query, m.query.heads), (key, m.key.heads)):
                    node = ir.node("RotaryEmbedding", [projection, position, cos_cache, sin_cache],
                                   {"num_heads": heads, "interleaved": 0}, domain=MS)
                    new_nodes.append(node)
                    node.outputs[0].shape, node.outputs[0].type = projection.shape, projection.type
                    rotated.append(node.outputs[0])
                query, key = rotated
                rotary_inputs = []
            qkv = [query, key, m.value]
        attention = ir.node(
            "GroupQueryAttention", [*qkv, m.past_key, m.past_value, seqlens, total, *rotary_inputs],
            attributes, domain=MS, num_outputs=3)
        new_nodes.append(attention)
        graph.insert_before(anchor, new_nodes)
        out, present_key, present_value = attention.outputs
        for old, new in ((m.output, out), (m.present_key, present_key), (m.present_value, present_value)):
            _replace(graph, old, new)


def _single_use(value: ir.Value) -> bool:
    return len(list(value.uses())) == 1 and not value.is_graph_output()


def _packed_projection(graph: ir.Graph, m: Match) -> tuple[ir.Value | None, list[ir.Node]]:
    """One [B, S, (H + 2 KVH) D] projection for q, k, v, and the nodes that make it (appended by the
    caller), or (None, []): when the three are outputs 0, 1, 2 of one Split along the last axis
    (a fused QKV Linear), that Split's input; when they are MatMul(x, W) (+ constant bias) of one x
    with constant weights, a MatMul of x with [Wq | Wk | Wv] (+ [bq | bk | bv])."""
    projections = [m.query.projection, m.key.projection, m.value]
    if not all(_single_use(v) for v in projections):
        return None, []
    split = projections[0].producer()
    if (split is not None and split.op_type == "Split" and all(v.producer() is split for v in projections)
            and [v.index() for v in projections] == [0, 1, 2] and len(split.outputs) == 3
            and split.attributes.get_int("axis", 0) in (-1, 2)):
        return split.inputs[0], []
    parts = [_linear(v) for v in projections]
    if None in parts or len({id(x) for x, _, _ in parts}) != 1 or len({b is None for _, _, b in parts}) != 1:
        return None, []
    x = parts[0][0]
    weight = _initializer(graph, f"{m.query.projection.name}_qkv_weight",
                          np.concatenate([w for _, w, _ in parts], axis=1))
    matmul = ir.node("MatMul", [x, weight])
    nodes = [matmul]
    if parts[0][2] is not None:
        bias = _initializer(graph, f"{m.query.projection.name}_qkv_bias", np.concatenate([b for _, _, b in parts]))
        nodes.append(ir.node("Add", [matmul.outputs[0], bias]))
    return nodes[-1].outputs[0], nodes


def _linear(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(x, W, b) where value = MatMul(x, W) (+ b), W a constant float [K, N], b a constant [N]."""
    bias = None
    add = _producer(value, "Add")
    if add is not None:
        constant = next((v for v in add.inputs if v is not None and v.const_value is not None), None)
        other = next((v for v in add.inputs if v is not constant), None)
        if constant is None or other is None or not _single_use(other):
            return None
        bias, value = constant.const_value.numpy(), other
    matmul = _producer(value, "MatMul")
    if matmul is None or matmul.inputs[1] is None or matmul.inputs[1].const_value is None:
        return None
    weight = matmul.inputs[1].const_value.numpy()
    if weight.ndim != 2 or weight.dtype != np.float32 or (bias is not None and bias.shape != (weight.shape[1],)):
        return None
    return matmul.inputs[0], weight, bias


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` reads ``new``; a graph output keeps its name."""
    is_output = any(v is old for v in graph.outputs)
    new.shape, new.type = old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if is_output:
        name = old.name
        old.name = f"{name}_unfused"
        new.name = name


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _sequence_lengths(graph: ir.Graph, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """seqlens_k = sum(mask, 1) - 1 (int32 [B]) and total = mask.shape[1] (int32 scalar), at the top."""
    one = _initializer(graph, "qcompile_one_i64", np.array([1], dtype=np.int64))
    total_index = _initializer(graph, "qcompile_axis1_i64", np.array(1, dtype=np.int64))
    as64 = mask if mask.dtype == ir.DataType.INT64 else None
    nodes = []
    if as64 is None:
        cast = ir.node("Cast", [mask], {"to": ir.DataType.INT64})
        nodes.append(cast)
        as64 = cast.outputs[0]
    summed = ir.node("ReduceSum", [as64, one], {"keepdims": 0})
    minus = ir.node("Sub", [summed.outputs[0], one])
    seqlens = ir.node("Cast", [minus.outputs[0]], {"to": ir.DataType.INT32})
    shape = ir.node("Shape", [mask])
    length = ir.node("Gather", [shape.outputs[0], total_index], {"axis": 0})
    total = ir.node("Cast", [length.outputs[0]], {"to": ir.DataType.INT32})
    nodes += [summed, minus, seqlens, shape, length, total]
    graph.insert_before(graph.node(0), nodes) if len(graph) else graph.extend(nodes)
    return seqlens.outputs[0], total.outputs[0]


def fuse_attention() -> ir.passes.PassBase:
    return AttentionFusionPass()
