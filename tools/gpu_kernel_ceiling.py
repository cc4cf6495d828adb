"""The kernel-level ceiling of an INT8 / FP8 TensorRT engine over FP16, at a quantized model's GEMM shapes.

    python tools/gpu_kernel_ceiling.py MODEL.onnx [MODEL.onnx ...] [--tokens 128] [--runs 200] [--json-out F]

For every MatMul/Gemm whose both inputs come from a DequantizeLinear (what TensorRT runs in INT8/FP8),
the GEMM [M = tokens, K] x [K, N] is timed on the GPU with PyTorch alone (no TensorRT is needed):
FP16 ``torch.matmul`` against ``torch._int_mm`` (INT8 in, INT32 out; M > 16, K and N multiples of 8) and
``torch._scaled_mm`` (FP8 E4M3 in, row-wise float32 scales, FP16 out; K and N multiples of 16, the
second operand column-major), each with CUDA events after a warm-up, median of ``--runs``. The ratio
FP16 time / INT8 (FP8) time, summed over the model's GEMMs, is what an engine could gain from them if
nothing else cost anything: the ceiling, not an engine timing. Without a CUDA device it prints the
shapes it would time and exits 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from qcompile import modelio


def gemm_shapes(path: str | Path, tokens: int) -> list[tuple[str, int, int, int]]:
    """(node, M, K, N) of every MatMul/Gemm with both inputs dequantized and a constant weight."""
    model = modelio.load(path)
    shapes = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        producers = [v.producer() if v is not None else None for v in node.inputs[:2]]
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in producers):
            continue
        weight = producers[1].inputs[0]
        if weight.const_value is None or weight.shape is None or len(weight.shape) != 2:
            continue
        k, n = (int(d) for d in weight.shape)
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            k, n = n, k
        shapes.append((node.name, tokens, k, n))
    return shapes


def time_gemms(shapes, runs: int) -> list[dict]:
    import torch

    def median_ms(fn) -> float:
        for _ in range(10):
            fn()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    rows = []
    for name, m, k, n in shapes:
        a16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
        b16 = torch.randn(k, n, device="cuda", dtype=torch.float16)
        row = {"node": name, "m": m, "k": k, "n": n, "fp16_ms": median_ms(lambda: torch.matmul(a16, b16))}
        if m > 16 and k % 8 == 0 and n % 8 == 0:
            a8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
            b8 = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8)
            row["int8_ms"] = median_ms(lambda: torch._int_mm(a8, b8))
        if k % 16 == 0 and n % 16 == 0 and hasattr(torch, "float8_e4m3fn"):
            af = a16.to(torch.float8_e4m3fn)
            bf = b16.t().contiguous().to(torch.float8_e4m3fn).t()  # column-major second operand
            sa = torch.ones(m, 1, device="cuda", dtype=torch.float32)
            sb = torch.ones(1, n, device="cuda", dtype=torch.float32)
            try:
                row["fp8_ms"] = median_ms(lambda: torch._scaled_mm(af, bf, scale_a=sa, scale_b=sb,
                                                                   out_dtype=torch.float16))
            except RuntimeError as exc:  # a GPU without FP8 tensor cores
                row["fp8_error"] = str(exc).splitlines()[0][:120]
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    fp16 = sum(r["fp16_ms"] for r in rows)
    out = {"gemms": len(rows), "fp16_ms": fp16}
    for kind in ("int8", "fp8"):
        timed = [r for r in rows if f"{kind}_ms" in r]
        if timed:
            out[f"{kind}_ceiling"] = sum(r["fp16_ms"] for r in timed) / sum(r[f"{kind}_ms"] for r in timed)
            out[f"{kind}_gemms"] = len(timed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    shapes = {model: gemm_shapes(model, args.tokens) for model in args.models}
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        for model, found in shapes.items():
            print(f"{model}: {len(found)} quantized GEMMs, e.g. {found[:3]}")
        print("no CUDA device (torch with CUDA is needed): nothing timed", file=sys.stderr)
        sys.exit(2)
    import torch

    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": args.tokens,
              "models": {}}
    for model, found in shapes.items():
        rows = time_gemms(found, args.runs)
        report["models"][model] = {"summary": summary(rows), "gemms": rows}
        print(model, json.dumps(report["models"][model]["summary"]))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
