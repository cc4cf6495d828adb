"""Measure, on the running CPU, which kernels ORT CPU runs fastest.

Static INT8: each op class is timed as a one-op model, FP32 against its static QDQ form (u8
activations, s8 per-channel weights), interleaved; the ``ort-cpu`` policy keeps float every class
whose INT8 form is not faster. Weight-only: ``MatMulNBits`` at a decode shape (one token) with
float compute (accuracy level 0) against int8 compute of the activations (level 4); the faster
level is used unless the user sets one. Saturation: whether ORT's u8 x s8 kernels saturate (x86
without VNNI sums pairs of u8*s8 products in int16): a one-MatMul QDQ model with extreme codes is
compared with exact arithmetic; where it saturates, weights are stored as u8 (zero point 128: the
same codes; ORT's u8 x u8 kernels widen to int16 before multiplying and are exact). Results are
cached per CPU (instruction-set flags, cores) and onnxruntime version under the qcompile cache, so
each measurement runs once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qcompile.quant.qparams import quantize_weight
from qcompile.runtimes import OrtRuntime, RuntimeOptions, time_side_by_side


@dataclass(frozen=True)
class KernelCase:
    label: str
    op_class: str
    op: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    attrs: dict
    quantized_output: bool  # Q/DQ on the output too (how the policy lowers this class)


#: One representative shape per class the ort-cpu policy decides on.
PROBE_CASES = (
    KernelCase("MatMul M=128 384x1536", "MatMul", "MatMul", (128, 384), (384, 1536), {}, False),
    KernelCase("Conv 3x3 64->64 28x28", "Conv", "Conv", (1, 64, 28, 28), (64, 64, 3, 3), {"pads": [1, 1, 1, 1]}, True),
    KernelCase("Conv 1x1 64->256 28x28", "Conv1x1", "Conv", (1, 64, 28, 28), (256, 64, 1, 1), {}, True),
    KernelCase("Conv depthwise 3x3 144ch 28x28", "ConvDepthwise", "Conv", (1, 144, 28, 28), (144, 1, 3, 3),
               {"pads": [1, 1, 1, 1], "group": 144}, True),
    KernelCase("ConvTranspose 3x3/2 64->64 14x14", "ConvTranspose", "ConvTranspose", (1, 64, 14, 14), (64, 64, 3, 3),
               {"strides": [2, 2], "pads": [1, 1, 1, 1]}, True),
)


def _qdq(name: str, scale: float, zero: int) -> tuple[list, list]:
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
             helper.make_tensor(f"{name}_z", TensorProto.UINT8, [], [zero])]
    nodes = [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]
    return nodes, inits


def _weight(w: np.ndarray, axis: int, dtype: str = "int8") -> tuple[list, list]:
    q, qp = quantize_weight(w, axis, dtype)
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(qp.scale, "w_s"),
             numpy_helper.from_array(qp.zero_point, "w_z")]
    return [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], axis=axis)], inits


def case_model(case: KernelCase, w: np.ndarray, quantized: bool, quantized_output: bool | None = None,
               weight_dtype: str = "int8") -> bytes:
    """The one-op model for ``case``, FP32 or QDQ."""
    out_q = case.quantized_output if quantized_output is None else quantized_output
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(case.x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if not quantized:
        nodes, inits = [helper.make_node(case.op, ["x", "w"], ["y"], **case.attrs)], [numpy_helper.from_array(w, "w")]
    else:
        n1, i1 = _qdq("x", 0.05, 128)
        n2, i2 = _weight(w, {"Conv": 0, "ConvTranspose": 1}.get(case.op, 1), weight_dtype)
        nodes, inits = n1 + n2, i1 + i2
        nodes.append(helper.make_node(case.op, ["x_dq", "w_dq"], ["yf" if out_q else "y"], **case.attrs))
        if out_q:
            n3, i3 = _qdq("yf", 0.05, 128)
            nodes += n3 + [helper.make_node("Identity", ["yf_dq"], ["y"])]
            inits += i3
    model = helper.make_model(helper.make_graph(nodes, "probe", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def time_case(case: KernelCase, runs: int = 60, variants: dict[str, tuple[bool, bool | None]] | None = None,
              weight_dtype: str = "int8") -> dict[str, float]:
    """Median ms of each variant (default: fp32 and int8 as the policy lowers it), interleaved."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(case.w_shape) * 0.05).astype(np.float32)
    feed = {"x": rng.uniform(-3, 3, case.x_shape).astype(np.float32)}
    variants = variants or {"fp32": (False, None), "int8": (True, None)}
    runtimes = {}
    for name, (quantized, out_q) in variants.items():
        runtime = OrtRuntime()
        runtime.load(case_model(case, w, quantized, out_q, weight_dtype), RuntimeOptions(spin_wait=False))
        runtimes[name] = runtime
    results = time_side_by_side({k: (lambda rt=rt: rt.run(feed)) for k, rt in runtimes.items()}, runs=runs, warmup=5)
    return {name: r.median_ms for name, r in results.items()}


#: /proc/cpuinfo fields naming the microarchitecture: x86 (vendor, family, model), then Arm's.
CORE_FIELDS = ("vendor_id", "cpu family", "model", "CPU implementer", "CPU part")
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma")


def cpu_signature(cpuinfo: str | None = None) -> str:
    """What decides INT8 speed: the core's microarchitecture, its instruction-set flags, the core
    count and the onnxruntime version. Flags alone do not: a Zen 2 and a later core under the same
    AVX2-only flags differ by 1.7x in ORT's INT8 MatMul against FP32 (docs/benchmarks.md)."""
    import onnxruntime

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    core = "-".join(fields[k] for k in CORE_FIELDS if fields.get(k)) or platform.processor() or "unknown"
    flags = ",".join(f for f in fields.get("flags", fields.get("Features", "")).split() if f in INT8_FLAGS)
    return f"{platform.machine()}|{core}|{flags}|cores={os.cpu_count()}|ort={onnxruntime.__version__}"


def _cached(kind: str, cache_dir: Path | None, refresh: bool, cases: list[str], measure) -> dict[str, float]:
    """``measure()`` once per CPU signature, cached as kind-<hash>.json under ``cache_dir``."""
    signature = cpu_signature()
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(signature.encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"{kind}-{key}.json"
        if cache_file.is_file() and not refresh:
            return json.loads(cache_file.read_text())["ratios"]
    ratios = measure()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"signature": signature, "cases": cases, "ratios": ratios}, indent=2))
        os.replace(tmp, cache_file)
    return ratios


def probe(cache_dir: Path | None = None, runs: int = 60, refresh: bool = False) -> dict[str, float]:
    """INT8-over-FP32 speed ratio per op class on this CPU (> 1: INT8 faster), with the weight
    storage the ort-cpu policy uses here (:func:`policy_weight_dtype`); cached."""

    def measure() -> dict[str, float]:
        ratios = {}
        weight_dtype = policy_weight_dtype(cache_dir)
        for case in PROBE_CASES:
            timing = time_case(case, runs, weight_dtype=weight_dtype)
            ratios[case.op_class] = timing["fp32"] / timing["int8"]
        return ratios

    return _cached("kernel-probe-v2", cache_dir, refresh, [c.label for c in PROBE_CASES], measure)


#: The decode-shaped MatMulNBits case: one token through a 1024 x 4096 weight.
NBITS_K, NBITS_N = 1024, 4096


def nbits_model(bits: int, block_size: int, accuracy_level: int, w: np.ndarray) -> bytes:
    """x [1, K] -> MatMulNBits(w, symmetric RTN) -> y, at ``accuracy_level``."""
    from qcompile.quant.algorithms.rtn import rtn
    from qcompile.quant.dtypes import pack

    bq = rtn(w, bits, block_size, symmetric=True)
    n, k_blocks, _ = bq.codes.shape
    inits = [numpy_helper.from_array(pack(bq.codes, bits), "w_q"),
             numpy_helper.from_array(bq.scales.reshape(-1), "w_s")]
    node = helper.make_node("MatMulNBits", ["x", "w_q", "w_s"], ["y"], domain="com.microsoft", K=w.shape[0], N=n,
                            bits=bits, block_size=block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def probe_nbits(bits: int, block_size: int, cache_dir: Path | None = None, runs: int = 60,
                refresh: bool = False) -> dict[str, float]:
    """Median ms of MatMulNBits at accuracy levels 0 and 4 for one decode token; cached."""

    def measure() -> dict[str, float]:
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((NBITS_K, NBITS_N)) * 0.05).astype(np.float32)
        feed = {"x": rng.standard_normal((1, NBITS_K)).astype(np.float32)}
        runtimes = {}
        for level in (0, 4):
            runtimes[str(level)] = OrtRuntime()
            runtimes[str(level)].load(nbits_model(bits, block_size, level, w), RuntimeOptions(spin_wait=False))
        results = time_side_by_side({k: (lambda rt=rt: rt.run(feed)) for k, rt in runtimes.items()},
                                    runs=runs, warmup=5)
        return {level: r.median_ms for level, r in results.items()}

    label = f"MatMulNBits bits={bits} block={block_size} M=1 {NBITS_K}x{NBITS_N}"
    return _cached(f"nbits-probe-b{bits}-k{block_size}", cache_dir, refresh, [label], measure)


def fastest_accuracy_level(bits: int, block_size: int, cache_dir: Path | None = None) -> int:
    """The MatMulNBits accuracy level (0 or 4) that decodes faster on this CPU."""
    timing = probe_nbits(bits, block_size, cache_dir)
    return int(min(timing, key=timing.get))


#: An op class stays float when its INT8 kernel is measurably slower than FP32: by more than the
#: few per cent the probe's timings vary between runs. A tie runs in INT8 — at the model level it
#: does not lose (ResNet-18's 1x1 Convs, probed at 0.98x: 1.32x FP32 with them in INT8 vs 1.26x
#: kept float, tools/bench_quant.py in docs/benchmarks.md).
SLOWER_THAN = 0.95


def slower_classes(ratios: dict[str, float], threshold: float = SLOWER_THAN) -> frozenset[str]:
    """Op classes whose INT8 kernels are measurably slower than FP32 (kept float by the policy)."""
    return frozenset(klass for klass, ratio in ratios.items() if ratio < threshold)


#: u8 activations (zero point 128) x 8-bit weights, every code extreme: |x - z| = |w - z| = 127.
SATURATION_CASE = KernelCase("MatMul 16x256x64, extreme codes", "MatMul", "MatMul", (16, 256), (256, 64), {}, False)


def _saturation_case(weight_dtype: str = "int8") -> tuple[bytes, dict, np.ndarray]:
    """:data:`SATURATION_CASE` as its QDQ model with weights stored as ``weight_dtype``, a feed,
    and the exact result of its integer arithmetic."""
    rng = np.random.default_rng(0)
    k, n = SATURATION_CASE.w_shape
    w = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32)  # per-channel scale 1/127: codes +-127
    codes = rng.choice([1, 255], size=SATURATION_CASE.x_shape)
    x = ((codes - 128) * 0.05).astype(np.float32)  # the case model's activation scale and zero point
    exact = x.astype(np.float64) @ w.astype(np.float64)
    return case_model(SATURATION_CASE, w, quantized=True, weight_dtype=weight_dtype), {"x": x}, exact


def u8s8_saturates(cache_dir: Path | None = None, refresh: bool = False) -> bool:
    """Whether ORT CPU's u8 x s8 MatMul loses precision with full-range (+-127) weights; cached."""

    def measure() -> dict[str, float]:
        model, feed, exact = _saturation_case("int8")
        runtime = OrtRuntime()
        runtime.load(model, RuntimeOptions(spin_wait=False))
        y = next(iter(runtime.run(feed).values()))
        return {"max_relative_error": float(np.abs(y - exact).max() / np.abs(exact).max())}

    result = _cached("u8s8-saturation", cache_dir, refresh, [SATURATION_CASE.label], measure)
    return result["max_relative_error"] > 1e-3


def policy_weight_dtype(cache_dir: Path | None = None) -> str:
    """INT8 weight storage for ORT CPU here: uint8 (exact) where u8 x s8 saturates, else int8."""
    return "uint8" if u8s8_saturates(cache_dir) else "int8"
