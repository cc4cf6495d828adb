"""Kernel-level INT8 vs FP32 on ONNX Runtime CPU: which ops and shapes INT8 wins on this machine.

    python tools/bench_kernels.py [--runs 200]

Each case is a one-op model, FP32 against its static QDQ form (u8 activations, s8 per-channel
weights), with the output left float (ORT can only fuse DQ -> MatMul into MatMulIntegerToFloat;
a Conv then runs in float on dequantized data) and with Q/DQ on the output too (ORT fuses
DQ -> op -> Q into QLinearConv / QLinearMatMul). Timed interleaved. `qcompile.kernel_probe` runs the
same measurement (one shape per class) to decide what the `ort-cpu` policy keeps float.
"""

from __future__ import annotations

import argparse

from qcompile.kernel_probe import PROBE_CASES, KernelCase, cpu_signature, time_case

EXTRA = (
    KernelCase("MatMul M=1 384x1536", "MatMul", "MatMul", (1, 384), (384, 1536), {}, False),
    KernelCase("MatMul M=16 384x1536", "MatMul", "MatMul", (16, 384), (384, 1536), {}, False),
    KernelCase("MatMul M=1024 384x384", "MatMul", "MatMul", (1024, 384), (384, 384), {}, False),
    KernelCase("Conv 3x3 256->256 14x14", "Conv", "Conv", (1, 256, 14, 14), (256, 256, 3, 3), {"pads": [1, 1, 1, 1]}, True),
    KernelCase("Conv 7x7/2 3->64 224x224", "Conv", "Conv", (1, 3, 224, 224), (64, 3, 7, 7),
               {"pads": [3, 3, 3, 3], "strides": [2, 2]}, True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(cpu_signature())
    print("| case | class | FP32 median ms | INT8, float output | INT8, QDQ output |\n|---|---|---|---|---|")
    variants = {"fp32": (False, None), "float_out": (True, False), "qdq_out": (True, True)}
    for case in (*PROBE_CASES, *EXTRA):
        t = time_case(case, args.runs, variants)
        print(f"| {case.label} | {case.op_class} | {t['fp32']:.3f} | {t['fp32'] / t['float_out']:.2f}× "
              f"| {t['fp32'] / t['qdq_out']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
