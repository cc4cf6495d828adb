"""Mixed precision: a float32 model to FP16 (or BF16) compute, range-sensitive parts kept FP32.

TensorRT 11 builds strongly typed networks: each tensor's type in the ONNX graph is the precision
its layer runs in. This pass writes that precision into the graph: nodes that are safe in the low
type get their float tensors retyped, the rest stay FLOAT, and a ``Cast`` is inserted only where a
value crosses between the two. Graph inputs and outputs keep type FLOAT and their names.

The formats (u: unit roundoff, the relative error of one round-to-nearest):

    float16   5-bit exponent, 10+1-bit significand: max 65504, min normal 2^-14 = 6.1e-5
              (below: subnormal, fewer bits; below 2^-25 = 3e-8: zero), u = 2^-11 = 4.9e-4
    bfloat16  8-bit exponent (float32's range: max 3.39e38, min normal 1.2e-38),
              7+1-bit significand, u = 2^-8 = 3.9e-3

Which nodes run in the low type, in order (the first rule that applies gives the reason recorded in
``kept_fp32``):

1. **Caller**: a node named in ``keep_fp32`` stays FP32.
2. **Rule**: custom-domain ops (com.microsoft, functions: kernels' low-precision support unknown),
   ops with subgraphs (If/Loop/Scan: their bodies stay FP32; a body that reads an outer low value
   gets it through a Cast to FLOAT), long reductions (:data:`LONG_REDUCTIONS`), and every op not on
   the allowlist (:data:`HEAVY_OPS`, :data:`CHEAP_OPS`, Q/DQ) stay FP32. The op's schema at the
   model's opset must also accept the low type for the type parameter that carries its float
   tensors (bfloat16 Conv needs opset 22; Q/DQ take float16 scales only from opset 19 -- opset 13
   allows float32 scales only). Only the float tensors typed by a converted type parameter change:
   Resize's roi and scales, LayerNormalization's Mean/InvStdDev and Dropout's ratio stay FLOAT.
   Long reductions stay FP32 *by rule*, not by a length bound: a sum of n terms grows up to n
   times the largest term (overflow that no per-element check sees), an fp16-accumulating kernel's
   error grows like n u, their lengths are often symbolic (sequence length), and they are cheap
   (memory-bound, small outputs) -- FP32 costs almost nothing. ReduceMax/ReduceMin/ArgMax/ArgMin
   are exact in any precision and on the allowlist.
3. **Q/DQ scales**: QuantizeLinear/DequantizeLinear run in the low type only when every scale
   element is a constant, nonzero, and within the format's NORMAL range (>= 6.1e-5 for fp16) or
   held exactly (qcompile's quantizer rounds scales to the low type before computing codes): a
   subnormal scale that is not exact loses significand bits for every weight it dequantizes. The scale initializer
   is then converted, so a DQ writes fp16 straight into the fp16 MatMul/Conv: no Cast between DQ
   and compute, which would split TensorRT's Q/DQ fusion. For the same reason a node that reads an
   FP32 DequantizeLinear output, or feeds an FP32 QuantizeLinear, stays FP32 (one level, no
   cascade). Zero points are never touched (int8/uint8/int4/float8).
4. **Constants**: a node whose converted input is a constant (initializer or Constant node) that
   does not survive the low type stays FP32: its max |x| (finite elements) exceeds the format's max
   (65504 for fp16: it would become inf), or its round trip loses more than ``2u`` relative L2
   (:data:`CONSTANT_REL_L2`). Rounding a tensor whose elements are all in the normal range moves
   each by at most ``u |x|``, so its relative L2 error is at most ``u``; more than ``2u`` means a
   large part of its energy is in subnormal/underflowed elements (mass underflow, e.g. weights
   ~1e-6 in fp16).
5. **Measurement** (fp16 only; bf16 has float32's exponent range): a node stays FP32 when any of
   its float inputs or outputs has calibration ``absmax`` > ``65504 / headroom``. The default
   headroom of 4 (:data:`DEFAULT_HEADROOM`: two binades) covers inputs beyond the calibration
   set's maxima (a max over a sample underestimates the population's, and outliers of a few times
   the typical max are common in transformer activations), at no precision cost (a value of 16k
   still has all 11 significand bits).
6. **Islands**: cheap ops (everything but :data:`HEAVY_OPS`) connected to each other whose only
   non-constant neighbours are FP32 nodes (graph inputs/outputs and constants count as neither)
   stay FP32: in the low type they would add Casts on both sides and save nothing (elementwise and
   data-movement ops are memory-bound; the Casts are extra memory passes). Heavy ops (MatMul, Gemm,
   Conv, ConvTranspose) run in the low type even between FP32 neighbours: tensor cores.

Everything else runs in the low type. Then:

- constants: converted in place when every consumer reads the low type; a constant also read in
  FLOAT (an FP32 node, a subgraph, a graph output) keeps its original and gets a low-type copy.
  Constant nodes are converted the same way (their ``value`` attribute retyped, or a copy).
- ``Cast(to=FLOAT)`` whose every consumer reads the low type is retargeted (``to=FLOAT16``)
  rather than followed by a second Cast; ``ConstantOfShape`` likewise gets a low-type ``value``.
- a value crossing precisions gets one shared Cast (one per value, not per consumer): low -> FLOAT
  for FP32 consumers (subgraph readers included) and graph outputs (the internal value is renamed,
  the Cast's output takes the output's name), FLOAT -> low for low consumers of FP32 values and of
  graph inputs. Shape, Size and Cast read either type and get no Cast.
- Casts that do nothing (input already of type ``to``) and pairs that cancel exactly
  (low -> FLOAT -> low, the FLOAT value read by nothing else) are removed; nodes are sorted.

``kept_fp32`` (node name -> reason) lists every node with a float tensor that stays FP32 (nodes
without a name are labelled ``<op>_<index>``), ``converted`` every node retyped to the low type.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Iterable, Iterator, Literal, Mapping

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from qcompile.passes.graph.rewrite import allow_initializers
from qcompile.passes.irutil import add_initializer, drop_resident

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP16_UNIT_ROUNDOFF = 2.0**-11
BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
BF16_MIN_NORMAL = 2.0**-126
BF16_UNIT_ROUNDOFF = 2.0**-8
#: Activations stay FP32 above ``max / DEFAULT_HEADROOM`` (measured absmax): two binades of margin.
DEFAULT_HEADROOM = 4.0
#: A constant's round trip may lose this many unit roundoffs of relative L2 (all-normal tensors: <= 1).
CONSTANT_REL_L2 = 2.0

LowDType = Literal["float16", "bfloat16"]


@dataclass(frozen=True)
class LowFormat:
    """A low-precision float format: its ONNX and numpy types and range."""

    name: str
    dtype: ir.DataType
    numpy: np.dtype
    max: float
    min_normal: float
    unit_roundoff: float
    #: activations can overflow it (fp16); bf16 shares float32's exponent range
    range_limited: bool

    @property
    def type_str(self) -> str:
        return f"tensor({self.name})"


FORMATS: dict[str, LowFormat] = {
    "float16": LowFormat("float16", ir.DataType.FLOAT16, np.dtype(np.float16), FP16_MAX, FP16_MIN_NORMAL,
                         FP16_UNIT_ROUNDOFF, True),
    "bfloat16": LowFormat("bfloat16", ir.DataType.BFLOAT16, np.dtype(ml_dtypes.bfloat16), BF16_MAX,
                          BF16_MIN_NORMAL, BF16_UNIT_ROUNDOFF, False),
}
LOW_DTYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})

#: Compute-bound ops: worth their Casts even between FP32 neighbours (tensor cores).
HEAVY_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
#: Elementwise, activation, normalisation, pooling and data-movement ops whose ONNX schemas take
#: float16 and whose TensorRT / ORT-GPU kernels are fine in it (normalisations and Softmax compute
#: their statistics in FP32 internally; LayerNormalization's stash_type=1 says so).
CHEAP_OPS = frozenset({
    # elementwise arithmetic
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Max", "Min", "Sqrt", "Reciprocal", "Pow", "Floor", "Ceil", "Round",
    "Sign", "Clip", "Where", "Erf",
    # activations
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Softplus",
    "Softsign", "Gelu", "Mish", "ThresholdedRelu",
    # normalisation, softmax
    "BatchNormalization", "LayerNormalization", "Softmax",
    # pooling, and reductions that are exact in any precision
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin",
    # data movement
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Slice", "Gather", "GatherElements",
    "Split", "Expand", "Identity", "Pad", "Tile", "DepthToSpace", "SpaceToDepth", "Dropout", "Resize",
})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
ALLOWLIST = HEAVY_OPS | CHEAP_OPS | QDQ_OPS
#: Kept FP32 by rule (module docstring, rule 2).
LONG_REDUCTIONS = frozenset({"ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceProd",
                             "ReduceLogSum", "ReduceLogSumExp", "CumSum"})
#: Ops that read only their input's shape: either precision, never a Cast.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
#: Ops whose low-type conversion is restricted to these type parameters (the others keep FLOAT).
CONVERTED_PARAMS: dict[str, frozenset[str]] = {
    "Resize": frozenset({"T1"}),  # X; roi (T2) and scales stay float32
    "LayerNormalization": frozenset({"T"}),  # Mean/InvStdDev (U) stay float32
    "Dropout": frozenset({"T"}),  # ratio (T1) stays float32
}
#: Producers of a float value whose type can follow their consumers (a retyped attribute, no Cast).
FLEX_OPS = frozenset({"Cast", "Constant", "ConstantOfShape"})


# ---------------------------------------------------------------------------------------------------
# Schemas and element types


def default_opset(model: ir.Model) -> int:
    """The model's default-domain opset version."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", onnx.defs.onnx_opset_version()))


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


@cache
def schema_of(op_type: str, opset: int) -> onnx.defs.OpSchema | None:
    """The default-domain schema of ``op_type`` at ``opset``, None if there is none."""
    try:
        return onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return None


def _formal_types(formals: list, count: int) -> list[str | None]:
    """The type string (type parameter or concrete ``tensor(x)``) of each of ``count`` slots."""
    types: list[str | None] = []
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    for i in range(count):
        if i < len(formals):
            types.append(formals[i].type_str)
        elif formals and formals[-1].option == variadic:
            types.append(formals[-1].type_str)
        else:
            types.append(None)
    return types


def slot_types(node: ir.Node, opset: int) -> tuple[list[str | None], list[str | None]] | None:
    """(input type strings, output type strings) of a default-domain node, from its schema."""
    schema = schema_of(node.op_type, opset)
    if schema is None:
        return None
    return _formal_types(schema.inputs, len(node.inputs)), _formal_types(schema.outputs, len(node.outputs))


def allows(op_type: str, opset: int, param: str, type_str: str) -> bool:
    """Whether ``op_type``'s type parameter ``param`` accepts ``type_str`` at ``opset``."""
    schema = schema_of(op_type, opset)
    if schema is None:
        return False
    return any(tc.type_param_str == param and type_str in tc.allowed_type_strs for tc in schema.type_constraints)


def dtype_of_type_str(type_str: str | None) -> ir.DataType | None:
    """``tensor(float)`` -> FLOAT; None for type parameters and non-tensor types."""
    if not type_str or not type_str.startswith("tensor(") or not type_str.endswith(")"):
        return None
    try:
        return ir.DataType[type_str[len("tensor("):-1].upper()]
    except KeyError:
        return None


def infer_dtypes(model: ir.Model) -> dict[ir.Value, ir.DataType]:
    """The element type of every tensor value whose type is declared or follows from the schemas.

    Declared types win. Otherwise: Cast's ``to``, Constant/ConstantOfShape's attribute, If's branch
    outputs, and each schema type parameter bound by any slot that has a known type (so an untyped
    input of a node whose parameter is bound elsewhere is inferred too). Unknown: absent."""
    known: dict[ir.Value, ir.DataType] = {}
    _infer_graph(model.graph, default_opset(model), known)
    return known


def _declare(value: ir.Value, known: dict[ir.Value, ir.DataType]) -> None:
    if value.dtype is not None:
        known[value] = value.dtype
    elif value.const_value is not None:
        known[value] = value.const_value.dtype


def _infer_graph(graph: ir.Graph, opset: int, known: dict[ir.Value, ir.DataType]) -> None:
    for value in (*graph.inputs, *graph.initializers.values()):
        _declare(value, known)
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                _infer_graph(attr.value, opset, known)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    _infer_graph(sub, opset, known)
        for value in node.outputs:
            _declare(value, known)
        if is_default_domain(node):
            _infer_node(node, opset, known)


def _attr_dtype(node: ir.Node) -> ir.DataType | None:
    """The element type a Constant or ConstantOfShape produces."""
    if node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        return attr.value.dtype if attr is not None else ir.DataType.FLOAT
    for name, attr in node.attributes.items():
        if name == "value" or name == "sparse_value":
            return attr.value.dtype
        if name in ("value_float", "value_floats"):
            return ir.DataType.FLOAT
        if name in ("value_int", "value_ints"):
            return ir.DataType.INT64
        if name in ("value_string", "value_strings"):
            return ir.DataType.STRING
    return None


def _infer_node(node: ir.Node, opset: int, known: dict[ir.Value, ir.DataType]) -> None:
    def put(value: ir.Value | None, dtype: ir.DataType | None) -> None:
        if value is not None and dtype is not None and value not in known:
            known[value] = dtype

    op = node.op_type
    if op == "Cast":
        put(node.outputs[0], ir.DataType(node.attributes.get_int("to", 0)))
    elif op == "CastLike" and len(node.inputs) > 1 and node.inputs[1] is not None:
        put(node.outputs[0], known.get(node.inputs[1]))
    elif op in ("Constant", "ConstantOfShape"):
        put(node.outputs[0], _attr_dtype(node))
    elif op == "If":
        branch = node.attributes.get("then_branch")
        if branch is not None:
            for out, inner in zip(node.outputs, branch.value.outputs):
                put(out, known.get(inner, inner.dtype))
    else:
        types = slot_types(node, opset)
        if types is None:
            return
        slots = [*zip(node.inputs, types[0]), *zip(node.outputs, types[1])]
        bound: dict[str, ir.DataType] = {}
        for value, type_str in slots:
            if value is not None and type_str and value in known:
                bound.setdefault(type_str, known[value])
        for value, type_str in slots:
            put(value, dtype_of_type_str(type_str) or bound.get(type_str or ""))


# ---------------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Plan:
    """The input and output slots of a node that take the low type."""

    inputs: frozenset[int]
    outputs: frozenset[int]


def constant_of(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor of an initializer (not an overridable graph input) or of a Constant node's output."""
    if value.is_graph_input():
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def rel_l2(reference: np.ndarray, approx: np.ndarray) -> float:
    """||approx - reference|| / ||reference|| (0 for an all-zero reference), in float32 after scaling by the
    largest |reference| (no overflow of the squares; float32 sums are ample for a threshold test)."""
    ref = np.asarray(reference, dtype=np.float32).ravel()
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = np.asarray(approx).astype(np.float32).ravel() - ref
    if scale == 0.0 or not np.isfinite(scale):
        return 0.0 if not np.any(diff) else float("inf")
    ref = ref / np.float32(scale)
    diff /= np.float32(scale)
    return float(np.sqrt(np.dot(diff, diff) / np.dot(ref, ref)))


class MixedPrecisionPass(ir.passes.InPlacePass):
    """Convert a float32 model to FP16 (or BF16) compute with FP32 islands and minimal Casts.

    The rules are in the module docstring. After :meth:`call`, ``kept_fp32`` maps every node that
    stays FP32 to its reason and ``converted`` lists the nodes retyped to the low type."""

    name = "mixed-precision"

    def __init__(self, dtype: LowDType = "float16", *, keep_fp32: frozenset[str] = frozenset(),
                 absmax: Mapping[str, float] | None = None, headroom: float = DEFAULT_HEADROOM) -> None:
        """``keep_fp32``: node names the caller keeps FP32; ``absmax``: measured max |x| per float value
        name (calibration); ``headroom``: activations above ``max / headroom`` stay FP32 (fp16 only)."""
        super().__init__()
        if dtype not in FORMATS:
            raise ValueError(f"dtype must be one of {', '.join(FORMATS)}, not {dtype!r}")
        if not headroom >= 1.0:
            raise ValueError(f"headroom must be >= 1, not {headroom}")
        self.format = FORMATS[dtype]
        self.keep_fp32 = frozenset(keep_fp32)
        self.absmax = dict(absmax or {})
        self.headroom = float(headroom)
        self.kept_fp32: dict[str, str] = {}
        self.converted: list[str] = []

    @property
    def activation_limit(self) -> float:
        """Measured activations above this stay FP32 (inf for bf16)."""
        return self.format.max / self.headroom if self.format.range_limited else float("inf")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        common.TopologicalSortPass()(model)
        decisions = _Decisions(model, self)
        decisions.decide()
        self.kept_fp32 = {decisions.label[n]: reason for n, reason in decisions.fp32.items()}
        self.converted = [decisions.label[n] for n in model.graph if n in decisions.low or n in decisions.flex_low]
        modified = _Rewriter(model, decisions).rewrite()
        if modified:
            remove_redundant_casts(model)
            allow_initializers(model)
            common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified)


class _Decisions:
    """Which main-graph nodes run in the low type (``low``: node -> plan) or stay FP32 (``fp32``:
    node -> reason); ``flex_low``: Cast/Constant/ConstantOfShape nodes retyped to the low type."""

    def __init__(self, model: ir.Model, options: MixedPrecisionPass) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = default_opset(model)
        self.options = options
        self.format = options.format
        self.dtypes = infer_dtypes(model)
        self.label = {node: node.name or f"{node.op_type}_{i}" for i, node in enumerate(self.graph)}
        self.low: dict[ir.Node, Plan] = {}
        self.fp32: dict[ir.Node, str] = {}
        self.flex: set[ir.Node] = set()
        self.flex_low: set[ir.Node] = set()
        self._constant_checks: dict[ir.Value, str | None] = {}
        self._constants: dict[ir.Value, bool] = {}

    def is_constant(self, value: ir.Value) -> bool:
        if value not in self._constants:
            self._constants[value] = constant_of(value) is not None
        return self._constants[value]

    def is_float(self, value: ir.Value | None) -> bool:
        return value is not None and self.dtypes.get(value) == ir.DataType.FLOAT

    def decide(self) -> None:
        for node in self.graph:
            self._classify(node)
        for check in (self._measured, self._constant_problem):
            for node in list(self.low):
                reason = check(node)
                if reason is not None:
                    self._keep(node, reason)
        self._qdq_neighbours()
        self._islands()
        self._flex()

    def _keep(self, node: ir.Node, reason: str) -> None:
        self.low.pop(node, None)
        self.fp32[node] = reason

    # -- rules -------------------------------------------------------------------------------------

    def _classify(self, node: ir.Node) -> None:
        floats = [v for v in (*node.inputs, *node.outputs) if self.is_float(v)]
        if not floats:
            return
        op = node.op_type
        if node.name in self.options.keep_fp32:
            self.fp32[node] = "keep_fp32: excluded by the caller"
        elif not is_default_domain(node):
            self.fp32[node] = f"custom domain {node.domain!r}: low-precision kernels unknown"
        elif any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            self.fp32[node] = f"{op} has a subgraph: its bodies stay FP32"
        elif op in SHAPE_ONLY_OPS:
            return
        elif op in FLEX_OPS:
            if any(self.is_float(v) for v in node.outputs):
                self.flex.add(node)
        elif op in LONG_REDUCTIONS:
            self.fp32[node] = f"{op} is a long reduction: FP32 by rule (sums grow with length, fp16 accumulation error)"
        elif op not in ALLOWLIST:
            self.fp32[node] = f"{op} is not on the {self.format.name} allowlist"
        else:
            plan = self._plan(node)
            if isinstance(plan, str):
                self.fp32[node] = plan
            else:
                reason = self._scale_problem(node, plan) if op in QDQ_OPS else None
                if reason is None:
                    self.low[node] = plan
                else:
                    self.fp32[node] = reason

    def _plan(self, node: ir.Node) -> Plan | str:
        """The low-type slots of an allowlisted node from its schema, or why there are none."""
        types = slot_types(node, self.opset)
        schema = schema_of(node.op_type, self.opset)
        if types is None or schema is None:
            return f"{node.op_type} has no schema at opset {self.opset}"
        in_types, out_types = types
        float_params = {t for v, t in [*zip(node.inputs, in_types), *zip(node.outputs, out_types)]
                        if t and dtype_of_type_str(t) is None and self.is_float(v)}
        restrict = CONVERTED_PARAMS.get(node.op_type)
        params = {p for p in float_params if allows(node.op_type, self.opset, p, self.format.type_str)
                  and (restrict is None or p in restrict)}
        if not params:
            what = f"{node.op_type}-{schema.since_version}"
            if node.op_type in QDQ_OPS:
                return f"{what} takes float32 scales only (low-precision Q/DQ needs opset >= 19)"
            return f"{what} accepts no {self.format.name} for its float tensors"
        return Plan(frozenset(i for i, t in enumerate(in_types) if t in params),
                    frozenset(i for i, t in enumerate(out_types) if t in params))

    def _scale_problem(self, node: ir.Node, plan: Plan) -> str | None:
        """Why a Q/DQ's scale cannot take the low type (not constant, zero, subnormal, too large)."""
        if 1 not in plan.inputs or len(node.inputs) < 2 or node.inputs[1] is None:
            return None
        tensor = constant_of(node.inputs[1])
        if tensor is None:
            return f"{node.op_type} scale {node.inputs[1].name!r} is not a constant"
        scale = np.abs(tensor.numpy().astype(np.float64))
        fmt = self.format
        if not np.all(np.isfinite(scale)) or np.any(scale == 0):
            return f"{node.op_type} scale {node.inputs[1].name!r} has a zero or non-finite element"
        if scale.min() < fmt.min_normal:  # subnormal: fine only if held exactly (chosen so by the quantizer)
            exact = tensor.numpy().astype(fmt.numpy).astype(np.float64) == tensor.numpy().astype(np.float64)
            if not np.all(exact[np.abs(tensor.numpy()) < fmt.min_normal]):
                return (f"{node.op_type} scale min {scale.min():.3g} < {fmt.name} min normal {fmt.min_normal:.3g} "
                        "and not held exactly: a subnormal scale loses bits for every element")
        if scale.max() > fmt.max:
            return f"{node.op_type} scale max {scale.max():.3g} > {fmt.name} max {fmt.max:.6g}"
        return None

    # -- measurement and constants -----------------------------------------------------------------

    def _measured(self, node: ir.Node) -> str | None:
        limit = self.options.activation_limit
        if not self.options.absmax or limit == float("inf"):
            return None
        for value in (*node.inputs, *node.outputs):
            if self.is_float(value) and value.name in self.options.absmax:
                measured = float(self.options.absmax[value.name])
                if measured > limit:
                    return (f"measured max |{value.name}| = {measured:.3g} > {self.format.max:g} / headroom "
                            f"{self.options.headroom:g} = {limit:.4g}")
        return None

    def _constant_problem(self, node: ir.Node) -> str | None:
        for i in sorted(self.low[node].inputs):
            value = node.inputs[i]
            if value is not None and self.is_float(value):
                if value not in self._constant_checks:
                    self._constant_checks[value] = self._check_constant(value)
                if self._constant_checks[value] is not None:
                    return self._constant_checks[value]
        return None

    def _check_constant(self, value: ir.Value) -> str | None:
        tensor = constant_of(value)
        if tensor is None:
            return None
        array = tensor.numpy()
        finite = np.isfinite(array)
        fmt = self.format
        kept = array[finite] if not finite.all() else array
        if kept.size == 0:
            return None
        biggest = float(np.max(np.abs(kept)))
        if biggest > fmt.max:
            return f"constant {value.name!r} max |x| = {biggest:.4g} > {fmt.name} max {fmt.max:.6g}"
        error = rel_l2(kept, kept.astype(fmt.numpy))
        bound = CONSTANT_REL_L2 * fmt.unit_roundoff
        drop_resident(tensor)
        if error > bound:
            return (f"constant {value.name!r} loses {error:.3g} relative L2 in {fmt.name} "
                    f"(> {CONSTANT_REL_L2:g}u = {bound:.3g}: underflow)")
        return None

    # -- neighbourhoods ----------------------------------------------------------------------------

    def _qdq_neighbours(self) -> None:
        """A Cast between a Q/DQ and its compute op splits TensorRT's fusion: FP32 DQ -> FP32 consumers,
        FP32 Q -> FP32 producer of its input (one level)."""
        for node, _ in list(self.fp32.items()):
            if node.op_type == "DequantizeLinear" and is_default_domain(node):
                for user, index in node.outputs[0].uses():
                    if user in self.low and index in self.low[user].inputs:
                        self._keep(user, f"reads FP32 DequantizeLinear {self.label[node]!r}: a Cast between DQ "
                                         "and compute splits the Q/DQ fusion")
            elif node.op_type == "QuantizeLinear" and is_default_domain(node) and node.inputs[0] is not None:
                producer = node.inputs[0].producer()
                if producer in self.low and node.inputs[0].index() in self.low[producer].outputs:
                    self._keep(producer, f"feeds FP32 QuantizeLinear {self.label[node]!r}: a Cast between compute "
                                         "and Q splits the Q/DQ fusion")

    def stores_low(self, value: ir.Value) -> bool:
        """Whether ``value`` (a main-graph node output) will be stored in the low type."""
        producer = value.producer()
        if producer is None or producer.graph is not self.graph:
            return False
        if producer in self.flex_low:
            return True
        plan = self.low.get(producer)
        return plan is not None and value.index() in plan.outputs

    def reads_low(self, node: ir.Node, index: int) -> bool | None:
        """True: the slot reads the low type; False: FLOAT; None: either (Shape, Size, Cast)."""
        if node.graph is not self.graph:
            return False
        plan = self.low.get(node)
        if plan is not None:
            return index in plan.inputs
        if node in self.fp32 or not is_default_domain(node):
            return False
        if node.op_type in SHAPE_ONLY_OPS or node.op_type == "Cast":
            types = slot_types(node, self.opset)
            param = types[0][index] if types else None
            return None if param and allows(node.op_type, self.opset, param, self.format.type_str) else False
        return False

    def _islands(self) -> None:
        cheap = [n for n in self.low if n.op_type not in HEAVY_OPS]
        for component in _components(cheap, self._cheap_neighbours):
            sides = set()
            for node in component:
                sides.update(self._boundary(node, component))
            if "fp32" in sides and "low" not in sides:
                for node in component:
                    self._keep(node, "cheap op whose neighbours are all FP32: low precision would add Casts "
                                     "and save nothing")

    def _cheap_neighbours(self, node: ir.Node) -> Iterator[ir.Node]:
        plan = self.low[node]
        for i in plan.inputs:
            producer = node.inputs[i].producer() if node.inputs[i] is not None else None
            if producer is not None and producer in self.low and producer.op_type not in HEAVY_OPS \
                    and node.inputs[i].index() in self.low[producer].outputs:
                yield producer
        for j in plan.outputs:
            for user, index in node.outputs[j].uses():
                if user in self.low and user.op_type not in HEAVY_OPS and index in self.low[user].inputs:
                    yield user

    def _boundary(self, node: ir.Node, component: set[ir.Node]) -> Iterator[str]:
        """'low' / 'fp32' for each neighbour of ``node`` outside its component that has a precision."""
        plan = self.low[node]
        for i in plan.inputs:
            value = node.inputs[i]
            if value is None or self.is_constant(value):
                continue
            producer = value.producer()
            if producer is None or producer in component or producer in self.flex:
                continue
            yield "low" if producer in self.low and value.index() in self.low[producer].outputs else "fp32"
        for j in plan.outputs:
            for user, index in node.outputs[j].uses():
                if user in component:
                    continue
                reads = self.reads_low(user, index)
                if reads is not None and user not in self.flex:
                    yield "low" if reads else "fp32"

    def _flex(self) -> None:
        for node in self.graph:
            if node not in self.flex:
                continue
            value = node.outputs[0]
            uses = value.uses()
            if (uses and not value.is_graph_output() and all(self.reads_low(u, i) for u, i in uses)
                    and self._flex_allowed(node)):
                self.flex_low.add(node)
            elif node.op_type != "Constant" or not any(self.reads_low(u, i) for u, i in uses):
                self.fp32[node] = "its FLOAT value is read by FP32 consumers or is a graph output"

    def _flex_allowed(self, node: ir.Node) -> bool:
        fmt = self.format
        if node.op_type == "Cast":
            return allows("Cast", self.opset, "T2", fmt.type_str)
        if node.op_type == "ConstantOfShape":
            attr = node.attributes.get("value")
            fill = float(attr.value.numpy().ravel()[0]) if attr is not None else 0.0
            return allows("ConstantOfShape", self.opset, "T2", fmt.type_str) and abs(fill) <= fmt.max
        return True  # Constant: its consumers' constant checks already apply


def _components(nodes: Iterable[ir.Node], neighbours) -> Iterator[set[ir.Node]]:
    """Connected components of ``nodes`` under ``neighbours`` (which yields only members)."""
    seen: set[ir.Node] = set()
    for start in nodes:
        if start in seen:
            continue
        component, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node in component:
                continue
            component.add(node)
            stack.extend(n for n in neighbours(node) if n not in component)
        seen |= component
        yield component


# ---------------------------------------------------------------------------------------------------
# Rewriting


class Names:
    """Fresh value and node names, unique across a model's graphs."""

    def __init__(self, model: ir.Model) -> None:
        self.used: set[str] = set()
        for graph in model.graphs():
            self.used.update(v.name for v in (*graph.inputs, *graph.initializers.values()) if v.name)
            for node in graph:
                self.used.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self.used.add(node.name)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def set_dtype(value: ir.Value, dtype: ir.DataType) -> None:
    """Give ``value`` a tensor type of ``dtype`` (a fresh TensorType: type objects may be shared)."""
    value.type = ir.TensorType(dtype)


def make_cast(value: ir.Value, dtype: ir.DataType, names: Names, suffix: str) -> ir.Node:
    """``Cast(value, to=dtype)``, its output typed and shaped, named after ``value``."""
    base = value.name or "value"
    node = ir.node("Cast", [value], attributes={"to": int(dtype)}, name=names.fresh(f"{base}_cast_{suffix}"))
    out = node.outputs[0]
    out.name = names.fresh(f"{base}_{suffix}")
    set_dtype(out, dtype)
    out.shape = value.shape.copy() if value.shape is not None else None
    return node


class _Rewriter:
    """Applies :class:`_Decisions`: constants, retyped values, Casts at precision crossings."""

    def __init__(self, model: ir.Model, decisions: _Decisions) -> None:
        self.model = model
        self.graph = model.graph
        self.d = decisions
        self.format = decisions.format
        self.names = Names(model)
        self.modified = False

    def rewrite(self) -> bool:
        crossing = [v for v in self.graph.inputs if self.d.is_float(v)]
        crossing += [v for node in self.graph for v in node.outputs if self.d.is_float(v)]
        self._constants()
        self._retype()
        for value in crossing:
            self._cross(value)
        return self.modified

    # constants

    def _low_uses(self, value: ir.Value) -> tuple[list[tuple[ir.Node, int]], bool]:
        """(uses that read the low type, whether anything reads it as FLOAT)."""
        low, other = [], value.is_graph_output()
        for user, index in value.uses():
            if self.d.reads_low(user, index):
                low.append((user, index))
            else:
                other = True
        return low, other

    def _constants(self) -> None:
        for value in list(self.graph.initializers.values()):
            if self.d.is_float(value) and not value.is_graph_input():
                self._convert_constant(value, in_place=True)
        for node in list(self.graph):
            if node.op_type == "Constant" and node in self.d.flex and node not in self.d.flex_low:
                self._convert_constant(node.outputs[0], in_place=False)

    def _convert_constant(self, value: ir.Value, in_place: bool) -> None:
        low_uses, other = self._low_uses(value)
        if not low_uses:
            return
        tensor = constant_of(value)
        if tensor is None:
            return
        array = tensor.numpy().astype(self.format.numpy)
        drop_resident(tensor)
        self.modified = True
        if in_place and not other:
            value.const_value = ir.Tensor(array, name=value.name)
            set_dtype(value, self.format.dtype)
            return
        copy = add_initializer(self.graph, self.names.fresh(f"{value.name}_{self.format.name}"), array)
        for user, index in low_uses:
            user.replace_input_with(index, copy)

    # retyping

    def _retype(self) -> None:
        for node, plan in self.d.low.items():
            for j in plan.outputs:
                set_dtype(node.outputs[j], self.format.dtype)
            if node.op_type == "DequantizeLinear" and node.attributes.get_int("output_dtype", 0):
                node.attributes["output_dtype"] = ir.AttrInt64("output_dtype", int(self.format.dtype))
            self.modified = True
        for node in self.d.flex_low:
            self._retype_flex(node)
            set_dtype(node.outputs[0], self.format.dtype)
            self.modified = True

    def _retype_flex(self, node: ir.Node) -> None:
        """Cast(to=FLOAT) -> Cast(to=low); Constant / ConstantOfShape: their value attribute retyped."""
        if node.op_type == "Cast":
            node.attributes["to"] = ir.AttrInt64("to", int(self.format.dtype))
            return
        if node.op_type == "Constant":
            array = ir.convenience.get_const_tensor(node.outputs[0]).numpy()
            for name in list(node.attributes):
                node.attributes.pop(name)  # value, or value_float(s): one attribute
        else:
            attr = node.attributes.get("value")
            array = attr.value.numpy() if attr is not None else np.zeros(1, dtype=np.float32)
        tensor = ir.Tensor(array.astype(self.format.numpy))
        node.attributes["value"] = ir.AttrTensor("value", tensor)
        node.outputs[0].const_value = tensor if node.op_type == "Constant" else None

    # casts

    def _cross(self, value: ir.Value) -> None:
        """One Cast for the consumers of ``value`` that read the other precision (graph outputs too)."""
        stored_low = value.producer() is not None and self.d.stores_low(value)
        uses = value.uses()
        if stored_low:
            wrong = [(u, i) for u, i in uses if self.d.reads_low(u, i) is False]
            outputs = [k for k, out in enumerate(self.graph.outputs) if out is value]
            if not wrong and not outputs:
                return
            cast = make_cast(value, ir.DataType.FLOAT, self.names, "fp32")
            self.graph.insert_after(value.producer(), cast)
            result = cast.outputs[0]
            if outputs:
                original = value.name
                value.name = self.names.fresh(f"{original}_{self.format.name}")
                result.name = original
                for k in outputs:
                    self.graph.outputs[k] = result
        else:
            wrong = [(u, i) for u, i in uses if self.d.reads_low(u, i)]
            if not wrong:
                return
            cast = make_cast(value, self.format.dtype, self.names, self.format.name)
            producer = value.producer()
            if producer is not None:
                self.graph.insert_after(producer, cast)
            else:
                self.graph.insert_before(next(iter(self.graph)), cast)
            result = cast.outputs[0]
        for user, index in wrong:
            user.replace_input_with(index, result)
        self.modified = True


def remove_redundant_casts(model: ir.Model) -> bool:
    """Remove, in every graph, Casts to the type their input already has and exact round trips
    ``Cast(Cast(x: L, to=FLOAT), to=L)`` (L float16 or bfloat16; the FLOAT value read by nothing else)."""
    dtypes = infer_dtypes(model)
    removed = False
    for graph in model.graphs():
        for node in list(graph):
            if node.op_type != "Cast" or not is_default_domain(node) or node.graph is not graph:
                continue
            x, y = node.inputs[0], node.outputs[0]
            to = ir.DataType(node.attributes.get_int("to", 0))
            if x is None or y.is_graph_output():
                continue
            if dtypes.get(x) == to:
                y.replace_all_uses_with(x)
                graph.remove(node, safe=True)
                removed = True
                continue
            inner = x.producer()
            if (to in LOW_DTYPES and inner is not None and inner.graph is graph and inner.op_type == "Cast"
                    and is_default_domain(inner) and dtypes.get(x) == ir.DataType.FLOAT
                    and inner.inputs[0] is not None and dtypes.get(inner.inputs[0]) == to
                    and len(x.uses()) == 1 and not x.is_graph_output()):
                y.replace_all_uses_with(inner.inputs[0])
                graph.remove([node, inner], safe=True)
                removed = True
    return removed


def mixed_precision(dtype: LowDType = "float16", **options) -> MixedPrecisionPass:
    """A fresh :class:`MixedPrecisionPass` (``options``: keep_fp32, absmax, headroom)."""
    return MixedPrecisionPass(dtype, **options)


__all__ = ["DEFAULT_HEADROOM", "MixedPrecisionPass", "infer_dtypes", "mixed_precision", "remove_redundant_casts"]
