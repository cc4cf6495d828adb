"""The optimize pipeline: load -> (opset conversion) -> passes under the PassManager -> model."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import onnx_ir as ir

from qcompile import modelio
from qcompile.errors import UnknownNameError
from qcompile.passes import DEFAULT_PIPELINE, FINAL_PASSES, PASSES, make_pass
from qcompile.passmanager import PassManager, PassManagerResult, PassStats, VerifyOptions, reference_run


def resolve_passes(names: Sequence[str] | None) -> list[ir.passes.PassBase]:
    """Pass objects for ``names`` (None: the default FP32 pipeline)."""
    chosen = list(DEFAULT_PIPELINE if names is None else names)
    unknown = [n for n in chosen if n not in PASSES]
    if unknown:
        raise UnknownNameError(f"unknown pass {unknown[0]!r}", fix=f"choose from: {', '.join(PASSES)}")
    return [make_pass(n) for n in chosen]


def _as_model(model_or_path: ir.Model | str | os.PathLike) -> ir.Model:
    if isinstance(model_or_path, ir.Model):
        return model_or_path
    return modelio.load(model_or_path)


def optimize_with_stats(
    model_or_path: ir.Model | str | os.PathLike,
    passes: Sequence[str] | None = None,
    *,
    verify: bool = False,
    verify_options: VerifyOptions | None = None,
    target_opset: int | None = None,
    steps: int = 3,
    on_pass: Callable[[PassStats], None] | None = None,
    strict: bool = False,
    pipeline: Sequence[str] | None = None,
) -> PassManagerResult:
    """Optimize a model (in place when given an ir.Model) and return it with per-pass stats.

    ``passes`` None runs ``pipeline`` (default: the FP32 pipeline; a target's own list of passes,
    qcompile.targets) to a fixed point (at most ``steps`` sweeps), then the final clean-up passes; a
    list of names runs exactly those passes, sweep by sweep.
    A pass that crashes or fails verification is rolled back and listed in the result
    (``result.rolled_back``); ``strict`` raises :class:`~qcompile.errors.InternalError` instead.
    """
    model = _as_model(model_or_path)
    pass_list = resolve_passes(passes if passes is not None else pipeline)
    final = resolve_passes(FINAL_PASSES) if passes is None else []
    if target_opset is not None:
        modelio.convert_opset(model, target_opset)
    manager = PassManager(
        pass_list, verify=verify, verify_options=verify_options, steps=steps, finalize=final, on_pass=on_pass,
        rollback=not strict,
    )
    return manager(model)


def optimize(
    model_or_path: ir.Model | str | os.PathLike,
    passes: Sequence[str] | None = None,
    verify: bool = False,
    **kwargs,
) -> ir.Model:
    """Optimize a model with the named passes (default: the FP32 pipeline) and return it.

    ``verify=True`` checks every pass numerically on ONNX Runtime CPU; a pass that changes the outputs
    is rolled back (``strict=True``: raises :class:`~qcompile.errors.VerificationError` naming it).
    """
    return optimize_with_stats(model_or_path, passes, verify=verify, **kwargs).model


def prepare_float_model(model: ir.Model, optimize: bool, verify_options: VerifyOptions | None,
                        pipeline: Sequence[str] | None = None) -> tuple[ir.Model, list[dict], list[dict], list[str]]:
    """The float model to quantize (optimized and verified when ``optimize``), the verification feeds,
    the float model's outputs on them (what the quantized model is compared with), and notes."""
    verify_options = verify_options or VerifyOptions(each_pass=False)
    notes: list[str] = []
    if optimize:
        result = optimize_with_stats(model, verify=True, verify_options=verify_options, pipeline=pipeline)
        model, feeds, outputs = result.model, result.verification_feeds, result.reference_outputs
        notes += result.warnings()
        modelio.drop_resident_weights(model)
    else:
        feeds, outputs, _ = reference_run(model, verify_options)
    return model, feeds, outputs, notes
