"""Hypothesis strategies for random valid ONNX graphs (tests/test_properties.py, tools/fuzz_graphs.py).

A graph grows op by op from a pool of float32 tensors whose concrete shapes the builder tracks, so
every node it writes is valid by construction; the finished model is then checked by the ONNX
checker with full (strict) shape inference, which also confirms the tracked shapes.

    families   elementwise with broadcasting (constants and tensor pairs, neutral elements that grow
               the shape), GELU (erf and tanh forms, near misses), MatMul (weights [K,M], [K],
               batched, on the left, transposed, x @ x^T) with optional bias, Gemm (transA/transB,
               alpha/beta, bias shapes) with optional BatchNormalization, Conv / ConvTranspose
               (pads, strides, dilations, groups, auto_pad, bias) with optional BatchNormalization,
               Reshape (static, -1, 0, from Shape), Flatten, (Un)Squeeze, Transpose, Concat, Split,
               Slice, Expand, Softmax, reductions (axes as attribute or input, by opset), Resize
               (scales, sizes, sizes from Shape), decomposed LayerNorm (fusable forms and near
               misses), twin nodes (CSE), Cast round trips
    constants  initializers or Constant nodes, some produced by a foldable op on another constant
    inputs     dim 0 symbolic ("N" or unnamed) or fixed; in symbolic graphs no op touches axis 0, so
               the feeds may use a different batch than the one the shapes were tracked with

Each generated tensor carries ``depth``: how many float32 roundings feed one of its elements along
the longest path (an elementwise op counts 1, a reduction of length K counts K). The equivalence
tolerance of a rewritten graph is stated in terms of it (see ``GeneratedGraph.tolerance``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

#: float32 unit roundoff: one rounding errs by at most this, relatively.
UNIT_ROUNDOFF = 2.0**-24
#: Roundoffs (u) per rounding step that two float32 evaluations of one expression may differ by:
#: each errs by <= u per step relative to the magnitudes involved (first order), so two differ by
#: <= 2u per step; a factor 2 more for the conditioning of random data (terms vs. result, e.g.
#: x - mean(x)). 4u is 2 ulps of 1.0. Measured on 2,954 rewritten outputs (400 random graphs, the
#: default pipeline and each fusion alone): at most 0.46 u per step, 4.4e-7 rel L2.
U_PER_STEP = 4.0
#: Steps counted at least: ORT's kernels (erf in Gelu, exp in Softmax, vectorised sums) differ by
#: a few ulps from the decomposed ops even on a one-step path.
MIN_STEPS = 16.0
INT64_MAX = 2**63 - 1
#: Tensors above this many elements are not grown further (keeps ORT runs in milliseconds).
MAX_NUMEL = 4096

QUANTIZABLE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


class GeneratorError(AssertionError):
    """The generator wrote an invalid model: a bug in this file, not in qcompile."""


@dataclass(frozen=True)
class T:
    """A float tensor in the pool: its name, concrete shape (batch as tracked), rounding depth."""

    name: str
    shape: tuple[int, ...]
    depth: float = 0.0

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class GeneratedGraph:
    """A checked model, feeds for it, and what is needed to judge a rewrite of it."""

    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    depth: float
    ops: Counter = field(default_factory=Counter)
    symbolic: bool = False

    @property
    def opset(self) -> int:
        return next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))

    @property
    def quantizable(self) -> bool:
        return any(self.ops[op] for op in QUANTIZABLE)

    def tolerance(self) -> float:
        """Relative L2 bound for an FP32-equivalent rewrite: U_PER_STEP * u * max(depth, MIN_STEPS).

        A rewrite (a fusion, a folded BatchNorm, a reassociated bias) changes the order or the
        number of roundings on a path; to first order the two results differ by at most a few u
        per rounding step on that path, relative to the magnitudes involved. ``depth`` counts the
        steps on the longest path (a length-K reduction is K steps), so the bound is a few ulps x
        the reduction length, summed along the graph (3.8e-6 for a graph of <= 16 steps)."""
        return U_PER_STEP * UNIT_ROUNDOFF * max(self.depth, MIN_STEPS)

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        feeds = [{k: v.shape for k, v in f.items()} for f in self.feeds]
        return f"GeneratedGraph(depth={self.depth:g}, feeds={feeds})\n" + (
            onnx.printer.to_text(self.model)
        )


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    out = []
    for x, y in zip(reversed((1,) * (len(b) - len(a)) + a), reversed((1,) * (len(a) - len(b)) + b)):
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return tuple(reversed(out))


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1 and p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


class Builder:
    """Grows one graph; every method that adds ops returns the new pool tensors (or None if the
    family does not apply to the chosen tensor)."""

    def __init__(self, draw, opset: int, symbolic: bool, rng: np.random.Generator) -> None:
        self.draw, self.opset, self.symbolic, self.rng = draw, opset, symbolic, rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[T] = []
        self.pool: list[T] = []
        self.ops: Counter = Counter()
        self.min_norm_length = 1
        self.avoid: frozenset[str] = frozenset()
        self._count = 0

    # -- plumbing ---------------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def node(self, op: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        names = [self.fresh(op.lower() + "_") for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op, inputs, names, name=self.fresh("n_" + op + "_"), domain=domain, **attrs))
        self.ops[op] += 1
        return names

    def flag(self, p: float = 0.5) -> bool:
        return self.draw(st.integers(0, 999)) < int(p * 1000)

    def choice(self, options):
        return self.draw(st.sampled_from(list(options)))

    def const(self, array, prefix: str = "c", foldable: bool = False) -> str:
        """A constant as an initializer or a Constant node (``foldable``: sometimes as the result of
        a foldable op on another constant, for constant-folding to resolve)."""
        array = np.asarray(array)
        if foldable and array.dtype == np.float32 and array.ndim >= 1 and self.flag(0.2):
            how = self.choice(["transpose", "mul", "reshape"])
            if how == "transpose" and array.ndim >= 2:
                stored = self.const(np.ascontiguousarray(array.T), prefix)
                return self.node("Transpose", [stored])[0]
            if how == "mul":
                stored = self.const((array / 2).astype(np.float32), prefix)
                return self.node("Mul", [stored, self.const(np.float32(2.0), "two")])[0]
            stored = self.const(array.reshape(-1), prefix)
            return self.node("Reshape", [stored, self.ints(array.shape)])[0]
        name = self.fresh(prefix)
        tensor = numpy_helper.from_array(array, name)
        if self.flag(0.7):
            self.initializers.append(tensor)
        else:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("n_Constant_"), value=tensor))
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), "i")

    def weight(self, shape, fan_in: int, prefix: str = "w") -> str:
        w = (self.rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(np.float32)
        return self.const(w, prefix, foldable=True)

    def values(self, shape, kind: str = "any") -> np.ndarray:
        if kind == "positive":
            return self.rng.uniform(0.5, 2.0, shape).astype(np.float32)
        if kind == "divisor":
            return (self.rng.uniform(0.5, 2.0, shape) * self.rng.choice([-1, 1], shape)).astype(np.float32)
        return self.rng.standard_normal(shape).astype(np.float32)

    def free_axes(self, t: T) -> list[int]:
        """Axes an op may touch: all, or all but the symbolic batch axis 0."""
        return list(range(1 if self.symbolic else 0, t.rank))

    def pick(self, pred=lambda t: True) -> T | None:
        """A pool tensor satisfying ``pred``, the most recent ones first (shrinks to the newest)."""
        candidates = [t for t in self.pool if pred(t)]
        if not candidates:
            return None
        return candidates[-1 - self.draw(st.integers(0, len(candidates) - 1))]

    def out(self, name: str, shape, depth: float) -> T:
        t = T(name, tuple(int(d) for d in shape), float(depth))
        self.pool.append(t)
        return t

    def broadcast_shape(self, shape: tuple[int, ...], grow: bool) -> tuple[int, ...]:
        """A constant shape that broadcasts with ``shape``: a suffix with some dims set to 1, and with
        ``grow``, dims where ``shape`` has 1 (and, without a symbolic batch, extra leading dims)."""
        rank = len(shape)
        extra = 1 if grow and not self.symbolic and rank < 4 else 0
        k = self.draw(st.integers(0, rank + extra))
        dims = []
        for i in range(rank - min(k, rank), rank):
            if self.symbolic and i == 0:
                dims.append(1)
            elif shape[i] == 1 and grow and self.flag(0.3):
                dims.append(self.draw(st.integers(2, 3)))
            else:
                dims.append(shape[i] if self.flag(0.6) else 1)
        return tuple([self.draw(st.integers(1, 2)) for _ in range(k - rank)] + dims) if k > rank else tuple(dims)

    # -- families ---------------------------------------------------------------------------------
    def unary(self, t: T):
        op = self.choice(["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Identity", "Dropout", "Cast", "CastRound",
                          "LeakyRelu", "Clip", "Softplus"])
        if op == "Cast":
            return [self.out(self.node("Cast", [t.name], to=TensorProto.FLOAT)[0], t.shape, t.depth)]
        if op == "CastRound":  # through double (exact), or half on graph inputs only (no upstream rewrite)
            wide = TensorProto.FLOAT16 if t in self.inputs and self.flag() else TensorProto.DOUBLE
            mid = self.node("Cast", [t.name], to=wide)[0]
            return [self.out(self.node("Cast", [mid], to=TensorProto.FLOAT)[0], t.shape, t.depth)]
        if op == "Clip":
            lo = self.const(np.float32(self.rng.uniform(-1.5, 0)), "lo")
            inputs = [t.name, lo] + ([self.const(np.float32(self.rng.uniform(0.1, 2)), "hi")] if self.flag() else [])
            return [self.out(self.node("Clip", inputs)[0], t.shape, t.depth)]
        if op == "LeakyRelu":
            alpha = float(self.choice([0.01, 0.1, 0.2]))
            return [self.out(self.node(op, [t.name], alpha=alpha)[0], t.shape, t.depth + 1)]
        depth = t.depth + (op in ("Sigmoid", "Tanh", "Softplus")) * 2 + 1
        return [self.out(self.node(op, [t.name])[0], t.shape, depth)]

    def binary_const(self, t: T):
        op = self.choice(["Add", "Sub", "Mul", "Div"])
        cshape = self.broadcast_shape(t.shape, grow=True)
        neutral = self.flag(0.25)
        if neutral:  # the neutral element exactly, or within a pattern matcher's tolerance of it
            near = self.choice([0.0, 0.0, 1e-12, 1e-9]) * self.choice([1, -1])
            c = np.full(cshape, near if op in ("Add", "Sub") else 1.0 + near * 1e3, np.float32)
        else:
            c = self.values(cshape, "divisor" if op == "Div" else "any")
        name = self.const(c, "k")
        inputs = [t.name, name] if op == "Div" or self.flag() else [name, t.name]
        shape = _broadcast(t.shape, cshape)
        return [self.out(self.node(op, inputs)[0], shape, t.depth + 1)]

    def binary_pair(self, t: T):
        def fits(u: T) -> bool:
            return (u.rank == t.rank or not self.symbolic) and _broadcast(t.shape, u.shape) is not None
        u = self.pick(fits) or t
        op = self.choice(["Add", "Sub", "Mul", "Max", "Min"])
        shape = _broadcast(t.shape, u.shape)
        if math.prod(shape) > MAX_NUMEL:
            return None
        return [self.out(self.node(op, [t.name, u.name])[0], shape, max(t.depth, u.depth) + 1)]

    def gelu(self, t: T):
        form = self.choice(["erf1", "erf2", "erf3", "erf_mul", "erf_near_miss", "tanh"])
        grown = []
        def scalar(v):  # mostly rank 0 as the patterns want; sometimes [1] (no fusion; grows a rank-0 x)
            if self.flag(0.85):
                return self.const(np.array(v, np.float32), "g")
            grown.append(1)
            return self.const(np.array([v], np.float32), "g")
        def mul(a, b):
            return self.node("Mul", [a, b] if self.flag() else [b, a])[0]
        def add(a, b):
            return self.node("Add", [a, b] if self.flag() else [b, a])[0]
        x = t.name
        if form == "tanh":
            cube = self.node("Pow", [x, scalar(3.0)])[0]
            inner = add(x, mul(scalar(0.044715), cube))
            th = self.node("Tanh", [mul(scalar(math.sqrt(2 / math.pi)), inner)])[0]
            y = mul(x, mul(scalar(0.5), add(th, scalar(1.0))))
        else:
            if form == "erf_mul":
                erf = self.node("Erf", [mul(x, scalar(1 / math.sqrt(2)))])[0]
            else:
                erf = self.node("Erf", [self.node("Div", [x, scalar(math.sqrt(2))])[0]])[0]
            one_plus = add(erf, scalar(1.0))
            half = 0.6 if form == "erf_near_miss" else 0.5
            if form == "erf2":
                y = mul(scalar(half), mul(x, one_plus))
            elif form == "erf3":
                y = mul(x, mul(scalar(half), one_plus))
            else:
                y = mul(mul(x, one_plus), scalar(half))
        return [self.out(y, _broadcast(t.shape, tuple(grown)), t.depth + 8)]

    def matmul(self, t: T):
        min_rank = 2 if self.symbolic else 1
        if t.rank < min_rank:
            return None
        if t.rank > 2 and self.flag(0.35):  # dense layers on [N, K]: what fuse-gemm looks for
            t = self.as_2d(t)
        K = t.shape[-1]
        M = self.draw(st.integers(1, 8))
        form = self.choice(["weight", "weight", "weight1d", "batched", "left", "self",
                            "transposed_weight", "transposed_input"])
        if form == "weight1d" and t.rank >= 2:
            y = self.node("MatMul", [t.name, self.weight((K,), K)])[0]
            return [self.out(y, t.shape[:-1], t.depth + K)]
        if form == "batched" and t.rank >= 3 and "batched_weight" not in self.avoid:
            b = 1 if (self.symbolic and t.rank == 3) or self.flag() else t.shape[-3]
            y = self.node("MatMul", [t.name, self.weight((b, K, M), K)])[0]
            out = t.shape[:-1] + (M,)
        elif form == "left" and t.rank >= (3 if self.symbolic else 2):
            Kl = t.shape[-2]
            y = self.node("MatMul", [self.weight((M, Kl), Kl), t.name])[0]
            out, K = t.shape[:-2] + (M, t.shape[-1]), Kl
        elif form == "self" and t.rank >= (3 if self.symbolic else 2):
            perm = list(range(t.rank - 2)) + [t.rank - 1, t.rank - 2]
            y = self.node("MatMul", [t.name, self.node("Transpose", [t.name], perm=perm)[0]])[0]
            out = t.shape[:-1] + (t.shape[-2],)
        elif form == "transposed_weight":
            stored = self.weight((M, K), K)
            y = self.node("MatMul", [t.name, self.node("Transpose", [stored], perm=[1, 0])[0]])[0]
            out = t.shape[:-1] + (M,)
        elif form == "transposed_input" and t.rank == 2 and not self.symbolic:
            a = self.node("Transpose", [t.name], perm=[1, 0])[0]
            K = t.shape[0]
            y = self.node("MatMul", [a, self.weight((K, M), K)])[0]
            out = (t.shape[1], M)
        else:
            y = self.node("MatMul", [t.name, self.weight((K, M), K)])[0]
            out = t.shape[:-1] + (M,)
        depth = t.depth + K
        if self.flag(0.6) and len(out) >= 1:
            bshape = self.broadcast_shape(out, grow=True)
            bias = self.const(self.values(bshape), "b")
            y = self.node("Add", [y, bias] if self.flag(0.7) else [bias, y])[0]
            out, depth = _broadcast(out, bshape), depth + 1
        return [self.out(y, out, depth)]

    def as_2d(self, t: T) -> T:
        if t.rank == 2:
            return t
        if t.rank == 0:
            return T(self.node("Reshape", [t.name, self.ints([1, 1])])[0], (1, 1), t.depth)
        if t.rank == 1:  # [N] -> [N, 1] keeps a symbolic batch first; [K] -> [1, K] otherwise
            shape = (t.shape[0], 1) if self.symbolic else (1, t.shape[0])
            return T(self.node("Unsqueeze", [t.name, self.ints([1 if self.symbolic else 0])])[0], shape, t.depth)
        if self.flag():
            return T(self.node("Flatten", [t.name], axis=1)[0], (t.shape[0], math.prod(t.shape[1:])), t.depth)
        return T(self.node("Reshape", [t.name, self.ints([0, -1])])[0], (t.shape[0], math.prod(t.shape[1:])), t.depth)

    def gemm(self, t: T):
        a = self.as_2d(t)
        trans_a = not self.symbolic and self.flag(0.3)
        M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
        N = self.draw(st.integers(1, 8))
        trans_b = self.flag()
        if not self.symbolic and self.flag(0.15):  # B from the activation itself: A A^T or A^T A
            b_name, trans_b, N = a.name, not trans_a, M
        else:
            b_name = self.weight((N, K) if trans_b else (K, N), K)
        inputs = [a.name, b_name]
        bias = self.choice(["none", "n", "1n", "scalar", "1", "m1", "mn"])
        if self.symbolic and bias in ("m1", "mn"):
            bias = "n"
        cshape = {"none": None, "n": (N,), "1n": (1, N), "scalar": (), "1": (1,), "m1": (M, 1), "mn": (M, N)}[bias]
        if cshape is not None:
            inputs.append(self.const(self.values(cshape), "c"))
        alpha = 1.0 if self.flag(0.7) else float(self.choice([0.5, 2.0, -1.0]))
        beta = 1.0 if self.flag(0.7) else float(self.choice([0.0, 0.5, 2.0]))
        y = self.node("Gemm", inputs, transA=int(trans_a) if trans_a or self.flag() else None,
                      transB=int(trans_b) if trans_b or self.flag() else None,
                      alpha=alpha if alpha != 1.0 else None, beta=beta if beta != 1.0 else None)[0]
        out = self.out(y, (M, N), a.depth + K + 2)
        if self.flag(0.3):
            return [self.batchnorm(out)[0]]
        return [out]

    def batchnorm(self, t: T):
        if t.rank < 2:
            return None
        C = t.shape[1]
        inputs = [t.name, self.const(self.values((C,)), "bn_scale"), self.const(self.values((C,)), "bn_b"),
                  self.const(self.values((C,)) * 0.3, "bn_mean"), self.const(self.values((C,), "positive"), "bn_var")]
        eps = float(self.choice([1e-5, 1e-3, 0.1]))
        y = self.node("BatchNormalization", inputs, epsilon=eps if eps != 1e-5 or self.flag() else None)[0]
        return [self.out(y, t.shape, t.depth + 4)]

    def conv(self, t: T):
        if t.rank not in (3, 4) or t.numel > MAX_NUMEL:
            return None
        C, spatial = t.shape[1], t.shape[2:]
        transpose = self.flag(0.2)
        g = self.choice([d for d in range(1, C + 1) if C % d == 0])
        C_out = g * self.draw(st.integers(1, 3))
        if C_out > 16:
            C_out = g
        k = [self.draw(st.integers(1, 3)) for _ in spatial]
        d = [self.draw(st.integers(1, 2)) if self.flag(0.3) else 1 for _ in spatial]
        s = [self.draw(st.integers(1, 2)) if self.flag(0.4) else 1 for _ in spatial]
        same = [] if any(x > 1 for x in d) else ["SAME_UPPER", "SAME_LOWER"]  # ORT: no dilation with SAME
        auto_pad = "NOTSET" if transpose or self.flag(0.75) else self.choice(same + ["VALID"])
        pads = ([self.draw(st.integers(0, max(0, (kk - 1) * dd))) for kk, dd in zip(k + k, d + d)]
                if auto_pad == "NOTSET" else None)
        out_spatial = []
        for i, size in enumerate(spatial):
            eff = d[i] * (k[i] - 1) + 1
            if transpose:
                o = s[i] * (size - 1) + eff - pads[i] - pads[i + len(spatial)]
            elif auto_pad.startswith("SAME"):
                o = -(-size // s[i])
            elif auto_pad == "VALID":
                o = (size - eff) // s[i] + 1
            else:
                o = (size + pads[i] + pads[i + len(spatial)] - eff) // s[i] + 1
            if o < 1:
                return None
            out_spatial.append(o)
        fan_in = (C // g) * math.prod(k)
        w = self.weight((C, C_out // g, *k) if transpose else (C_out, C // g, *k), fan_in)
        inputs = [t.name, w] + ([self.const(self.values((C_out,)) * 0.1, "cb")] if self.flag() else [])
        attrs = dict(
            kernel_shape=k if self.flag() else None,
            strides=s if s != [1] * len(s) or self.flag(0.2) else None,
            dilations=d if d != [1] * len(d) or self.flag(0.2) else None,
            group=g if g > 1 or self.flag(0.2) else None,
            pads=pads if pads is not None and (any(pads) or self.flag(0.2)) else None,
            auto_pad=auto_pad if auto_pad != "NOTSET" else None,
        )
        y = self.node("ConvTranspose" if transpose else "Conv", inputs, **attrs)[0]
        out = self.out(y, (t.shape[0], C_out, *out_spatial), t.depth + fan_in + 2)
        result = [out]
        if self.flag(0.5):
            result = self.batchnorm(out)
        if self.flag(0.4):
            last = result[0]
            result = [self.out(self.node("Relu", [last.name])[0], last.shape, last.depth)]
        return result

    def reshape(self, t: T):
        lead = t.shape[:1] if self.symbolic else ()
        rest = t.shape[len(lead):]
        total = math.prod(rest)
        form = self.choice(["static", "static", "from_shape", "flatten", "unsqueeze", "squeeze"])
        if form == "from_shape" and t.rank >= 1:  # Reshape(x, Concat(Shape(x)[:1], [-1]))
            if self.opset >= 15 and self.flag():
                head = self.node("Shape", [t.name], end=1)[0]
            else:
                head = self.node("Slice", [self.node("Shape", [t.name])[0], self.ints([0]), self.ints([1])])[0]
            target = self.node("Concat", [head, self.ints([-1])], axis=0)[0]
            return [self.out(self.node("Reshape", [t.name, target])[0], (t.shape[0], math.prod(t.shape[1:])), t.depth)]
        if form == "flatten":
            axis = 1 if self.symbolic else self.draw(st.integers(0, t.rank))  # N stays dim 0
            shape = (math.prod(t.shape[:axis]), math.prod(t.shape[axis:]))
            attr = axis - t.rank if 0 < axis < t.rank and self.flag(0.3) else axis
            return [self.out(self.node("Flatten", [t.name], axis=attr)[0], shape, t.depth)]
        if form == "unsqueeze" and t.rank < 5:
            pos = self.draw(st.integers(1 if self.symbolic else 0, t.rank))
            shape = t.shape[:pos] + (1,) + t.shape[pos:]
            axis = pos - len(shape) if self.flag(0.3) else pos
            return [self.out(self.node("Unsqueeze", [t.name, self.ints([axis])])[0], shape, t.depth)]
        if form == "squeeze":
            ones = [i for i in self.free_axes(t) if t.shape[i] == 1]
            if not ones:
                return None
            if not self.symbolic and self.flag(0.3):
                return [self.out(self.node("Squeeze", [t.name])[0], tuple(x for x in t.shape if x != 1), t.depth)]
            axis = self.choice(ones)
            return [self.out(self.node("Squeeze", [t.name, self.ints([axis])])[0],
                             t.shape[:axis] + t.shape[axis + 1:], t.depth)]
        rank = self.draw(st.integers(1, 4))
        dims = [1] * rank
        for p in _prime_factors(total):
            dims[self.draw(st.integers(0, rank - 1))] *= p
        code = list(dims)
        if self.flag(0.4):
            code[self.draw(st.integers(0, rank - 1))] = -1
        for i, dim in enumerate(dims):  # 0 copies the input's dim at that index
            if not self.symbolic and i < t.rank and t.shape[i] == dim and code[i] != -1 and self.flag(0.3):
                code[i] = 0
        code = [0] * len(lead) + code
        return [self.out(self.node("Reshape", [t.name, self.ints(code)])[0], tuple(lead) + tuple(dims), t.depth)]

    def transpose(self, t: T):
        if t.rank < 2:
            return None
        axes = self.free_axes(t)
        perm = list(range(t.rank))
        if not self.flag(0.2):
            shuffled = self.draw(st.permutations(axes))
            for a, b in zip(axes, shuffled):
                perm[a] = b
        if not self.symbolic and self.flag(0.15):
            return [self.out(self.node("Transpose", [t.name])[0], t.shape[::-1], t.depth)]
        return [self.out(self.node("Transpose", [t.name], perm=perm)[0], tuple(t.shape[p] for p in perm), t.depth)]

    def concat(self, t: T):
        axes = self.free_axes(t)
        if not axes:
            return None
        axis = self.choice(axes)
        def fits(u: T) -> bool:
            return u.rank == t.rank and all(a == b for i, (a, b) in enumerate(zip(u.shape, t.shape)) if i != axis)
        parts = [t]
        for _ in range(self.draw(st.integers(1, 2))):
            kind = self.choice(["pool", "self", "relu"] + ([] if self.symbolic else ["const"]))
            if kind == "pool":
                parts.append(self.pick(fits) or t)
            elif kind == "relu":
                parts.append(T(self.node("Relu", [t.name])[0], t.shape, t.depth))
            elif kind == "const":
                shape = list(t.shape)
                shape[axis] = self.draw(st.integers(1, 3))
                parts.append(T(self.const(self.values(shape), "cc"), tuple(shape), 0))
            else:
                parts.append(t)
        shape = list(t.shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        if math.prod(shape) > MAX_NUMEL:
            return None
        attr = axis - t.rank if self.flag(0.3) else axis
        return [self.out(self.node("Concat", [p.name for p in parts], axis=attr)[0], shape,
                         max(p.depth for p in parts))]

    def split(self, t: T):
        axes = [a for a in self.free_axes(t) if t.shape[a] >= 2]
        if not axes:
            return None
        axis = self.choice(axes)
        dim = t.shape[axis]
        n = self.draw(st.integers(2, min(3, dim)))
        form = self.choice(["sizes", "equal", "num_outputs"])
        if form == "equal" and dim % n == 0:
            sizes, inputs, attrs = [dim // n] * n, [t.name], {}
            if self.opset >= 18:
                attrs["num_outputs"] = n
        elif form == "num_outputs" and self.opset >= 18:
            chunk = -(-dim // n)
            sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
            if sizes[-1] <= 0:
                return None
            inputs, attrs = [t.name], {"num_outputs": n}
        else:
            cuts = sorted(self.draw(st.lists(st.integers(1, dim - 1), min_size=n - 1, max_size=n - 1, unique=True)))
            sizes = [b - a for a, b in zip([0] + cuts, cuts + [dim])]
            inputs, attrs = [t.name, self.ints(sizes)], {}
        names = self.node("Split", inputs, outputs=len(sizes), axis=axis - t.rank if self.flag(0.3) else axis, **attrs)
        outs = []
        for name, size in zip(names, sizes):
            shape = list(t.shape)
            shape[axis] = size
            outs.append(self.out(name, shape, t.depth))
        return outs

    def slice(self, t: T):
        free = self.free_axes(t)
        if not free:
            return None
        axes = sorted(self.draw(st.lists(st.sampled_from(free), min_size=1, max_size=min(2, len(free)), unique=True)))
        starts, ends, steps, shape = [], [], [], list(t.shape)
        for a in axes:
            D = t.shape[a]
            step = self.choice([1, 1, 1, 2, -1, -2])
            start = (self.choice([0, 1, -1, D - 1, -D, D + 3, -INT64_MAX]) if self.flag(0.7)
                     else self.draw(st.integers(-D, D)))
            end = (self.choice([INT64_MAX, -INT64_MAX, D, -1, 1, D + 5]) if self.flag(0.7)
                   else self.draw(st.integers(-D, D)))
            n = len(range(*slice(start, end, step).indices(D)))
            if n < 1:
                start, end, n = ((0, INT64_MAX, len(range(0, D, step))) if step > 0
                                 else (-1, -INT64_MAX, len(range(D - 1, -1, step))))
            starts.append(start), ends.append(end), steps.append(step)
            shape[a] = n
        inputs = [t.name, self.ints(starts), self.ints(ends)]
        all_leading = axes == list(range(len(axes)))
        if not (all_leading and self.flag(0.3)) or set(steps) != {1}:
            inputs.append(self.ints([a - t.rank if self.flag(0.3) else a for a in axes]))
            if set(steps) != {1} or self.flag(0.3):
                inputs.append(self.ints(steps))
        return [self.out(self.node("Slice", inputs)[0], shape, t.depth)]

    def expand(self, t: T):
        if self.flag(0.4):
            return [self.out(self.node("Expand", [t.name, self.node("Shape", [t.name])[0]])[0], t.shape, t.depth)]
        target = [self.draw(st.integers(2, 3)) if x == 1 and not (self.symbolic and i == 0) and self.flag() else 1
                  for i, x in enumerate(t.shape)]
        shape = _broadcast(t.shape, tuple(target))
        if math.prod(shape) > MAX_NUMEL:
            return None
        return [self.out(self.node("Expand", [t.name, self.ints(target)])[0], shape, t.depth)]

    def softmax(self, t: T):
        axes = self.free_axes(t)
        if not axes:
            return None
        axis = self.choice(axes)
        op = "Softmax" if self.flag(0.75) else "LogSoftmax"
        attr = axis - t.rank if self.flag(0.5) else axis
        if attr == -1 and self.flag(0.3):
            attr = None  # the default, -1 (opset 13+)
        return [self.out(self.node(op, [t.name], axis=attr)[0], t.shape, t.depth + t.shape[axis] + 4)]

    def reduce(self, t: T):
        free = self.free_axes(t)
        op = self.choice(["ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2"])
        keep = self.flag()
        everything = not self.symbolic and self.flag(0.15)
        axes = list(range(t.rank)) if everything else sorted(
            self.draw(st.lists(st.sampled_from(free), min_size=1, max_size=len(free), unique=True))) if free else None
        if axes is None:
            return None
        length = math.prod(t.shape[a] for a in axes)
        if keep:
            shape = [1 if i in axes else x for i, x in enumerate(t.shape)]
        else:
            shape = [x for i, x in enumerate(t.shape) if i not in axes]
        written = [a - t.rank if self.flag(0.3) else a for a in axes]
        as_input = op == "ReduceSum" or self.opset >= 18
        inputs = [t.name] + ([self.ints(written)] if as_input and not everything else [])
        attrs = {"keepdims": int(keep) if not keep or self.flag() else None}
        if not as_input and not everything:
            attrs["axes"] = written
        y = self.node(op, inputs, **attrs)[0]
        return [self.out(y, shape, t.depth + length + 2)]

    def resize(self, t: T):
        if t.rank != 4 or t.numel * 4 > MAX_NUMEL:
            return None
        mode = self.choice(["nearest", "nearest", "linear"])
        ctm = self.choice(["half_pixel", "asymmetric", "align_corners"]
                          + (["pytorch_half_pixel"] if mode == "linear" else []))
        H, W = t.shape[2:]
        factors = [self.choice([1, 2] + ([0.5] if x % 2 == 0 else [])) for x in (H, W)]
        shape = (t.shape[0], t.shape[1], int(H * factors[0]), int(W * factors[1]))
        form = self.choice(["scales", "sizes_from_shape"] + ([] if self.symbolic else ["sizes"]))
        if form == "sizes_from_shape" and 0.5 in factors:
            form = "scales"
        roi = "" if self.flag(0.7) else self.const(np.array([], np.float32), "roi")
        if form == "scales":
            inputs = [t.name, roi, self.const(np.array([1, 1, *factors], np.float32), "scales")]
        elif form == "sizes":
            inputs = [t.name, roi, "", self.ints(shape)]
        else:  # YOLO-style: sizes = Shape(x)[:2] ++ Shape(x)[2:] * factor
            full = self.node("Shape", [t.name])[0]
            head = self.node("Slice", [full, self.ints([0]), self.ints([2])])[0]
            spatial = self.node("Slice", [full, self.ints([2]), self.ints([4])])[0]
            tail = self.node("Mul", [spatial, self.ints([int(f) for f in factors])])[0]
            inputs = [t.name, roi, "", self.node("Concat", [head, tail], axis=0)[0]]
        nearest = self.choice(["floor", "ceil", "round_prefer_ceil"]) if mode == "nearest" and self.flag(0.3) else None
        y = self.node("Resize", inputs, mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nearest)[0]
        return [self.out(y, shape, t.depth + 4)]

    def layernorm(self, t: T):
        if t.rank < (2 if self.symbolic else 1):
            return None
        axis = -1 if self.flag(0.8) or t.rank < 2 or (self.symbolic and t.rank < 3) else -2
        D = t.shape[axis]
        if D < self.min_norm_length:
            return None
        def reduce_mean(x: str) -> str:
            if self.opset >= 18:
                return self.node("ReduceMean", [x, self.ints([axis])], keepdims=1 if self.flag(0.7) else None)[0]
            return self.node("ReduceMean", [x], axes=[axis], keepdims=1 if self.flag(0.7) else None)[0]
        def singleton(value: float, prefix: str) -> tuple[str, int]:
            rank = self.choice([0, 0, 0, 1, t.rank] + ([] if self.symbolic else [t.rank + 1]))
            return self.const(np.full((1,) * rank, value, np.float32), prefix), rank
        def small(shape_kind: str) -> tuple[int, ...]:
            if shape_kind == "d":
                return (D,) if axis == -1 else (D, 1)
            if shape_kind == "1d":
                return (1, D) if axis == -1 else (1, D, 1)
            if shape_kind == "scalar":
                return ()
            return self.broadcast_shape(t.shape, grow=False)  # any broadcastable shape, e.g. [S, D]
        mean = reduce_mean(t.name)
        dev = self.node("Sub", [t.name, mean])[0]
        pow_rank = 0
        if self.flag():
            sq = self.node("Mul", [dev, dev])[0]
        else:
            two, pow_rank = singleton(2.0, "two")
            sq = self.node("Pow", [dev, two])[0]
        var = reduce_mean(sq)
        eps_name, eps_rank = singleton(float(self.choice([1e-5, 1e-6, 1e-12])), "eps")
        std = self.node("Sqrt", [self.node("Add", [var, eps_name] if self.flag(0.8) else [eps_name, var])[0]])[0]
        if self.flag():
            normed = self.node("Div", [dev, std])[0]
        else:
            normed = self.node("Mul", [dev, self.node("Reciprocal", [std])[0]])[0]
        shape = _broadcast(t.shape, (1,) * max(eps_rank, pow_rank))
        sshape = small(self.choice(["d", "d", "1d", "scalar", "any"]))
        scale = self.const(self.values(sshape), "ln_scale")
        y = self.node("Mul", [normed, scale] if self.flag(0.7) else [scale, normed])[0]
        shape = _broadcast(shape, sshape)
        if self.flag(0.6):
            bshape = small(self.choice(["d", "d", "1d", "any"]))
            y = self.node("Add", [y, self.const(self.values(bshape), "ln_bias")])[0]
            shape = _broadcast(shape, bshape)
        return [self.out(y, shape, t.depth + 2 * D + 8)]

    def twins(self, t: T):
        op = self.choice(["Relu", "Sigmoid", "Neg", "Identity"])
        return [self.out(self.node(op, [t.name])[0], t.shape, t.depth + 1) for _ in range(2)]


#: Families to draw from; the ones with fusions or weights appear twice (drawn twice as often).
FAMILIES = ("unary", "binary_const", "binary_pair", "gelu", "gelu", "matmul", "matmul", "gemm", "gemm", "batchnorm",
            "conv", "conv", "conv", "reshape", "transpose", "concat", "split", "slice", "expand", "softmax", "reduce",
            "resize", "layernorm", "layernorm", "twins")


#: What a family's input should look like (it falls back to any tensor, then maybe to a unary op).
_WANTS = {
    "conv": lambda t: t.rank in (3, 4) and t.numel <= MAX_NUMEL,
    "resize": lambda t: t.rank == 4 and t.numel * 4 <= MAX_NUMEL,
    "matmul": lambda t: t.rank >= 2,
    "layernorm": lambda t: t.rank >= 2 and t.shape[-1] > 1,
    "softmax": lambda t: t.rank >= 2,
    "transpose": lambda t: t.rank >= 2,
    "split": lambda t: t.rank >= 2 and max(t.shape[1:]) >= 2,
    "batchnorm": lambda t: t.rank >= 2,
}


def _ir_version(opset: int) -> int:
    return {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}.get(opset, 10)


@st.composite
def graphs(draw, opsets=None, max_ops: int = 7, families=FAMILIES, require=None,
           smooth: bool = False, avoid: frozenset[str] = frozenset()) -> GeneratedGraph:
    """A random valid float32 ONNX model with feeds; ``require``: families of which one comes first.

    ``smooth``: no near-discontinuous subgraphs (a LayerNorm over 2 or 3 values is nearly a sign
    function), for properties whose bound is statistical (quantization noise). ``avoid``: constructs
    left out while a bug they trigger is open (``"constant_output"``, ``"batched_weight"``)."""
    if opsets is None:
        opsets = st.integers(13, 21)
    opset = draw(opsets)
    symbolic = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = Builder(draw, opset, symbolic, rng)
    b.min_norm_length = 4 if smooth else 1
    b.avoid = frozenset(avoid)
    batch = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["image", "image", "sequence", "matrix", "any"]))
    if kind == "image":
        shape = (batch, draw(st.integers(1, 6)), draw(st.integers(3, 9)), draw(st.integers(3, 9)))
    elif kind == "sequence":
        shape = (batch, draw(st.integers(1, 6)), draw(st.integers(2, 16)))
    elif kind == "matrix":
        shape = (batch, draw(st.integers(1, 32)))
    else:
        shape = (batch,) + tuple(draw(st.lists(st.integers(1, 5), min_size=0 if not symbolic else 1, max_size=3)))
    first = T("x", shape)
    b.inputs.append(first)
    b.pool.append(first)
    if draw(st.integers(0, 9)) < 2:  # a second input, broadcast-compatible with the first
        other = tuple(1 if b.flag(0.3) and i > 0 else d for i, d in enumerate(shape))
        second = T("x2", other)
        b.inputs.append(second)
        b.pool.append(second)
    order = list(families)
    n_ops = draw(st.integers(1, max_ops))
    if require:  # the first op: the first of the required families (in a drawn order) that applies
        for family in draw(st.permutations(list(require))):
            t = b.pick(_WANTS.get(family, lambda t: True)) or b.pick()
            if getattr(b, family)(t) is not None:
                break
    for _ in range(n_ops - bool(require)):
        family = draw(st.sampled_from(order))
        t = b.pick(_WANTS.get(family, lambda t: True)) or b.pick()
        if t.numel > MAX_NUMEL and family not in ("reduce", "slice", "split", "matmul", "gemm"):
            family = "reduce"
        result = getattr(b, family)(t)
        if result is None:
            b.unary(t)
    last = b.pool[-1]
    chosen = [last] + [t for t in b.pool[:-1] if t not in b.inputs and draw(st.integers(0, 9)) < 2][:2]
    outputs = [t for i, t in enumerate(chosen) if t.name not in {u.name for u in chosen[:i]}]
    if draw(st.integers(0, 19)) == 0:  # a graph input straight to the output
        outputs.append(b.inputs[0])
    if draw(st.integers(0, 19)) == 0 and "constant_output" not in b.avoid:  # a Constant node's value as an output
        outputs.append(T(b.const(b.values((2, 3)), "k_out"), (2, 3), 0))
    dim0 = draw(st.sampled_from(["N", None])) if symbolic else None

    def value_info(t: T, batched: bool) -> onnx.ValueInfoProto:
        dims = list(t.shape)
        if symbolic and batched:
            dims[0] = dim0
        return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, dims)
    const_names = {i.name for i in b.initializers} | {n.output[0] for n in b.nodes if n.op_type == "Constant"}
    graph = helper.make_graph(
        b.nodes, "generated", [value_info(t, True) for t in b.inputs],
        [value_info(t, t.name not in const_names) for t in outputs], b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=_ir_version(opset))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise GeneratorError(f"generated an invalid model ({exc}):\n{onnx.printer.to_text(model)}") from exc
    if draw(st.booleans()):  # intermediate shapes annotated, as exporters write them (fusions need them)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    batches = [batch, draw(st.integers(1, 3)) if symbolic else batch]
    feeds = [{t.name: rng.standard_normal((n,) + t.shape[1:]).astype(np.float32) for t in b.inputs} for n in batches]
    depth = max(t.depth for t in outputs)
    return GeneratedGraph(model, feeds, depth, b.ops, symbolic)
