"""SmoothQuant: FP32 equivalence on transformer-like blocks with planted outlier channels, and lower
INT8 error there; both the folded (LayerNorm producer) and inserted-Mul (residual branch) forms."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from conftest import floats, model_from_text, op_types, run_ort
from qcompile.calibration import IterableReader
from qcompile.passes.quant.smooth_fold import find_groups
from qcompile.quant.algorithms.smoothquant import smoothing_scales
from qcompile.smoothing import smooth
from qcompile.static_int8 import quantize_static as quantize

K, N = 16, 12


def block(residual: bool) -> ir.Model:
    """LayerNorm -> Q, K, V projections (sharing X), optionally a residual Add of X as well."""
    rng = np.random.default_rng(0)
    gamma = np.ones(K)
    gamma[[3, 11]] = 40.0  # planted outlier channels in the activation
    w = [floats(rng.standard_normal(K * N) * 0.2) for _ in range(3)]
    extra = ("r = Add(x, ln)\n  out = Concat <axis = -1> (q, k, v, r)" if residual
             else "out = Concat <axis = -1> (q, k, v)")
    width = 3 * N + (K if residual else 0)
    return model_from_text(f"""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[1, 8, {K}] x) => (float[1, 8, {width}] out)
      <float[{K}] gamma = {{{floats(gamma)}}}, float[{K}] beta = {{{floats(rng.standard_normal(K) * 0.1)}}},
       float[{K}, {N}] wq = {{{w[0]}}}, float[{K}, {N}] wk = {{{w[1]}}}, float[{K}, {N}] wv = {{{w[2]}}}> {{
      ln = LayerNormalization <axis = -1> (x, gamma, beta)
      q = MatMul(ln, wq)
      k = MatMul(ln, wk)
      v = MatMul(ln, wv)
      {extra}
    }}""")


def feeds(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 8, K)).astype(np.float32)} for _ in range(n)]


def clone(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


@pytest.mark.parametrize("residual", [False, True])
def test_smoothing_is_fp32_equivalent(residual):
    model = block(residual)
    reference = clone(model)
    groups = find_groups(model)
    ln_group = next(g for g in groups if g.activation == "ln")
    assert len(ln_group.consumers) == 3 and ln_group.fold is (not residual)
    result = smooth(model, feeds(8), alpha=0.5)  # verify=True: the pass manager checks equivalence
    assert result.groups >= 1
    assert ("Mul" in op_types(result.model)) is residual  # folded into LayerNorm, or a Mul on the branch
    for feed in feeds(3):
        np.testing.assert_allclose(run_ort(result.model, feed)[0], run_ort(reference, feed)[0], rtol=1e-4, atol=1e-4)


def test_scales_move_outliers_into_weights():
    model = block(False)
    smooth(model, feeds(8), alpha=0.5)
    gamma = model.graph.initializers["gamma"].const_value.numpy()
    assert gamma[3] < 10 and gamma[11] < 10  # the outlier channels were divided down


def test_smoothquant_lowers_int8_error_on_outlier_channels():
    data = feeds(16)

    def int8_error(smoothquant):
        model = block(False)
        reference = clone(model)
        result = quantize(model, IterableReader(data), method="minmax", keep_float=(), optimize=False,
                          min_sqnr_db=None, smoothquant=smoothquant)
        errs = []
        for feed in data[:4]:
            ref, got = run_ort(reference, feed)[0], run_ort(result.model, feed)[0]
            errs.append(np.linalg.norm(ref - got) / np.linalg.norm(ref))
        return float(np.mean(errs))

    plain, smoothed = int8_error(None), int8_error(0.5)
    assert smoothed < 0.5 * plain


def test_smoothing_scales_formula():
    s = smoothing_scales(np.array([4.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0]), alpha=0.5)
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0])  # sqrt(a / w); an all-zero channel keeps s = 1
