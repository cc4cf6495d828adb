"""Annotate: WHERE to quantize, written on the values themselves (``value.meta``, qcompile.quant.spec).

A target's policy is data built from its per-pattern annotators (:data:`ANNOTATORS`): which ops
run quantized, which of their outputs get Q/DQ so the runtime can fuse ``DQ -> op -> Q`` into one
integer kernel, which ops pass a quantized tensor through unchanged (sharing its scale), which
tensors must share a scale (Concat), and which op classes stay float (measured slower in INT8 on
the running CPU, or numerically fragile: Softmax, normalisations, masks).

:func:`annotate` applies a policy to a graph and writes, per value, a frozen spec:

    activation   QuantSpec(dtype, symmetric)              or SharedSpec(root) inside a scale group
    weight       QuantSpec(weight dtype, symmetric, axis)  (per channel along axis, or per tensor)
    bias         DerivedSpec(x, w, consumer)               s_b = s_x * s_w, int32

and, per node, whether it runs quantized or why it stays float. Each value carries its own dtype,
so one model can mix INT8, FP8, INT4 weights and float. :func:`read_plan` is the ordered view the
observe and lower stages read (annotation order fixes where new initializers go: deterministic).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.quant.spec import (
    BIAS_KEY,
    CONSUMERS_KEY,
    FLOAT_REASON_KEY,
    ORDER_KEY,
    QUANTIZED_KEY,
    SPEC_KEY,
    DerivedSpec,
    QuantSpec,
    SharedSpec,
)

ActivationDType = Literal["uint8", "int8", "float8e4m3fn"]
WeightDType = Literal["int8", "uint8", "float8e4m3fn"]
Consumer = tuple[str, int]  # (node name, input index)

@dataclass(frozen=True)
class QuantPolicy:
    """What a target runs in INT8. Frozen: a policy never changes while a model is quantized."""

    name: str
    activation_dtype: ActivationDType = "uint8"
    activation_symmetric: bool = False
    per_channel: bool = True
    compute_ops: frozenset[str] = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
    quantize_outputs_of: frozenset[str] = frozenset({"Conv"})
    activation_followers: frozenset[str] = frozenset({"Relu", "Clip"})
    passthrough_ops: frozenset[str] = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})
    shared_scale_ops: frozenset[str] = frozenset({"Concat"})
    residual_add: bool = False
    #: residual Add fed by a quantized Conv: Q/DQ on the other (skip) input, so Conv + Add fuse (TensorRT)
    residual_skip: bool = False
    activation_by_activation_matmul: bool = False
    #: biases as INT32 (s_b = s_x s_w); False: they stay float (TensorRT fuses a float bias)
    quantize_bias: bool = True
    #: every consumer of a quantized activation reads its DQ (ORT fuses them all); False: only the
    #: nodes that run quantized do, the others keep the float tensor (a residual stream stays exact)
    dequantize_all_consumers: bool = True
    keep_float: frozenset[str] = frozenset()
    #: weight storage: int8, or uint8 (zero point 128) where u8 x s8 kernels saturate (x86 without VNNI)
    weight_dtype: WeightDType = "int8"

    def with_(self, **changes) -> "QuantPolicy":
        from dataclasses import replace

        return replace(self, **changes)


#: The per-pattern annotators a target chooses from, and what each puts under Q/DQ:
#:     linear        MatMul / Gemm with a constant weight: the activation input and the weight
#:     conv          Conv / ConvTranspose likewise
#:     conv-output   a Conv's output (after a sole Relu/Clip), so the runtime fuses DQ -> Conv -> Q
#:     passthrough   ops that only move values (pooling, Reshape, Transpose, ...): in and out share a scale
#:     concat        all of Concat's inputs and its output share one scale
#:     residual-add  the output of an Add whose two inputs are quantized
#:     residual-skip an Add fed by a quantized Conv: its other (skip) input, so the Add fuses into the Conv
#:     attention     activation x activation MatMuls (Q·Kᵀ, scores·V), both inputs per tensor
ANNOTATORS: dict[str, dict] = {
    "linear": {"compute_ops": {"MatMul", "Gemm"}},
    "conv": {"compute_ops": {"Conv", "ConvTranspose"}},
    "conv-output": {"quantize_outputs_of": {"Conv"}},
    "passthrough": {"passthrough_ops": {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}},
    "concat": {"shared_scale_ops": {"Concat"}},
    "residual-add": {"residual_add": True},
    "residual-skip": {"residual_skip": True},
    "attention": {"activation_by_activation_matmul": True},
}


def policy_for(name: str, annotators: tuple[str, ...], **fields) -> QuantPolicy:
    """A target's policy from its annotator names (:data:`ANNOTATORS`) and its dtype fields."""
    sets: dict[str, set] = {"compute_ops": set(), "quantize_outputs_of": set(), "passthrough_ops": set(),
                            "shared_scale_ops": set()}
    flags: dict[str, bool] = {}
    for annotator in annotators:
        for key, value in ANNOTATORS[annotator].items():
            if isinstance(value, set):
                sets[key] |= value
            else:
                flags[key] = value
    return QuantPolicy(name=name, **{k: frozenset(v) for k, v in sets.items()}, **flags, **fields)


def op_class(node: ir.Node) -> str:
    """The class a compute node falls in for keep-float decisions."""
    if node.op_type != "Conv":
        return node.op_type
    weight = node.inputs[1]
    group = node.attributes.get_int("group", 1)
    shape = weight.shape if weight is not None else None
    if group > 1 and shape is not None and shape[1] == 1:
        return "ConvDepthwise"
    if shape is not None and shape.rank() == 4 and shape[2] == 1 and shape[3] == 1:
        return "Conv1x1"
    return "Conv"


@dataclass
class WeightSpec:
    """A constant weight to store as INT8, with its per-channel axis (None: per tensor)."""

    value: str
    axis: int | None
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (node name, input index)
    dtype: WeightDType = "int8"


@dataclass
class BiasSpec:
    """A bias stored as INT32 with scale = s_activation * s_weight."""

    value: str
    activation: str
    weight: str
    consumer: tuple[str, int]


@dataclass
class QuantPlan:
    """The decisions for one model: what to observe and quantize, and what stays float and why."""

    activations: list[str] = field(default_factory=list)
    weights: dict[str, WeightSpec] = field(default_factory=dict)
    biases: dict[str, BiasSpec] = field(default_factory=dict)
    shared: list[list[str]] = field(default_factory=list)
    quantized_nodes: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)  # node name -> reason
    #: per activation, the consumers that read its DQ (None: every consumer)
    consumers: dict[str, list[Consumer] | None] = field(default_factory=dict)

    def add_activation(self, name: str, consumer: Consumer | None = None) -> None:
        """Quantize activation ``name`` for ``consumer`` (None: for every consumer)."""
        if name not in self.activations:
            self.activations.append(name)
            self.consumers[name] = []
        readers = self.consumers.get(name)
        if consumer is None:
            self.consumers[name] = None
        elif readers is not None and consumer not in readers:
            readers.append(consumer)

    def to_json(self) -> dict:
        return {
            "activations": len(self.activations),
            "weights": len(self.weights),
            "biases": len(self.biases),
            "quantized_nodes": len(self.quantized_nodes),
            "kept_float": dict(self.kept_float),
        }


def _is_float_activation(value: ir.Value | None) -> bool:
    return (value is not None and value.const_value is None and value.dtype in (ir.DataType.FLOAT, None)
            and not _constant_only(value))


def _constant_only(value: ir.Value) -> bool:
    """True when the value is computed from initializers/constants alone (no graph input reaches it)."""
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.const_value is not None or v.is_initializer():
            continue
        producer = v.producer()
        if producer is None:
            return False  # a graph input
        if producer.op_type == "Constant":
            continue
        stack.extend(i for i in producer.inputs if i is not None)
    return True


def weight_axis(node: ir.Node, rank: int, per_channel: bool = True) -> int | None:
    """The per-channel axis of ``node``'s constant weight (its output channels), or None: per tensor."""
    if not per_channel:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if rank > 2:  # a batched B: ORT's fused integer MatMul takes only a scalar zero point there
        return None
    return rank - 1  # MatMul: output channels are B's last axis


def excluded(node: ir.Node, exclude: frozenset[str]) -> bool:
    """Excluded by op type, node name, or a shell-style pattern on the node name."""
    return node.op_type in exclude or any(fnmatch.fnmatchcase(node.name, pattern) for pattern in exclude)


def annotate(model: ir.Model, policy: QuantPolicy, exclude: frozenset[str] = frozenset(),
             float_reasons: dict[str, str] | None = None) -> QuantPlan:
    """Write the policy's specs on ``model``'s values and nodes (replacing earlier annotations) and
    return :func:`read_plan`'s view. ``float_reasons``: nodes kept float by a measurement, with why
    (they are excluded and carry that reason)."""
    float_reasons = float_reasons or {}
    plan = plan_quantization(model, policy, exclude | frozenset(float_reasons))
    plan.kept_float.update({name: reason for name, reason in float_reasons.items() if name in plan.kept_float})
    _write(model, plan, policy)
    return read_plan(model)


def _clear(graph: ir.Graph) -> None:
    for node in graph:
        for key in (QUANTIZED_KEY, FLOAT_REASON_KEY):
            node.meta.pop(key, None)
        for value in (*node.inputs, *node.outputs):
            if value is not None:
                for key in (SPEC_KEY, ORDER_KEY, BIAS_KEY, CONSUMERS_KEY):
                    value.meta.pop(key, None)
    for value in (*graph.inputs, *graph.initializers.values()):
        for key in (SPEC_KEY, ORDER_KEY, BIAS_KEY, CONSUMERS_KEY):
            value.meta.pop(key, None)


def _write(model: ir.Model, plan: QuantPlan, policy: QuantPolicy) -> None:
    """The plan as annotations: specs on values, decisions on nodes."""
    graph = model.graph
    _clear(graph)
    values = {v.name: v for node in graph for v in node.outputs}
    values.update({v.name: v for v in graph.inputs})
    values.update(graph.initializers)
    roots = _scale_roots(plan)
    order = 0
    for name in plan.activations:
        root = roots.get(name, name)
        values[name].meta[SPEC_KEY] = (SharedSpec(root) if root != name else
                                       QuantSpec(policy.activation_dtype, policy.activation_symmetric))
        values[name].meta[ORDER_KEY] = order = order + 1
        readers = plan.consumers.get(name)
        if not policy.dequantize_all_consumers and readers is not None:
            values[name].meta[CONSUMERS_KEY] = tuple(readers)
    for spec in plan.weights.values():
        values[spec.value].meta[SPEC_KEY] = QuantSpec(spec.dtype, True, spec.axis, role="weight")
        values[spec.value].meta[ORDER_KEY] = order = order + 1
    for bias in plan.biases.values():
        value = values[bias.value]
        derived = DerivedSpec(bias.activation, bias.weight, bias.consumer[0], bias.consumer[1])
        value.meta[BIAS_KEY] = (*value.meta.get(BIAS_KEY, ()), (order := order + 1, derived))
    quantized = set(plan.quantized_nodes)
    for node in graph:
        if node.name in quantized:
            node.meta[QUANTIZED_KEY] = True
        elif node.name in plan.kept_float:
            node.meta[FLOAT_REASON_KEY] = plan.kept_float[node.name]


def _scale_roots(plan: QuantPlan) -> dict[str, str]:
    """Union-find over the plan's scale groups: member -> the group's first-annotated member."""
    parent = {name: name for name in plan.activations}
    rank = {name: i for i, name in enumerate(plan.activations)}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in plan.shared:
        members = [m for m in group if m in parent]
        for other in members[1:]:
            a, b = find(members[0]), find(other)
            if a != b:
                first, second = (a, b) if rank[a] < rank[b] else (b, a)
                parent[second] = first
    return {name: find(name) for name in parent}


def read_plan(model: ir.Model) -> QuantPlan:
    """The annotations on ``model`` as an ordered plan (what observe and lower iterate over)."""
    graph = model.graph
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs})
    values.update(graph.initializers)
    annotated = sorted(((v.meta[ORDER_KEY], v) for v in values.values() if SPEC_KEY in v.meta), key=lambda t: t[0])
    position = {id(node): i for i, node in enumerate(graph)}
    plan = QuantPlan()
    groups: dict[str, list[str]] = {}
    for _, value in annotated:
        spec = value.meta[SPEC_KEY]
        if isinstance(spec, QuantSpec) and spec.role == "weight":
            consumers = [(node.name, index)
                         for node, index in sorted(value.uses(), key=lambda u: position.get(id(u[0]), -1))
                         if index == 1 and node.meta.get(QUANTIZED_KEY) and id(node) in position]
            plan.weights[value.name] = WeightSpec(value.name, spec.axis, consumers, spec.dtype)
        else:
            plan.activations.append(value.name)
            readers = value.meta.get(CONSUMERS_KEY)
            plan.consumers[value.name] = list(readers) if readers is not None else None
            root = spec.value if isinstance(spec, SharedSpec) else value.name
            groups.setdefault(root, []).append(value.name)
    plan.shared = [members for members in groups.values() if len(members) > 1]
    biases = sorted(((order, value, derived) for value in values.values()
                     for order, derived in value.meta.get(BIAS_KEY, ())), key=lambda t: t[0])
    for _, value, derived in biases:
        plan.biases[value.name + "@" + derived.consumer] = BiasSpec(value.name, derived.activation, derived.weight,
                                                                    (derived.consumer, derived.index))
    for node in graph:
        if node.meta.get(QUANTIZED_KEY):
            plan.quantized_nodes.append(node.name)
        elif FLOAT_REASON_KEY in node.meta:
            plan.kept_float[node.name] = node.meta[FLOAT_REASON_KEY]
    return plan


def set_spec(model: ir.Model, value: ir.Value, spec: QuantSpec | SharedSpec) -> None:
    """Annotate (or re-annotate) one value, after every value annotated so far."""
    if ORDER_KEY not in value.meta:
        last = max((v.meta.get(ORDER_KEY, 0) for n in model.graph for v in (*n.inputs, *n.outputs) if v is not None),
                   default=0)
        value.meta[ORDER_KEY] = last + 1
    value.meta[SPEC_KEY] = spec


def activation_specs(model: ir.Model) -> dict[str, QuantSpec]:
    """Per annotated activation, the QuantSpec that decides its parameters (its scale group's
    root's, when shared) — one walk over the graph."""
    values = {v.name: v for v in model.graph.inputs}
    values.update({v.name: v for node in model.graph for v in node.outputs})
    specs = {}
    for name, value in values.items():
        spec = value.meta.get(SPEC_KEY)
        if isinstance(spec, SharedSpec):
            spec = values[spec.value].meta[SPEC_KEY]
        if isinstance(spec, QuantSpec) and spec.role == "activation":
            specs[name] = spec
    return specs


def plan_quantization(model: ir.Model, policy: QuantPolicy, exclude: frozenset[str] = frozenset()) -> QuantPlan:
    """Decide, for every node of the main graph, what the policy quantizes (the decisions
    :func:`annotate` writes; nothing is written here).

    Unnamed or duplicate node names are fixed first: the plan refers to nodes by name.
    """
    common_passes.NameFixPass()(model)
    plan = QuantPlan()
    for node in model.graph:
        name = node.name
        if node.op_type not in policy.compute_ops:
            continue
        if excluded(node, exclude):
            plan.kept_float[name] = "excluded by the user"
            continue
        klass = op_class(node)
        if klass in policy.keep_float:
            plan.kept_float[name] = f"{klass} measured slower in INT8 on this CPU"
            continue
        if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) or len(node.inputs) < 2):
            plan.kept_float[name] = "Gemm with transA is not quantized"
            continue
        x, w = node.inputs[0], node.inputs[1]
        if not _is_float_activation(x):
            plan.kept_float[name] = "first input is not a float activation"
            continue
        weight_is_const = w is not None and w.const_value is not None and w.dtype == ir.DataType.FLOAT
        if not weight_is_const:
            if node.op_type == "MatMul" and policy.activation_by_activation_matmul and _is_float_activation(w):
                plan.add_activation(x.name, (name, 0))
                plan.add_activation(w.name, (name, 1))
                plan.quantized_nodes.append(name)
            elif node.op_type == "MatMul" and _is_float_activation(w):
                plan.kept_float[name] = "activation x activation (attention) stays float"
            else:
                plan.kept_float[name] = "weight is not an FP32 constant"
            continue
        if w.shape is None or w.shape.rank() < 2:
            plan.kept_float[name] = "weight rank < 2"
            continue
        plan.add_activation(x.name, (name, 0))
        axis = weight_axis(node, w.shape.rank(), policy.per_channel)
        spec = plan.weights.setdefault(w.name, WeightSpec(w.name, axis, dtype=policy.weight_dtype))
        spec.consumers.append((name, 1))
        if policy.quantize_bias and len(node.inputs) > 2 and node.inputs[2] is not None:
            b = node.inputs[2]
            out_channels = w.shape[spec.axis] if spec.axis is not None else None
            if (b.const_value is not None and b.shape is not None and b.shape.rank() == 1
                    and (out_channels is None or b.shape[0] == out_channels)):
                plan.biases[b.name + "@" + name] = BiasSpec(b.name, x.name, w.name, (name, 2))
        plan.quantized_nodes.append(name)
        if node.op_type in policy.quantize_outputs_of:
            _quantize_output(node.outputs[0], policy, plan)
    if policy.residual_skip:
        _quantize_skip_inputs(model, plan)
    _propagate_shared(model, policy, plan)
    return plan


def _quantize_skip_inputs(model: ir.Model, plan: QuantPlan) -> None:
    """Residual ``Add(conv(x), skip)``: Q/DQ on ``skip`` only, so the runtime runs the Add in the
    quantized Conv's epilogue (TensorRT: Conv + Add (+ ReLU) -> one INT8 kernel). When both inputs
    come from quantized Convs, the later Conv takes the Add (it is computed last) and the earlier
    one's output is the skip."""
    quantized = set(plan.quantized_nodes)
    position = {id(node): i for i, node in enumerate(model.graph)}

    def conv_position(value: ir.Value) -> int:
        producer = value.producer()
        if producer is None or producer.op_type != "Conv" or producer.name not in quantized:
            return -1
        return position.get(id(producer), -1)

    for node in model.graph:
        if node.op_type != "Add" or len(node.inputs) != 2 or any(v is None for v in node.inputs):
            continue
        places = [conv_position(v) for v in node.inputs]
        if max(places) < 0:
            continue
        skip = 0 if places[0] < places[1] else 1
        value = node.inputs[skip]
        if _is_float_activation(value):
            plan.add_activation(value.name, (node.name, skip))


def _quantize_output(out: ir.Value, policy: QuantPolicy, plan: QuantPlan) -> None:
    """Q/DQ on a compute op's output, moved past a sole Relu/Clip so the runtime fuses it."""
    uses = list(out.uses())
    if len(uses) == 1 and uses[0][0].op_type in policy.activation_followers and not out.is_graph_output():
        out = uses[0][0].outputs[0]
    if out.dtype in (ir.DataType.FLOAT, None):
        plan.add_activation(out.name)


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (ir.DataType.FLOAT, None) and value.const_value is None


def _propagate_shared(model: ir.Model, policy: QuantPolicy, plan: QuantPlan) -> None:
    """Let int8 data flow through ops that only move it, with one scale on each side.

    A passthrough op (MaxPool, Reshape, ...) with a quantized input gets a quantized output, and
    one with a quantized output gets a quantized input, both sharing a scale. A shared-scale op
    (Concat) with any quantized member gets all its float inputs and its output quantized, all on
    one scale. Residual Adds (when the policy says so) get their output quantized. To a fixed point.
    """
    quantized = set(plan.activations)

    def mark(value: ir.Value) -> bool:  # every consumer reads it: these ops move the quantized tensor on
        if value.name in quantized or not _is_float(value):
            return False
        quantized.add(value.name)
        plan.add_activation(value.name)
        return True

    changed = True
    while changed:
        changed = False
        for node in model.graph:
            if node.op_type in policy.passthrough_ops and node.inputs and node.inputs[0] is not None:
                x, y = node.inputs[0], node.outputs[0]
                if x.name in quantized or y.name in quantized:
                    changed |= mark(x) | mark(y)
            elif node.op_type in policy.shared_scale_ops:
                members = [v for v in (*node.inputs, *node.outputs) if v is not None]
                if any(v.name in quantized for v in members) and all(_is_float(v) for v in members):
                    for v in members:
                        changed |= mark(v)
            elif policy.residual_add and node.op_type == "Add":
                a, b = node.inputs
                if a is not None and b is not None and a.name in quantized and b.name in quantized:
                    changed |= mark(node.outputs[0])
    for node in model.graph:
        if node.op_type in policy.passthrough_ops or node.op_type in policy.shared_scale_ops:
            members = [v.name for v in (*node.inputs[:1 if node.op_type in policy.passthrough_ops else None],
                                        *node.outputs) if v is not None and v.name in quantized]
            if len(members) > 1:
                plan.shared.append(members)
