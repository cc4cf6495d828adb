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
Unsqueeze/Expand/Reshape) is matched by shape. The forms users' exports take are matched too:
torch's SDPA (q and K^T each scaled by sqrt(c), the probabilities NaN-guarded by
Where(IsNaN(p), 0, p), p @ V reshaped to its own shape) and the dynamo exporter's (K^T through
[B*N, T, D]).

Contract, as ONNX Runtime GenAI's builder has it: the attention mask is ones with right padding
at most (what a generation loop feeds), and in a prompt the position ids count up from the first
(the kernel reads the first one); GroupQueryAttention is causal, so an attention is fused only
when its additive bias comes from a comparison (a causal mask) and reads no float input.
Semantics are checked numerically by the pass manager like every fusion. Only for ONNX Runtime
targets (``CONTRIB_PASSES``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

MS = "com.microsoft"
DEFAULT_MAX_POSITIONS = 4096
PAST_NAME = re.compile(r"^past_key_values\.\d+\.(key|value)$")


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
    kind: str                   # "causal" (a decoder's) or "bidirectional" (an encoder's, padding only)


def match(softmax: ir.Node, graph_inputs: set[int], kind_of: Callable[[ir.Value], str | None]) -> Match | None:
    """The attention around ``softmax``; ``kind_of(bias)`` classifies its additive bias."""
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    add = _producer(softmax.inputs[0], "Add")
    if add is None:
        return None
    for scaled, bias in (add.inputs, add.inputs[::-1]):
        found = _match_scores(scaled, bias, softmax, graph_inputs, kind_of)
        if found is not None:
            return found
    return None


def _keys_of_transposed(value: ir.Value) -> ir.Value | None:
    """K behind K^T = Transpose(0, 1, 3, 2)(K), or torch's dynamo form of it,
    Reshape(Transpose(0, 2, 1)(Reshape(K, [B*N, T, D])), [B, N, D, T]); else None."""
    transpose = _producer(value, "Transpose")
    if _perm(transpose) == [0, 1, 3, 2]:
        return transpose.inputs[0]
    outer = _producer(value, "Reshape")
    transpose = None if outer is None else _producer(outer.inputs[0], "Transpose")
    inner = None if transpose is None or _perm(transpose) != [0, 2, 1] else _producer(transpose.inputs[0], "Reshape")
    if inner is None or _target_rank(outer.inputs[1]) != 4 or _target_rank(inner.inputs[1]) != 3:
        return None
    return inner.inputs[0]


def _key_heads(transposed: ir.Value, graph_inputs: set[int]):
    """(present_key, past_key, key) behind K^T: Transpose(0, 1, 3, 2) of the [B, N, T, D] keys (with a
    cache and repeat_kv; or its dynamo form), or an encoder's Transpose(0, 2, 3, 1) of
    Reshape(k_proj, [B, S, N, D])."""
    keys = _keys_of_transposed(transposed)
    if keys is not None:
        present_key = _repeated(keys)
        past_key, new_key = _cached(present_key, graph_inputs)
        return present_key, past_key, _heads(new_key)
    transpose = _producer(transposed, "Transpose")
    if _perm(transpose) == [0, 2, 3, 1]:
        reshape = _producer(transpose.inputs[0], "Reshape")
        x = None if reshape is None else reshape.inputs[0]
        width = _width(x)
        heads, dim = (None, None) if width is None else _trailing_dims(reshape.inputs[1], width)
        if heads is None or dim is None or heads * dim != width:
            return None
        return transpose.inputs[0], None, Heads(x, heads)
    return None


def _scaled(value: ir.Value) -> tuple[ir.Value, float]:
    """(x, c) for value = x * c or x / (1/c) with a constant scalar c, else (value, 1)."""
    node = _producer(value, "Mul", "Div")
    if node is not None:
        for product, constant in (node.inputs, node.inputs[::-1] if node.op_type == "Mul" else ()):
            c = _scalar(constant)
            if c is not None and c != 0.0:
                return product, (c if node.op_type == "Mul" else 1.0 / c)
    return value, 1.0


def _nan_guarded(probs: ir.Value) -> ir.Value | None:
    """Where(IsNaN(p), 0, p) — torch's SDPA export zeroes fully masked rows — or None."""
    uses = list(probs.uses())
    is_nan = next((n for n, i in uses if n.op_type == "IsNaN" and i == 0), None)
    where = next((n for n, i in uses if n.op_type == "Where" and i == 2), None)
    if len(uses) != 2 or is_nan is None or where is None or where.inputs[0] is not is_nan.outputs[0]:
        return None
    return where.outputs[0] if _scalar(where.inputs[1]) == 0.0 else None


def _relayout(value: ir.Value) -> ir.Value | None:
    """The output of torch's SDPA export's Reshape of p @ V to [B, -1, S, D], each dim k read from
    Shape(t)[k] of a tensor of the same [B, N, S, D] layout (or -1): the same shape back; else None.
    (Shape(p @ V) may feed that target too; nothing else may read p @ V.)"""
    reshape = next((n for n, _ in value.uses() if n.op_type == "Reshape"), None)
    others = [n for n, _ in value.uses() if n is not reshape]
    target = None if reshape is None else _producer(reshape.inputs[1], "Concat")
    if target is None or len(target.inputs) != 4 or any(n.op_type != "Shape" for n in others):
        return None
    for k, part in enumerate(target.inputs):
        if _scalar(part) == -1:
            continue
        unsqueeze = _producer(part, "Unsqueeze")
        gather = None if unsqueeze is None else _producer(unsqueeze.inputs[0], "Gather")
        shape = None if gather is None else _producer(gather.inputs[0], "Shape")
        if shape is None or _scalar(gather.inputs[1]) != k or shape.attributes.get_int("start", 0) != 0:
            return None
    return reshape.outputs[0]


def _match_scores(scaled, bias, softmax, graph_inputs, kind_of) -> Match | None:
    qk, scale = _scaled(scaled)  # c * (q @ K^T); torch's SDPA export scales q and K^T by sqrt(c) each
    matmul = _producer(qk, "MatMul")
    if matmul is None:
        return None
    (queries, q_scale), (keys_t, k_scale) = _scaled(matmul.inputs[0]), _scaled(matmul.inputs[1])
    scale *= q_scale * k_scale
    keys = _key_heads(keys_t, graph_inputs)
    if keys is None:
        return None
    present_key, past_key, key = keys
    query = _heads(queries)
    kind = kind_of(bias) if query is not None and key is not None else None
    if kind is None or (kind == "bidirectional" and (past_key is not None or query.cos is not None)):
        return None
    probs = softmax.outputs[0]
    uses = list((_nan_guarded(probs) or probs).uses())
    if query is None or key is None or len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 0:
        return None
    pv = uses[0][0]
    present_value = _repeated(pv.inputs[1])
    past_value, new_value = _cached(present_value, graph_inputs)
    value = _split_heads(new_value)
    heads_out = _relayout(pv.outputs[0]) or pv.outputs[0]
    out_uses = list(heads_out.uses())
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
    if kind == "bidirectional" and (past_value is not None or value.heads != query.heads):
        return None
    return Match(output, query, key, value.projection, past_key, past_value, present_key, present_value, scale,
                 kind)


@dataclass
class Subgraph:
    """The nodes computing ``outputs`` from graph inputs (``leaves``) and constants, as a model."""

    leaves: list[ir.Value]
    outputs: list[ir.Value]
    proto: object  # onnx.ModelProto

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
        """ONNX's reference evaluator on ``feeds`` (by leaf name); None when it cannot run it."""
        from onnx.reference import ReferenceEvaluator

        try:
            return [np.asarray(x) for x in ReferenceEvaluator(self.proto).run(None, feeds)]
        except Exception:  # a subgraph the reference evaluator cannot run: leave the attention unfused
            return None


def _subgraph(graph: ir.Graph, outputs: list[ir.Value], shape_leaves: bool = False) -> Subgraph | None:
    """The slice of ``graph`` behind ``outputs`` (standard ops only), or None. ``shape_leaves``: a value
    read only through Shape is a leaf too (fed by its shape alone: an embedding lookup's output
    whose length a mask takes, without its table)."""
    import onnx

    nodes, leaves, seen, stack = [], [], set(), list(outputs)
    graph_inputs = {id(v) for v in graph.inputs}
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in graph_inputs or (shape_leaves and v.producer() is not None and v.uses()
                                     and all(u.op_type == "Shape" for u, _ in v.uses())):
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
    order = {id(n): i for i, n in enumerate(graph)}
    nodes = sorted(set(nodes), key=lambda n: order[id(n)])
    produced = {x.name for n in nodes for x in n.outputs}
    constants = {id(x): x for n in nodes for x in n.inputs if x is not None and x.const_value is not None}

    def info(v: ir.Value):  # an output's type may be unknown (no shape inference ran): the evaluator infers it
        return onnx.helper.make_tensor_value_info(v.name, int(v.dtype) if v.dtype is not None else 0, None)

    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], "slice", [info(v) for v in leaves], [info(v) for v in outputs],
            [ir.serde.serialize_tensor(ir.tensor(v.const_value.numpy(), name=v.name))  # in memory, not a
             for v in constants.values() if v.name not in produced]),                    # file reference
        opset_imports=[onnx.helper.make_opsetid("", graph.opset_imports.get("", 17))])
    return Subgraph(leaves, list(outputs), proto)


#: (first, count) of the positions a rotary subgraph is probed at: are its leaf's values positions?
POSITION_PROBE = (5, 4)


def _rotary_tables(graph: ir.Graph, cos: ir.Value, sin: ir.Value, max_positions: int):
    """(position input, cos_cache, sin_cache [max_positions, D/2]) from the model's own cos/sin
    subgraph, or None when it reads anything but one int64 graph input or is not rotate-half.

    The leaf's role is measured, not assumed: fed positions p = first .. first+count-1, the
    subgraph gives rows p of the tables when the leaf holds position ids; rows 0 .. count-1 when
    only its shape is read (a no-cache export's arange over input_ids' length: then the position
    input is None, and the kernel counts from 0 as that arange does); anything else: None."""
    sub = _subgraph(graph, [cos, sin])
    if sub is None or len(sub.leaves) != 1 or sub.leaves[0].dtype != ir.DataType.INT64:
        return None
    position = sub.leaves[0]
    tables = sub.run({position.name: np.arange(max_positions, dtype=np.int64)[None, :]})
    first, count = POSITION_PROBE
    probe = sub.run({position.name: np.arange(first, first + count, dtype=np.int64)[None, :]})
    if tables is None or probe is None:
        return None
    cos_table, sin_table = (t.astype(np.float32).reshape(max_positions, -1) for t in tables)
    probed = probe[0].astype(np.float32).reshape(count, -1)
    holds_positions = np.array_equal(probed, cos_table[first:first + count])
    counts_from_zero = np.array_equal(probed, cos_table[:count]) and position.name != "position_ids"
    if not (holds_positions or counts_from_zero):
        return None
    position = position if holds_positions else None  # None: only its shape is read, positions 0 .. S-1
    half = cos_table.shape[1] // 2
    if cos_table.shape[1] % 2 or not (np.array_equal(cos_table[:, :half], cos_table[:, half:])
                                      and np.array_equal(sin_table[:, :half], sin_table[:, half:])):
        return None
    return position, cos_table[:, :half].copy(), sin_table[:, :half].copy()


#: (past, new) lengths the bias subgraph is evaluated at to classify it.
BIAS_PROBES = ((0, 4), (3, 2))


def bias_kind(graph: ir.Graph, bias: ir.Value) -> str | None:
    """What an attention's additive bias is, evaluated (not guessed) on small feeds of ones masks
    and a right-padded mask: "causal" (-inf where key > past + query, and at masked keys),
    "bidirectional" (-inf at masked keys only), or None (anything else, or a bias that reads a float
    input other than the KV cache, e.g. a relative-position bias)."""
    for shape_leaves in (True, False):  # a shape-only leaf whose dims nothing sizes: its inputs instead
        sub = _subgraph(graph, [bias], shape_leaves=shape_leaves)
        feeds = None if sub is None else _probe_feeds(graph, sub.leaves, 0, 1, False)
        if feeds is not None:
            break
    else:
        return None
    kinds = {"causal", "bidirectional"}
    cached = any(PAST_NAME.match(v.name) for v in graph.inputs)
    for past, new in BIAS_PROBES if cached else [(0, n) for _, n in BIAS_PROBES]:
        total = past + new
        for padded in (False, True):
            feeds = _probe_feeds(graph, sub.leaves, past, new, padded)
            values = None if feeds is None else sub.run(feeds)
            if values is None:
                return None
            try:
                b = np.broadcast_to(values[0].astype(np.float64), (1, 1, new, total))[0, 0]
            except ValueError:
                return None
            masked, clear = b < -1e3, np.abs(b) < 1e-6
            if not (masked | clear).all():
                return None
            keys, queries = np.arange(total)[None, :], np.arange(new)[:, None] + past
            pad = (keys == total - 1) if padded else np.zeros_like(keys, dtype=bool)
            fits = {kind for kind, pattern in (("causal", (keys > queries) | pad),
                                               ("bidirectional", np.broadcast_to(pad, masked.shape)))
                    if np.array_equal(masked, pattern)}
            kinds &= fits  # a probe can fit both (one query row); the others decide
    return kinds.pop() if len(kinds) == 1 else None


def _probe_feeds(graph: ir.Graph, leaves: list[ir.Value], past: int, new: int,
                 padded: bool) -> dict[str, np.ndarray] | None:
    """Feeds for a bias subgraph: a mask of ones (the last key masked if ``padded``), positions from
    ``past``, a zero cache of length ``past``, zero ids; a shape-only leaf as zeros of its shape,
    its symbolic dims sized by the graph inputs' dims of the same name."""
    sizes: dict[str, int] = {}
    for value in graph.inputs:
        lengths = {"input_ids": (1, new), "position_ids": (1, new), "attention_mask": (1, past + new)}
        if value.name in lengths or PAST_NAME.match(value.name):
            known = lengths.get(value.name, (1, None, past, None))
            for dim, size in zip(value.shape or [], known):
                if not isinstance(dim, int) and dim.value is not None and size is not None:
                    sizes.setdefault(dim.value, size)
    feeds = {}
    for leaf in leaves:
        if leaf.dtype is None:
            return None  # an input of unknown type: nothing to probe it with
        dtype = np.dtype(leaf.dtype.numpy())
        rank = leaf.shape.rank() if leaf.shape is not None else None
        if leaf.name == "attention_mask":
            mask = np.ones((1, past + new), dtype=dtype)
            if padded:
                mask[0, -1] = 0
            feeds[leaf.name] = mask
        elif leaf.name == "position_ids":
            feeds[leaf.name] = np.arange(past, past + new, dtype=dtype)[None]
        elif PAST_NAME.match(leaf.name) and rank == 4:
            dims = [d if isinstance(d, int) else 1 for d in leaf.shape]
            feeds[leaf.name] = np.zeros((1, dims[1], past, dims[3]), dtype=dtype)
        elif leaf.producer() is None and np.issubdtype(dtype, np.integer) and rank == 2:
            feeds[leaf.name] = np.zeros((1, new), dtype=dtype)  # input_ids, token_type_ids: only shapes matter
        elif leaf.producer() is not None and rank is not None:  # read only through Shape
            dims = [d if isinstance(d, int) else sizes.get(d.value) for d in leaf.shape]
            if None in dims:
                return None
            feeds[leaf.name] = np.zeros(dims, dtype=dtype)
        else:
            return None
    return feeds


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
        mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
        if mask is None or mask.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            return ir.passes.PassResult(model, False)
        kinds: dict[int, str | None] = {}

        def kind_of(bias: ir.Value) -> str | None:
            if id(bias) not in kinds:
                kinds[id(bias)] = bias_kind(graph, bias)
            return kinds[id(bias)]

        matches = [m for node in list(graph) if node.op_type == "Softmax" and node.domain in ("", "ai.onnx")
                   for m in [match(node, graph_inputs, kind_of)] if m is not None]
        tables: dict[tuple[int, int], tuple | None] = {}
        lengths, padding = None, None
        for m in matches:
            if m.kind == "bidirectional":
                if padding is None:
                    padding = _key_padding_mask(graph, mask)
                self._fuse_encoder(graph, m, padding)
                self.count += 1
                continue
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
            self.count += self._fuse(graph, m, rotary, lengths, len(tables))
        if self.count:
            model.opset_imports.setdefault(MS, 1)
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, bool(self.count))

    def _fuse(self, graph: ir.Graph, m: Match, rotary, lengths, table_id: int) -> bool:
        """Fuse ``m``; False (nothing changed) where RotaryEmbedding would need position ids the
        model does not have (separate projections, positions counted from its input's shape)."""
        anchor = m.output.producer()
        seqlens, total = lengths
        if rotary is not None and rotary[0] is None and _packing(m) is None:
            return False
        packed, new_nodes = _packed_projection(graph, m)
        attributes = {"num_heads": m.query.heads, "kv_num_heads": m.key.heads, "scale": float(m.scale)}
        rotary_inputs: list[ir.Value | None] = []
        if rotary is not None:
            position, cos_table, sin_table = rotary
            cos_cache, sin_cache = (_initializer(graph, f"qcompile_rotary_{kind}_{table_id}", table)
                                    for kind, table in (("cos", cos_table), ("sin", sin_table)))
            rotary_inputs = [cos_cache, sin_cache] + ([position] if position is not None else [])
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
        return True


    def _fuse_encoder(self, graph: ir.Graph, m: Match, padding: ir.Value) -> None:
        """y = MultiHeadAttention(q_proj, k_proj, v_proj, key_padding_mask=mask): bidirectional."""
        attention = ir.node(
            "MultiHeadAttention", [m.query.projection, m.key.projection, m.value, None, padding],
            {"num_heads": m.query.heads, "scale": float(m.scale)}, domain=MS)
        graph.insert_before(m.output.producer(), [attention])
        _replace(graph, m.output, attention.outputs[0])


def _single_use(value: ir.Value) -> bool:
    return len(list(value.uses())) == 1 and not value.is_graph_output()


def _packing(m: Match):
    """How q, k, v come from one projection: the fused QKV Linear's input (outputs 0, 1, 2 of one
    Split along the last axis), the three (x, W, b) of MatMuls of one x with constant weights, or None."""
    projections = [m.query.projection, m.key.projection, m.value]
    if not all(_single_use(v) for v in projections):
        return None
    split = projections[0].producer()
    if (split is not None and split.op_type == "Split" and all(v.producer() is split for v in projections)
            and [v.index() for v in projections] == [0, 1, 2] and len(split.outputs) == 3
            and split.attributes.get_int("axis", 0) in (-1, 2)):
        return split.inputs[0]
    parts = [_linear(v) for v in projections]
    if None in parts or len({id(x) for x, _, _ in parts}) != 1 or len({b is None for _, _, b in parts}) != 1:
        return None
    return parts


def _packed_projection(graph: ir.Graph, m: Match) -> tuple[ir.Value | None, list[ir.Node]]:
    """One [B, S, (H + 2 KVH) D] projection for q, k, v (:func:`_packing`), and the nodes that make
    it (appended by the caller), or (None, []): the Split's input, or a MatMul of x with
    [Wq | Wk | Wv] (+ [bq | bk | bv])."""
    packing = _packing(m)
    if not isinstance(packing, list):
        return packing, []
    parts = packing
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


def _key_padding_mask(graph: ir.Graph, mask: ir.Value) -> ir.Value:
    """The attention mask as MultiHeadAttention's key padding mask (int32 [B, T]), at the top."""
    if mask.dtype == ir.DataType.INT32:
        return mask
    cast = ir.node("Cast", [mask], {"to": ir.DataType.INT32})
    graph.insert_before(graph.node(0), [cast]) if len(graph) else graph.append(cast)
    return cast.outputs[0]


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
