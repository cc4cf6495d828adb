"""Clean-up passes: dead nodes, identities and no-ops, common subexpressions, duplicate
initializers, Constant lifting, topological order.

Each is onnx-ir's or onnxscript's own pass or rule set, given a stable name (dedup-initializers is
our own: onnx-ir's hashes every byte of every weight on every sweep):

    dead-code     remove nodes whose outputs reach no graph output; unused functions and opsets
    identity      Identity(x) -> x
    no-op         x+0 -> x, x-0 -> x, x*1 -> x, x/1 -> x, Dropout(inference) -> x,
                  Cast(x: T -> T) -> x, Expand(x, shape(x)) -> x, Transpose(x, id) -> x,
                  Cast(Cast(x)) -> Cast(x) where exact, Reshape(Reshape(x)) -> Reshape(x), ...
                  (not Flatten -> Reshape: measured slower on ORT CPU)
    cse           two nodes with the same op, attributes and inputs -> one
    dedup-initializers   byte-identical initializers -> one (candidates by dtype, shape and a few
                         sampled bytes; only those are compared in full, so weights that differ
                         are read a few KB each, not hashed whole)
    lift-constants       Constant node -> graph initializer
    topo-sort            nodes in a valid topological order
    default-attributes   omitted attributes written out with their schema defaults, so that
                         rules match ``ReduceMean(x)`` and ``ReduceMean(x, keepdims=1)`` alike
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter.rules.common import _basic_rules, _no_op

from qcompile.passes._rewrite import RuleSetPass


class DeadCodeEliminationPass(ir.passes.InPlacePass):
    """Remove unused nodes, then unused functions and opset imports."""

    name = "dead-code"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for inner in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
            modified |= inner(model).modified
        return ir.passes.PassResult(model, modified)


def _named(pass_instance: ir.passes.PassBase, name: str) -> ir.passes.PassBase:
    pass_instance.name = name  # type: ignore[attr-defined]
    return pass_instance


def dead_code() -> ir.passes.PassBase:
    return DeadCodeEliminationPass()


def identity() -> ir.passes.PassBase:
    return _named(common.IdentityEliminationPass(), "identity")


class NoOpRemovalPass(RuleSetPass):
    """onnxscript's no-op rules rewrite to Identity; the Identities are then removed."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:
            common.IdentityEliminationPass()(model)
        return result


def no_op() -> ir.passes.PassBase:
    # Flatten -> Reshape is a canonicalisation, not a removal, and measured slower on ORT CPU
    # (digits_cnn, docs/benchmarks.md): left out.
    basic = [r for r in _basic_rules.basic_optimization_rules().rules if r is not _basic_rules.flatten_to_reshape_rule]
    rules = list(_no_op.rules.rules) + basic
    return NoOpRemovalPass("no-op", rules)


def cse() -> ir.passes.PassBase:
    return _named(common.CommonSubexpressionEliminationPass(), "cse")


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
                if tensor is None or value.is_graph_input() or value.is_graph_output() or isinstance(tensor, ir.StringTensor):
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


def lift_constants() -> ir.passes.PassBase:
    return _named(common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0), "lift-constants")


def topo_sort() -> ir.passes.PassBase:
    return _named(common.TopologicalSortPass(), "topo-sort")


def default_attributes() -> ir.passes.PassBase:
    return _named(common.AddDefaultAttributesPass(), "default-attributes")
