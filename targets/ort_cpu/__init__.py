"""ONNX Runtime CPU: QDQ that ORT fuses into integer kernels, MatMulNBits, contrib fusions.

What runs in INT8 is measured on the running CPU by the kernel probe (kernel_probe.py): op classes
slower in INT8 than FP32 stay float, and weights are stored uint8 (zero point 128) where the CPU's
u8 x s8 kernels saturate (x86 without VNNI). Activations u8 asymmetric; weights per channel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from qcompile.passes import DEFAULT_PIPELINE
from qcompile.passes.quant.annotate import QuantPolicy, policy_for
from qcompile.targets import Target, probe_dir

ANNOTATORS = ("linear", "conv", "conv-output", "passthrough", "concat")


def policy(*, keep_float: Iterable[str] | None = None, weight_dtype: str | None = None, per_channel: bool = True,
           cache_dir: Path | None = None, precision: str = "int8") -> tuple[QuantPolicy, dict]:
    """The ORT CPU policy on this machine; ``keep_float`` and ``weight_dtype`` default to what the
    kernel probe measures here (cached per CPU signature under ``cache_dir``)."""
    from qcompile.targets.ort_cpu.kernel_probe import policy_weight_dtype, probe, slower_classes

    ratios: dict = {}
    if keep_float is None:
        ratios = probe(cache_dir=probe_dir(cache_dir))
        keep_float = slower_classes(ratios)
    if weight_dtype is None:
        weight_dtype = policy_weight_dtype(cache_dir=probe_dir(cache_dir))
    return policy_for("ort-cpu", ANNOTATORS, per_channel=per_channel, keep_float=frozenset(keep_float),
                      weight_dtype=weight_dtype), ratios


def fastest_accuracy_level(bits: int, block_size: int, cache_dir: Path | None = None) -> int:
    """MatMulNBits' accuracy level that decodes faster on this CPU (measured once, cached)."""
    from qcompile.targets.ort_cpu import kernel_probe

    return kernel_probe.fastest_accuracy_level(bits, block_size, probe_dir(cache_dir))


TARGET = Target(
    name="ort-cpu",
    description="ONNX Runtime CPU (the embedded default)",
    runtime="ort-cpu",
    passes=DEFAULT_PIPELINE,
    annotators=ANNOTATORS,
    formats=frozenset({"qdq", "matmulnbits", "blocked-dq"}),
    policy=policy,
)
