"""ONNX's own operator suite through qcompile: every runnable node case optimized, verified, re-run.

    python tools/node_suite.py [--only PATTERN] [--suites node,...] [--json FILE] [--no-quantize] [--jobs N]
                               [--threads N]

The cases are the ones shipped in the onnx wheel (``onnx.backend.test.case.node.collect_testcases``),
each a model with its own input data; ``--suites`` adds the wheel's model folders
(``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple}``: PyTorch's exporter of its
day, whole small modules, each with its input and output protobufs).

A case is *runnable* when ONNX Runtime CPU loads the original and runs it on the case's inputs;
the others are counted as "not runnable" and go no further. Each runnable case then goes through
``qcompile.optimize_with_stats(verify=True)`` with the case's inputs as the verification feeds, and
the optimized model is run again in a fresh ORT session and compared with the original's ORT
outputs, independently of qcompile's own verification:

    ok        optimize succeeded and every output matches (structure exactly; floats to
              |a - b| <= ATOL + RTOL |a|, NaN where NaN; everything else bit for bit)
    changed   optimize succeeded but an output differs (a pass changed the model's meaning)
    crashed   optimize raised something that is not a QCompileError, or a pass raised (the pass
              manager reports that as PassFailedError, exit 3): a qcompile bug either way
    refused   optimize raised another QCompileError (exit 2 or 3): the reason is listed

Passes run with ``strict=True`` where the pipeline has it, so a pass that fails its check is
reported here rather than rolled back.

Quantize part: every runnable case with a Conv / ConvTranspose / MatMul / Gemm whose inputs are
float32 also goes through ``qcompile.static_int8.quantize_static`` (target ort-cpu, the case's inputs as calibration,
every planned node kept INT8: no op class kept float, no SQNR fallback; the weight storage the
kernel probe measures for this CPU). It runs twice: as given (weights
are graph inputs there, so qcompile keeps those nodes float) and with the compute ops' weight and
bias inputs frozen into initializers from the case's data (what a deployed model looks like, so the
INT8 path is exercised). The quantized model must run in ORT (all graph optimizations on, as it is
deployed: QDQ fused into integer kernels) and every float output must stay
within ``QUANT_MARGIN`` times the error INT8 rounding predicts for the case's own data (see
``QUANT_MARGIN``)."""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import inspect
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import qcompile
from qcompile.calibration import IterableReader
from qcompile.errors import PassFailedError
from qcompile.static_int8 import quantize_static as quantize_model

#: Independent comparison of optimized vs original (same runtime, same inputs): the FP32 passes
#: only reorder float arithmetic (folded BatchNorm, fused LayerNorm/GELU), far below this.
RTOL = 1e-4
ATOL = 1e-5
#: Quantized vs float. INT8 rounding is modelled as additive uniform noise: a quantizer of step s
#: adds noise of variance s^2 / 12 to every element (s = (hi - lo) / 255 for u8 activations with
#: lo <= 0 <= hi, s = max|w_c| / 127 per output channel for int8 weights: quant/qparams.py).
#: The float model is run with that noise added to its inputs and weights (QUANT_DRAWS draws); the
#: RMS output deviation, plus the rounding of the output itself (Conv outputs are quantized too), is
#: the error INT8 arithmetic predicts for *this* case's data. A fixed relative bound cannot do that:
#: a 4-term dot product with cancellation (test_matmul_1d_3d, 2 outputs) has a 3.9 % relative error
#: in exact INT8 arithmetic (numpy's fake quantization of the same tensors gives 3.94 % too), a
#: 1000-element Conv 0.2 %. The bound: error norm <= QUANT_MARGIN x the prediction. The error of n
#: independent roundings is ~ sigma * chi_n, so P(> 3x) is 0.3 % for one output element, 1e-4 for
#: two, nil beyond; MSE-chosen ranges clip a little but lower the total error. Measured over the
#: suite: median 0.55x, max 1.2x. A lowering bug is far off: a weight scale 2 % wrong already gives
#: 3.3-8.5x (test_matmul_2d, test_conv_with_strides_padding, test_gemm_*), a wrong axis or zero
#: point 10-1000x.
QUANT_MARGIN = 3.0
QUANT_DRAWS = 4
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: A pass that fails its check raises instead of being rolled back, so the suite sees every one.
STRICT = {"strict": True} if "strict" in inspect.signature(qcompile.optimize_with_stats).parameters else {}


@dataclass
class CaseResult:
    name: str
    status: str  # ok | changed | crashed | refused | not-runnable
    detail: str = ""
    seconds: float = 0.0


@dataclass
class QuantResult:
    name: str
    variant: str  # as-given | frozen-weights
    status: str  # ok | failed (does not run, or beyond the bound) | crashed | refused | error (the suite's own)
    rel_l2: float | None = None  # worst output's ||q - f|| / ||f||
    ratio: float | None = None  # worst output's ||q - f|| / predicted INT8 error
    quantized_nodes: int = 0
    detail: str = ""


@dataclass
class SuiteResult:
    cases: list[CaseResult] = field(default_factory=list)
    quant: list[QuantResult] = field(default_factory=list)
    seconds: float = 0.0

    def by_status(self, status: str) -> list[CaseResult]:
        return [c for c in self.cases if c.status == status]

    def totals(self) -> dict[str, int]:
        counts = {s: len(self.by_status(s)) for s in ("ok", "changed", "crashed", "refused", "not-runnable")}
        counts["runnable"] = len(self.cases) - counts["not-runnable"]
        return counts

    def quant_totals(self) -> dict[str, int]:
        counts: dict[str, int] = {"cases": len({q.name for q in self.quant})}
        for q in self.quant:
            counts[f"{q.variant} {q.status}"] = counts.get(f"{q.variant} {q.status}", 0) + 1
        return counts

    def to_json(self) -> dict:
        listed = {s: [asdict(c) for c in self.by_status(s)] for s in ("changed", "crashed", "refused", "not-runnable")}
        return {
            "totals": self.totals(),
            "quantize_totals": self.quant_totals(),
            "quantize_bound": f"error norm <= {QUANT_MARGIN:g} x the INT8 rounding-noise prediction",
            "seconds": round(self.seconds, 1),
            **listed,
            "ok": [c.name for c in self.by_status("ok")],
            "quantize": [asdict(q) for q in self.quant],
        }


# --- cases and ORT ---------------------------------------------------------------------------------


#: The wheel's model folders --suites can add to the node cases.
MODEL_SUITES = ("pytorch-converted", "pytorch-operator", "simple")
SUITES = ("node", *MODEL_SUITES)


@dataclass
class FolderCase:
    """A model folder of the wheel's test data: model.onnx and test_data_set_*/{input,output}_*.pb."""

    name: str
    model: onnx.ModelProto
    data_sets: list


def _read_pbs(folder: Path, prefix: str) -> list:
    out = []
    for path in sorted(folder.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.rsplit("_", 1)[1])):
        tensor = onnx.TensorProto()
        tensor.ParseFromString(path.read_bytes())
        out.append(onnx.numpy_helper.to_array(tensor))
    return out


def folder_cases(suite: str) -> list[FolderCase]:
    root = Path(onnx.__file__).parent / "backend" / "test" / "data" / suite
    cases = []
    for folder in sorted(p for p in root.iterdir() if (p / "model.onnx").is_file()):
        sets = [(_read_pbs(d, "input"), _read_pbs(d, "output")) for d in sorted(folder.glob("test_data_set_*"))]
        cases.append(FolderCase(f"{suite}/{folder.name}", onnx.load(str(folder / "model.onnx")), sets))
    return cases


def load_cases(only: str | None = None, suites: Sequence[str] = ("node",)) -> list:
    """The cases of the installed onnx wheel's ``suites``, sorted by name; ``only`` is a shell pattern."""
    from onnx.backend.test.case import node as node_cases

    cases = []
    if "node" in suites:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the case generators overflow casts on purpose
            with np.errstate(all="ignore"):
                cases = list(node_cases.collect_testcases())
    for suite in suites:
        if suite != "node":
            cases += folder_cases(suite)
    cases = sorted(cases, key=lambda c: c.name)
    if only:
        cases = [c for c in cases if fnmatch.fnmatchcase(c.name, only) or only in c.name]
    return cases


def case_feeds(case) -> list[dict[str, Any]]:
    """One feed per data set: the case's inputs named after the graph's (non-initializer) inputs."""
    initializers = {t.name for t in case.model.graph.initializer}
    names = [i.name for i in case.model.graph.input if i.name not in initializers]
    return [{name: as_feed(value) for name, value in zip(names, inputs)} for inputs, _ in case.data_sets]


def as_feed(value: Any) -> Any:
    """A case's input as ORT takes it: numpy scalars as 0-d arrays, TensorProtos (the cases' float8,
    int4, bfloat16 data) as arrays, sequences element by element, None (an empty optional) as is."""
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        return np.asarray(value)
    if isinstance(value, (list, tuple)):
        return [as_feed(v) for v in value]
    return value


def session(model: bytes, threads: int = 1, optimize: bool = False) -> ort.InferenceSession:
    """A CPU session: ORT's graph optimizations off (the reference), or all on (``optimize``: how a
    QDQ model is deployed, its DQ -> op -> Q fused into integer kernels)."""
    so = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run_ort(model: bytes, feeds: Sequence[dict[str, Any]], threads: int = 1, optimize: bool = False) -> list[list[Any]]:
    sess = session(model, threads, optimize)
    return [sess.run(None, feed) for feed in feeds]


def serialize(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


# --- comparison ------------------------------------------------------------------------------------


def difference(ref: Any, cand: Any, where: str = "output", rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """Why ``cand`` differs from ``ref`` (None when they match): tensors, sequences, optionals, maps."""
    if ref is None or cand is None:
        return None if ref is None and cand is None else f"{where}: {type(ref).__name__} vs {type(cand).__name__}"
    if isinstance(ref, (list, tuple)) or isinstance(cand, (list, tuple)):
        if not isinstance(ref, (list, tuple)) or not isinstance(cand, (list, tuple)):
            return f"{where}: {type(ref).__name__} vs {type(cand).__name__}"
        if len(ref) != len(cand):
            return f"{where}: sequence of {len(ref)} vs {len(cand)}"
        for i, (a, b) in enumerate(zip(ref, cand)):
            if (why := difference(a, b, f"{where}[{i}]", rtol, atol)) is not None:
                return why
        return None
    if isinstance(ref, dict) or isinstance(cand, dict):
        if not isinstance(ref, dict) or not isinstance(cand, dict) or set(ref) != set(cand):
            return f"{where}: map keys differ"
        for key in ref:
            if (why := difference(ref[key], cand[key], f"{where}[{key!r}]", rtol, atol)) is not None:
                return why
        return None
    a, b = np.asarray(ref), np.asarray(cand)
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating):
        if a.dtype == np.float16:  # two units of fp16 rounding (u = 2^-11): the type's own resolution
            rtol, atol = max(rtol, 1e-3), max(atol, 1e-3)
        if np.allclose(b, a, rtol=rtol, atol=atol, equal_nan=True):
            return None
        with np.errstate(all="ignore"):
            err = np.abs(a.astype(np.float64) - b.astype(np.float64))
        return f"{where}: max |diff| {np.nanmax(np.where(np.isfinite(err), err, np.inf)):.3g}"
    if a.dtype.kind == "V":  # float8 / int4 ... as raw bytes
        a, b = a.view(np.uint8), b.view(np.uint8)
    return None if np.array_equal(a, b) else f"{where}: values differ"


def outputs_difference(refs: list[list[Any]], cands: list[list[Any]], names: list[str]) -> str | None:
    for i, (ref, cand) in enumerate(zip(refs, cands)):
        if len(ref) != len(cand):
            return f"data set {i}: {len(ref)} outputs vs {len(cand)}"
        for name, a, b in zip(names, ref, cand):
            if (why := difference(a, b, f"data set {i} {name!r}")) is not None:
                return why
    return None


def error_norm(ref: np.ndarray, cand: np.ndarray) -> float:
    """||ref - cand||; non-finite values must match exactly (NaN where NaN, same inf), else inf."""
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(cand, dtype=np.float64).ravel()
    if a.shape != b.shape:
        return math.inf
    finite = np.isfinite(a) & np.isfinite(b)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if not np.all(finite | same):
        return math.inf
    return float(np.linalg.norm(a[finite] - b[finite]))


def rel_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    err = error_norm(ref, cand)
    a = np.asarray(ref, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(a[np.isfinite(a)]))
    return 0.0 if err == 0.0 else (err / norm if norm else math.inf)


# --- the optimize part -----------------------------------------------------------------------------


def runnable_reference(case, threads: int = 1) -> tuple[bytes, list[dict], list[list[Any]]] | str:
    """The original's bytes, feeds and ORT outputs, or why ORT refuses it."""
    model = case.model.SerializeToString()
    feeds = case_feeds(case)
    try:
        return model, feeds, run_ort(model, feeds, threads)
    except Exception as exc:  # ORT raises its own Fail/NotImplemented/InvalidGraph/... types
        return f"{type(exc).__name__}: {first_line(exc)}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_case(case, threads: int = 1) -> tuple[CaseResult, tuple | None]:
    """Optimize one case with verification on its own inputs and compare independently."""
    start = time.perf_counter()
    reference = runnable_reference(case, threads)
    if isinstance(reference, str):
        return CaseResult(case.name, "not-runnable", reference, time.perf_counter() - start), None
    model_bytes, feeds, expected = reference
    names = [o.name for o in case.model.graph.output]
    try:
        model = ir.from_proto(onnx.load_from_string(model_bytes))
        result = qcompile.optimize_with_stats(model, verify=True, verify_options=qcompile.VerifyOptions(feeds=feeds),
                                              **STRICT)
        optimized = serialize(result.model)
    except PassFailedError as exc:  # a pass raised: the pass manager names it, but it is a crash
        return CaseResult(case.name, "crashed", exc.line(), time.perf_counter() - start), reference
    except qcompile.QCompileError as exc:
        return CaseResult(case.name, "refused", exc.line(), time.perf_counter() - start), reference
    except Exception as exc:
        why = f"{type(exc).__name__}: {first_line(exc)}"
        return CaseResult(case.name, "crashed", why, time.perf_counter() - start), reference
    try:
        got = run_ort(optimized, feeds, threads)
    except Exception as exc:
        why = f"optimized model does not run: {first_line(exc)}"
        return CaseResult(case.name, "changed", why, time.perf_counter() - start), reference
    why = outputs_difference(expected, got, names)
    status = "ok" if why is None else "changed"
    return CaseResult(case.name, status, why or "", time.perf_counter() - start), reference


# --- the quantize part -----------------------------------------------------------------------------


def quantizable(case) -> bool:
    """A Conv/ConvTranspose/MatMul/Gemm in the main graph whose data inputs are all float32."""
    try:
        inferred = onnx.shape_inference.infer_shapes(case.model)
    except Exception:
        inferred = case.model
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    float32 = onnx.TensorProto.FLOAT
    for node in graph.node:
        if node.op_type in COMPUTE_OPS and node.domain in ("", "ai.onnx"):
            data = [name for name in node.input if name]
            if data and all(types.get(name) == float32 for name in data):
                return True
    return False


def freeze_weights(proto: onnx.ModelProto, feed: dict[str, Any]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The compute ops' weight/bias graph inputs (index >= 1) turned into initializers from ``feed``."""
    frozen = onnx.ModelProto()
    frozen.CopyFrom(proto)
    frozen.ir_version = max(frozen.ir_version, 4)  # below 4, an initializer must also be an input
    graph = frozen.graph
    inputs = {i.name for i in graph.input}
    names = {
        name
        for node in graph.node
        if node.op_type in COMPUTE_OPS
        for name in list(node.input)[1:]
        if name in inputs and name in feed
    }
    kept = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(kept)
    for name in sorted(names):
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(feed[name]), name))
    return frozen, {k: v for k, v in feed.items() if k not in names}


@functools.cache
def weight_dtype() -> str:
    """INT8 weight storage as qcompile's kernel probe measures it for this CPU (uint8 with zero point
    128 where ORT's u8 x s8 kernels saturate, as on AVX2 without VNNI; int8 elsewhere)."""
    from qcompile.models.base import cache_root
    from qcompile.targets.ort_cpu.kernel_probe import policy_weight_dtype

    return policy_weight_dtype(cache_dir=cache_root() / "probe")


def check_quantize(case, variant: str, threads: int = 1) -> QuantResult:
    """Quantize ``case`` (``variant``: as-given or frozen-weights) and compare with its float outputs."""
    proto, feeds = case.model, case_feeds(case)
    if variant == "frozen-weights":
        frozen = [freeze_weights(proto, f) for f in feeds[:1]]
        proto, feeds = frozen[0][0], [frozen[0][1]]
    names = [o.name for o in proto.graph.output]
    try:
        expected = run_ort(proto.SerializeToString(), feeds, threads)
    except Exception as exc:
        return QuantResult(case.name, variant, "refused", detail=f"float model does not run: {first_line(exc)}")
    try:
        result = quantize_model(
            ir.from_proto(proto), IterableReader(feeds), keep_float=(), weight_dtype=weight_dtype(), min_sqnr_db=None,
            verify_options=qcompile.VerifyOptions(feeds=feeds, each_pass=False),
        )
        quantized = serialize(result.model)
    except qcompile.QCompileError as exc:
        return QuantResult(case.name, variant, "refused", detail=exc.line())
    except Exception as exc:
        return QuantResult(case.name, variant, "crashed", detail=f"{type(exc).__name__}: {first_line(exc)}")
    count = len(result.plan.quantized_nodes)
    try:
        got = run_ort(quantized, feeds, threads, optimize=True)
    except Exception as exc:
        return QuantResult(case.name, variant, "failed", None, count,
                           f"quantized model does not run: {first_line(exc)}")
    try:
        predicted = predicted_errors(case, feeds, variant == "frozen-weights", expected, threads)
    except Exception as exc:  # the suite's own noise model, not qcompile: listed apart
        return QuantResult(case.name, variant, "error", None, None, count, f"noise model failed: {first_line(exc)}")
    worst, worst_rel, where = 0.0, 0.0, ""
    for i, (ref, cand, pred) in enumerate(zip(expected, got, predicted)):
        for name, a, b, p in zip(names, ref, cand, pred):
            if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating):
                if not isinstance(b, np.ndarray) or a.shape != b.shape:
                    ratio, rel = math.inf, math.inf
                else:
                    err = error_norm(a, b)
                    floor = max(p, 1e-6 * math.sqrt(a.size))  # float noise where nothing is predicted
                    ratio = 0.0 if err == 0.0 else (err / floor if floor > 0 else math.inf)
                    rel = rel_l2(a, b)
            else:
                ratio = rel = 0.0 if difference(a, b, name, 0.0, 0.0) is None else math.inf
            if ratio > worst or (ratio == worst and rel > worst_rel):
                worst, worst_rel, where = ratio, rel, f"data set {i} {name!r}"
    status = "ok" if worst <= QUANT_MARGIN else "failed"
    detail = f"{worst:.2g}x the predicted INT8 error (rel L2 {worst_rel:.3g}) on {where}" if where else ""
    return QuantResult(case.name, variant, status, worst_rel, worst, count, detail)


def weight_axes(model: onnx.ModelProto) -> dict[str, int]:
    """Weight inputs of the compute ops and the axis of their output channels (qcompile's choice)."""
    inputs = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input}
    axes = {}
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS and len(node.input) > 1 and node.input[1] in inputs:
            rank = inputs[node.input[1]]
            transposed = any(a.name == "transB" and a.i for a in node.attribute)
            axes[node.input[1]] = {"Conv": 0, "ConvTranspose": 1,
                                   "Gemm": 0 if transposed else 1}.get(node.op_type, rank - 1)
    return axes


def predicted_errors(case, feeds: list[dict], per_channel: bool, expected: list[list],
                     threads: int) -> list[list[float]]:
    """For each data set and output: the error norm INT8 rounding noise predicts (see QUANT_MARGIN)."""
    axes = weight_axes(case.model) if per_channel else {}
    sess = session(case.model.SerializeToString(), threads)
    full_feeds = case_feeds(case)
    rng = np.random.default_rng(0)
    predicted = []
    for feed, ref in zip(full_feeds[: len(feeds)], expected):
        energy = [0.0] * len(ref)
        for _ in range(QUANT_DRAWS):
            noisy = {name: _with_rounding_noise(value, axes.get(name), rng) for name, value in feed.items()}
            for j, (a, b) in enumerate(zip(ref, sess.run(None, noisy))):
                if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating) and a.shape == np.shape(b):
                    energy[j] += error_norm(a, b) ** 2 / QUANT_DRAWS
        outputs = []
        for j, a in enumerate(ref):
            if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating) and a.size:
                with np.errstate(all="ignore"):
                    step = (max(float(np.nanmax(a)), 0.0) - min(float(np.nanmin(a)), 0.0)) / 255
                energy[j] += a.size * step * step / 12 if math.isfinite(step) else 0.0
            outputs.append(math.sqrt(energy[j]) if math.isfinite(energy[j]) else math.inf)
        predicted.append(outputs)
    return predicted


def _with_rounding_noise(value: Any, axis: int | None, rng: np.random.Generator) -> Any:
    """``value`` plus uniform noise of one INT8 step: per channel along ``axis`` (int8 weights) or per
    tensor (u8 activations, or ``axis`` None); non-float32 inputs unchanged."""
    if not isinstance(value, np.ndarray) or value.dtype != np.float32 or not value.size:
        return value
    if axis is not None and value.ndim >= 2:
        others = tuple(i for i in range(value.ndim) if i != axis % value.ndim)
        step = np.max(np.abs(value), axis=others, keepdims=True) / 127
    else:
        step = np.asarray((max(float(value.max()), 0.0) - min(float(value.min()), 0.0)) / 255)
    return np.asarray(value + rng.uniform(-0.5, 0.5, value.shape) * step, dtype=np.float32)  # 0-d stays an array


# --- the suite -------------------------------------------------------------------------------------


def check_one(case, quantize: bool = True, threads: int = 1) -> tuple[CaseResult, list[QuantResult]]:
    """The optimize check of one case and, where it applies, its quantize checks."""
    with quiet():
        result, reference = check_case(case, threads)
        quant = []
        if quantize and reference is not None and quantizable(case):
            quant = [check_quantize(case, variant, threads) for variant in ("as-given", "frozen-weights")]
    return result, quant


_FORKED_CASES: list = []  # the cases, inherited by forked workers (ModelProtos are not re-pickled)


def _check_forked(job: tuple[int, bool, int]) -> tuple[CaseResult, list[QuantResult]]:
    index, quantize, threads = job
    return check_one(_FORKED_CASES[index], quantize, threads)


def run_suite(cases: Iterable, *, quantize: bool = True, threads: int = 1, jobs: int = 1,
              progress: bool = False) -> SuiteResult:
    """Check every case; ``jobs`` > 1 forks that many workers (each with ``threads`` ORT threads)."""
    global _FORKED_CASES
    start = time.perf_counter()
    suite = SuiteResult()
    ort.set_default_logger_severity(4)  # ORT logs every refused model at ERROR level on stderr
    cases = list(cases)
    if quantize:
        weight_dtype()  # measured (or read from its cache) once, before the workers fork
    if jobs > 1 and len(cases) > 1:
        _FORKED_CASES = cases
        try:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                jobs_list = [(i, quantize, threads) for i in range(len(cases))]
                results = list(pool.imap(_check_forked, jobs_list, chunksize=8))
        finally:
            _FORKED_CASES = []
    else:
        results = (check_one(case, quantize, threads) for case in cases)
    for result, quant in results:
        suite.cases.append(result)
        suite.quant.extend(quant)
        if progress and result.status not in ("ok", "not-runnable"):
            print(f"{result.status:8} {result.name}: {result.detail}", file=sys.stderr, flush=True)
        for q in quant:
            if progress and q.status != "ok":
                print(f"quantize {q.status:8} {q.name} ({q.variant}): {q.detail}", file=sys.stderr, flush=True)
    suite.seconds = time.perf_counter() - start
    return suite


@contextlib.contextmanager
def quiet():
    """Silence numpy warnings and qcompile's logging for one case."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def report(suite: SuiteResult) -> str:
    totals = suite.totals()
    lines = [
        f"node suite: {totals['runnable']} runnable: {totals['ok']} ok, {totals['changed']} changed, "
        f"{totals['crashed']} crashed, {totals['refused']} refused; {totals['not-runnable']} not runnable in ORT "
        f"({suite.seconds:.0f} s)"
    ]
    for status in ("changed", "crashed", "refused"):
        for c in suite.by_status(status):
            lines.append(f"  {status:8} {c.name}: {c.detail}")
    if suite.quant:
        q = suite.quant_totals()
        lines.append(f"quantize: {q.pop('cases')} cases with float Conv/ConvTranspose/MatMul/Gemm, bound: error "
                     f"<= {QUANT_MARGIN:g}x the INT8 rounding-noise prediction: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(q.items())))
        for variant in ("as-given", "frozen-weights"):
            int8 = [r for r in suite.quant if r.variant == variant and r.quantized_nodes and r.rel_l2 is not None]
            if int8:
                rels, ratios = [r.rel_l2 for r in int8], [r.ratio for r in int8]
                lines.append(f"  {variant}: {len(int8)} with INT8 nodes; rel L2 median {np.median(rels):.2g}, max "
                             f"{max(rels):.2g}; error / prediction median {np.median(ratios):.2g}, "
                             f"max {max(ratios):.2g}")
        for r in suite.quant:
            if r.status != "ok":
                lines.append(f"  quantize {r.status:8} {r.name} ({r.variant}): {r.detail}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only cases whose name contains this, or matches this shell pattern")
    parser.add_argument("--suites", default="node", help=f"comma-separated: {', '.join(SUITES)} (default: node)")
    parser.add_argument("--json", metavar="FILE", help="write the totals and the lists as JSON ('-' for stdout)")
    parser.add_argument("--no-quantize", action="store_true", help="skip the quantize part")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the suite's own sessions")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default: 2)")
    parser.add_argument("--progress", action="store_true", help="print each failure as it happens")
    parser.add_argument("--not-runnable", action="store_true",
                        help="also list the cases ORT refuses, with ORT's reason")
    args = parser.parse_args(argv)
    suites = [x for x in args.suites.split(",") if x]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    suite = run_suite(load_cases(args.only, suites), quantize=not args.no_quantize, threads=args.threads,
                      jobs=args.jobs, progress=args.progress)
    print(report(suite))
    if args.not_runnable:
        for c in suite.by_status("not-runnable"):
            print(f"  not-runnable {c.name}: {c.detail}")
    if args.json:
        text = json.dumps(suite.to_json(), indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    totals = suite.totals()
    failed_quant = sum(1 for q in suite.quant if q.status in ("failed", "crashed"))
    return 1 if totals["changed"] or totals["crashed"] or failed_quant else 0


if __name__ == "__main__":
    sys.exit(main())
