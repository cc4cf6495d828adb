"""Clean-up passes: dead nodes, identities and no-ops, common subexpressions, duplicate
initializers, Constant lifting, topological order.

Each is onnx-ir's or onnxscript's own pass or rule set, given a stable name (dedup-initializers is
our own: onnx-ir's hashes every byte of every weight on every sweep):

    dead-code     remove nodes whose outputs reach no graph output; unused initializers (subgraphs'
                  too), functions and opsets
    identity      Identity(x) -> x (not where the Identity gives a graph output a value of its own)
    no-op         x+0 -> x, x-0 -> x, x*1 -> x, x/1 -> x (exactly 0 or 1), Dropout(inference) -> x,
                  Cast(x: T -> T) -> x, Expand(x, shape(x)) -> x, Transpose(x, id) -> x,
                  Cast(Cast(x)) -> Cast(x) where exact, Reshape(Reshape(x)) -> Reshape(x), ...
                  (not Flatten -> Reshape: measured slower on ORT CPU)
    cse           two nodes with the same op, attributes and inputs -> one
    dedup-initializers   byte-identical initializers -> one (candidates by dtype, shape and a few
                         sampled bytes; only those are compared in full, so weights that differ
                         are read a few KB each, not hashed whole)
    lift-constants       Constant node -> graph initializer; an initializer also listed as a graph
                         input (IR < 4 models, torch's keep_initializers_as_inputs) stops being an
                         input: a weight, not an overridable default (from IR 4 a one-element one,
                         a knob, stays an input; an IR < 4 model is raised to IR 4)
    topo-sort            nodes in a valid topological order
    default-attributes   omitted attributes written out with their schema defaults, so that
                         rules match ``ReduceMean(x)`` and ``ReduceMean(x, keepdims=1)`` alike
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import RewriteRule
from onnxscript.rewriter.rules.common import _basic_rules, _no_op

from qcompile.passes.graph.rewrite import IR_INITIALIZERS_OPTIONAL, RuleSetPass, allow_initializers


class DeadCodeEliminationPass(ir.passes.InPlacePass):
    """Remove unused nodes, then unused functions and opset imports."""

    name = "dead-code"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for inner in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                      common.RemoveUnusedOpsetsPass()):
            modified |= inner(model).modified
        # onnx-ir drops unused initializers of the main graph only; If/Loop/Scan bodies keep theirs.
        for graph in model.graph.subgraphs():
            for value in tuple(graph.initializers.values()):
                if not (value.uses() or value.is_graph_output() or value.is_graph_input()):
                    graph.initializers.pop(value.name)
                    modified = True
        return ir.passes.PassResult(model, modified)


def _named(pass_instance: ir.passes.PassBase, name: str) -> ir.passes.PassBase:
    pass_instance.name = name  # type: ignore[attr-defined]
    return pass_instance


def dead_code() -> ir.passes.PassBase:
    return DeadCodeEliminationPass()


class IdentityRemovalPass(common.IdentityEliminationPass):
    """onnx-ir's Identity elimination, which keeps an Identity whose output is a graph output when
    its input cannot stand in for that output:

    - the input is already an output of the same graph (``y = x; z = Identity(x)`` with both x and
      z outputs: a Scan body's carried state and its scan output). Removing it lists one value
      twice and renames it; ONNX Runtime's Scan then reads the wrong output.
    - the input is not produced by a node of that graph (an outer-scope value seen from an
      If/Loop/Scan body): renaming it would rename the outer graph's value.
    """

    name = "identity"

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 and len(node.outputs) == 1:
            x, y = node.inputs[0], node.outputs[0]
            if x is not None and y.is_graph_output():
                producer = x.producer()
                if x.is_graph_output() or producer is None or producer.graph is not node.graph:
                    return False
        return super()._try_eliminate_identity_node(node)


def identity() -> ir.passes.PassBase:
    return IdentityRemovalPass()


class NoOpRemovalPass(RuleSetPass):
    """onnxscript's no-op rules rewrite to Identity; the Identities are then removed."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:
            IdentityRemovalPass()(model)
        return result


def _exactly(neutral: float):
    """A rule condition: the constant operand is exactly ``neutral``. onnxscript's pattern constants
    match within abs_tol 1e-8 and rel_tol 1e-5, so its ``x + 0`` rule also removed ``x + 1e-12`` (a
    LayerNorm epsilon: zero-variance rows then give 0/0 = NaN) and ``x / 0.999999``."""

    def check(context, x, **_) -> bool:
        others = [v for v in context.root.inputs if v is not x]
        return (len(others) == 1 and others[0].const_value is not None
                and bool(np.all(others[0].const_value.numpy() == neutral)))

    return check


def no_op() -> ir.passes.PassBase:
    # Flatten -> Reshape is a canonicalisation, not a removal, and measured slower on ORT CPU
    # (digits_cnn, docs/benchmarks.md): left out.
    basic = [r for r in _basic_rules.basic_optimization_rules().rules if r is not _basic_rules.flatten_to_reshape_rule]
    rules = [
        *RewriteRule(_no_op.mul_by_1, _no_op.identity, _exactly(1.0)).commute(),
        *RewriteRule(_no_op.add_0, _no_op.identity, _exactly(0.0)).commute(),
        RewriteRule(_no_op.sub_0, _no_op.identity, _exactly(0.0)),
        RewriteRule(_no_op.div_by_1, _no_op.identity, _exactly(1.0)),
        _no_op.dropout_zero_rule,
        _no_op.dropout_inference_rule,
        *basic,
    ]
    return NoOpRemovalPass("no-op", rules)


_CSE_MARK = "_qcompile_cse_keep"


class CommonSubexpressionPass(ir.passes.InPlacePass):
    """onnx-ir's CSE, with graph outputs keeping their declared type and shape: where the removed
    twin is a graph output, onnx-ir renames the kept twin to its name but leaves the kept value's
    (possibly missing) type, and an untyped graph output fails the checker."""

    name = "cse"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        declared = {v.name: (v.type, v.shape) for v in model.graph.outputs}
        # Two Identities of one value, both giving a graph output its own value: onnx-ir's merge
        # puts a new Identity in the removed one's place (z = Identity(y) for z = Identity(x)), and
        # constant folding turns it back, sweep after sweep. A unique mark keeps them apart.
        marked = [n for n in model.graph if n.op_type == "Identity" and n.domain == ""
                  and all(v.is_graph_output() for v in n.outputs)]
        for i, node in enumerate(marked):
            node.attributes[_CSE_MARK] = ir.AttrInt64(_CSE_MARK, i)
        try:
            result = common.CommonSubexpressionEliminationPass()(model)
        finally:
            for node in marked:
                node.attributes.pop(_CSE_MARK, None)
        for value in model.graph.outputs:
            type_, shape = declared.get(value.name, (None, None))
            if value.type is None:
                value.type = type_
            if value.shape is None:
                value.shape = shape
        return ir.passes.PassResult(model, result.modified)


def cse() -> ir.passes.PassBase:
    return CommonSubexpressionPass()


class DeduplicateInitializersPass(ir.passes.InPlacePass):
    """Byte-identical initializers -> one; candidates share dtype, shape and sampled bytes."""

    name = "dedup-initializers"
    #: Bytes read from the start, middle and end of each tensor for its fingerprint.
    SAMPLE_BYTES = 4096

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            kept: dict[tuple, list[ir.Value]] = {}
            for value in tuple(graph.initializers.values()):
                tensor = value.const_value
                if (tensor is None or value.is_graph_input() or value.is_graph_output()
                        or isinstance(tensor, ir.StringTensor)):
                    continue
                key = (tensor.dtype, tuple(tensor.shape.numpy()), self._fingerprint(tensor))
                twin = next((v for v in kept.get(key, ()) if _equal(v.const_value, tensor)), None)
                if twin is None:
                    kept.setdefault(key, []).append(value)
                    continue
                value.replace_all_uses_with(twin)
                graph.initializers.pop(value.name)
                modified = True
        return ir.passes.PassResult(model, modified)

    def _fingerprint(self, tensor: ir.TensorProtocol) -> bytes:
        flat = _bytes_of(tensor)
        n, k = flat.size, self.SAMPLE_BYTES
        if n <= 3 * k:
            return flat.tobytes()
        middle = (n - k) // 2
        return flat[:k].tobytes() + flat[middle:middle + k].tobytes() + flat[-k:].tobytes()


def _bytes_of(tensor: ir.TensorProtocol) -> np.ndarray:
    return np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)


def _equal(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    return bool(np.array_equal(_bytes_of(a), _bytes_of(b)))


def dedup_initializers() -> ir.passes.PassBase:
    return DeduplicateInitializersPass()


class LiftConstantsPass(common.LiftConstantsToInitializersPass):
    """onnx-ir's Constant lifting, and initializers listed as graph inputs made plain initializers.

    ONNX lets a feed override an initializer that is also a graph input; nothing can then be folded
    or quantized through it. Exporters list weights that way by convention (every IR < 4 model, torch
    with ``keep_initializers_as_inputs``), never to have them fed, so they are taken as the weights
    they are: the model then has only its real inputs (a feed that names a weight is refused by the
    runtime, never silently ignored). From IR 4, where listing one is a choice, a single-element
    initializer stays an input: that is how a default knob is exported (an NMS threshold). An IR < 4
    model is raised to IR 4, where initializers need not be graph inputs (below it the lifted model
    fails the checker)."""

    name = "lift-constants"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        graph = model.graph
        legacy = model.ir_version < IR_INITIALIZERS_OPTIONAL
        defaults = [v for v in graph.inputs if v.name in graph.initializers
                    and (legacy or (v.const_value is not None and v.const_value.size > 1))]
        for value in defaults:
            graph.inputs.remove(value)
        if result.modified or defaults:
            allow_initializers(model)
        return ir.passes.PassResult(model, result.modified or bool(defaults))


def lift_constants() -> ir.passes.PassBase:
    return LiftConstantsPass(lift_all_constants=True, size_limit=0)


def topo_sort() -> ir.passes.PassBase:
    return _named(common.TopologicalSortPass(), "topo-sort")


def default_attributes() -> ir.passes.PassBase:
    return _named(common.AddDefaultAttributesPass(), "default-attributes")
