"""Kernel-level INT8 vs FP32 on ONNX Runtime CPU: which ops and shapes INT8 wins on this machine.

    python tools/bench_kernels.py [--runs 200]

Each case is a one-op model, FP32 against its static QDQ form (u8 activations, s8 per-channel
weights), with the output left float (ORT can only fuse DQ -> MatMul into MatMulIntegerToFloat;
a Conv then runs in float on dequantized data) and with Q/DQ on the output too (ORT fuses
DQ -> op -> Q into QLinearConv / QLinearMatMul). Timed interleaved. `qcompile.targets.ort_cpu.kernel_probe` runs the
same measurement (one shape per class) to decide what the `ort-cpu` policy keeps float.
Both weight storages are timed: s8, and u8 with zero point 128 (the same codes), which the policy
uses where the u8 x s8 kernels saturate (measured here too, as the relative error of a MatMul with
extreme codes against exact integer arithmetic). Last, weight-only `MatMulNBits` for one decode
token at accuracy levels 0 (float compute) and 4 (int8 activations), the measurement behind the
weight-only recipes' default level.
"""

from __future__ import annotations

import argparse

from qcompile.runtimes import OrtRuntime
from qcompile.targets.ort_cpu.kernel_probe import (
    NBITS_K,
    NBITS_N,
    PROBE_CASES,
    KernelCase,
    _saturation_case,
    cpu_signature,
    probe_nbits,
    time_case,
)

EXTRA = (
    KernelCase("MatMul M=1 384x1536", "MatMul", "MatMul", (1, 384), (384, 1536), {}, False),
    KernelCase("MatMul M=16 384x1536", "MatMul", "MatMul", (16, 384), (384, 1536), {}, False),
    KernelCase("MatMul M=1024 384x384", "MatMul", "MatMul", (1024, 384), (384, 384), {}, False),
    KernelCase("Conv 3x3 256->256 14x14", "Conv", "Conv", (1, 256, 14, 14), (256, 256, 3, 3),
               {"pads": [1, 1, 1, 1]}, True),
    KernelCase("Conv 7x7/2 3->64 224x224", "Conv", "Conv", (1, 3, 224, 224), (64, 3, 7, 7),
               {"pads": [3, 3, 3, 3], "strides": [2, 2]}, True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(cpu_signature())
    for dtype in ("int8", "uint8"):
        model, feed, exact = _saturation_case(dtype)
        runtime = OrtRuntime()
        runtime.load(model)
        y = next(iter(runtime.run(feed).values()))
        print(f"u8 activations x {dtype} weights, extreme codes: "
              f"max relative error {abs(y - exact).max() / abs(exact).max():.2e}")
    print("\n| case | class | FP32 median ms | s8 weights, float output | s8, QDQ output | u8 weights, float output "
          "| u8, QDQ output |\n|---|---|---|---|---|---|---|")
    variants = {"fp32": (False, None), "float_out": (True, False), "qdq_out": (True, True)}
    for case in (*PROBE_CASES, *EXTRA):
        s8 = time_case(case, args.runs, variants, weight_dtype="int8")
        u8 = time_case(case, args.runs, variants, weight_dtype="uint8")
        cells = [f"{t['fp32'] / t[k]:.2f}×" for t in (s8, u8) for k in ("float_out", "qdq_out")]
        print(f"| {case.label} | {case.op_class} | {s8['fp32']:.3f} | " + " | ".join(cells) + " |", flush=True)

    print(f"\n| MatMulNBits, M=1, {NBITS_K}x{NBITS_N} | level 0 median ms | level 4 median ms | level 4 speed-up |"
          "\n|---|---|---|---|")
    for bits in (4, 8):
        for block in (32, 128):
            t = probe_nbits(bits, block, runs=args.runs)  # not cached: measured now
            print(f"| {bits} bits, block {block} | {t['0']:.3f} | {t['4']:.3f} | {t['0'] / t['4']:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
