"""AWQ (Lin et al., 2024) for block-wise weight-only quantization: activation-aware channel scaling.

For each group of MatMuls sharing an input X whose producer can absorb a per-channel scale (a
LayerNormalization, or a Mul by a constant vector such as a decomposed RMSNorm: the foldable groups
of passes/smoothquant.py):

    s_j = mean|X_j|^alpha, normalised so that sqrt(max s * min s) = 1
    Y_i = X W_i = (X diag(1/s)) (diag(s) W_i)     1/s folded into the producer, s into each W_i

Input channels that carry large activations get their weight rows scaled up before rounding, so
their effective quantization step shrinks where the output is most sensitive. alpha in
{0, 1/8, ..., 1} minimises the group's output error with block-quantized weights,

    sum_i || X W_i - (X / s) Q(diag(s) W_i) ||^2

on the first calibration feeds; alpha 0 is plain RTN, so the search never does worse there. The
scaled FP32 model is verified equivalent by the pass manager. Then every weight-only candidate
(scaled or not) is quantized with its block ranges searched against the error weighted by its
input's second moment E[x_k^2] (AWQ's clipping step). Groups whose producer cannot absorb 1/s
(attention outputs, SiLU(gate) * up) are left unscaled rather than paying an extra Mul per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx_ir as ir

from qcompile.calibrate import tapped
from qcompile.passes.irutil import weight_kn
from qcompile.passes.quant.smooth_fold import SmoothQuantPass, find_groups
from qcompile.passes.quant.nbits import BlockQuant, WeightOnlyConfig, candidates, rtn
from qcompile.passmanager import PassManager, VerifyOptions
from qcompile.progress import bar
from qcompile.quant.observers import finite_rows

ALPHA_GRID = tuple(float(a) for a in np.linspace(0.0, 1.0, 9))
SEARCH_FEEDS = 4
#: Token rows (evenly spaced over the search feeds) on which each alpha is scored.
SEARCH_ROWS = 512
_MIN_SCALE, _MAX_SCALE = 1e-4, 1e4


@dataclass
class AwqResult:
    model: ir.Model
    alphas: dict[str, float] = field(default_factory=dict)
    groups: int = 0
    codes: dict[str, BlockQuant] = field(default_factory=dict)  # per weight name, for the lowering

    def to_json(self) -> dict:
        return {"groups": self.groups, "alphas": {k: round(v, 3) for k, v in self.alphas.items()}}


def awq_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|X|^alpha, normalised to a geometric mid-range of 1, clipped to a safe range."""
    s = np.power(np.maximum(np.asarray(mean_abs, dtype=np.float64), 1e-8), alpha)
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, _MIN_SCALE, _MAX_SCALE).astype(np.float32)


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, config: WeightOnlyConfig) -> float:
    """sum_i || x W_i - (x / s) Q(diag(s) W_i) ||^2 with Q the config's RTN block quantization."""
    xs = x / s
    err = 0.0
    for w in weights:
        deq = rtn(w * s[:, None], config.bits, config.block_size, config.symmetric).dequantize()
        err += float(np.sum(np.square(x @ w - xs @ deq, dtype=np.float64)))
    return err


def awq(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], config: WeightOnlyConfig) -> AwqResult:
    """Scale ``model``'s weight-only candidates AWQ-style (in place; FP32-equivalent, verified) and
    quantize them with searched block ranges; the codes come back per weight name."""
    groups = find_groups(model)  # names the nodes first
    nodes_to_quantize = candidates(model, config)
    eligible = {n.name for n in nodes_to_quantize}
    groups = [g for g in groups if g.fold and g.consumers and all(c in eligible for c in g.consumers)]
    if not nodes_to_quantize:
        return AwqResult(model)
    searched = {g.activation for g in groups}
    names = sorted({n.inputs[0].name for n in nodes_to_quantize})
    abs_sums: dict[str, np.ndarray] = {}
    square_sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in searched}
    with tapped(model, names) as runtime:
        for i, feed in enumerate(feeds):
            arrays = runtime.run(feed, outputs=names)
            for name in names:
                x = finite_rows(arrays[name]).astype(np.float64)
                abs_sums[name] = abs_sums.get(name, 0.0) + np.abs(x).sum(axis=0)
                square_sums[name] = square_sums.get(name, 0.0) + np.square(x).sum(axis=0)
                counts[name] = counts.get(name, 0) + len(x)
                if i < SEARCH_FEEDS and name in searched:
                    rows[name].append(x.astype(np.float32))
    nodes = {n.name: n for n in model.graph}
    scales, alphas = {}, {}
    with bar("AWQ scale search", total=len(groups)) as advance:
        for group in groups:
            x = np.concatenate(rows[group.activation])
            if len(x) > SEARCH_ROWS:
                x = x[np.linspace(0, len(x) - 1, SEARCH_ROWS).round().astype(np.int64)]
            mean_abs = abs_sums[group.activation] / counts[group.activation]
            weights = [weight_kn(nodes[c]).astype(np.float32) for c in group.consumers]
            errors = {a: group_error(x, weights, awq_scales(mean_abs, a), config) for a in ALPHA_GRID}
            best = min(errors, key=errors.get)
            alphas[group.activation] = best
            if best > 0:
                scales[group.activation] = awq_scales(mean_abs, best)
            advance()
    scaled = [g for g in groups if g.activation in scales]
    manager = PassManager([SmoothQuantPass(scaled, scales)], verify=True,
                          verify_options=VerifyOptions(feeds=list(feeds[:2]) or None))
    model = manager(model).model
    codes = {}
    with bar("AWQ clipping search", total=len(nodes_to_quantize)) as advance:
        for node in nodes_to_quantize:
            name = node.inputs[0].name
            s = scales.get(name)
            importance = square_sums[name] / counts[name] / (1.0 if s is None else np.square(s.astype(np.float64)))
            w = node.inputs[1].const_value.numpy()
            codes[node.inputs[1].name] = rtn(w, config.bits, config.block_size, config.symmetric, importance)
            advance()
    return AwqResult(model, alphas, len(groups), codes)


__all__ = ["ALPHA_GRID", "AwqResult", "awq", "awq_scales", "group_error"]
