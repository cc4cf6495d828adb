"""The optimize pipeline: load -> (opset conversion) -> passes under the PassManager -> model."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import onnx_ir as ir

from qcompile import modelio
from qcompile.errors import UnknownNameError
from qcompile.passes import DEFAULT_PIPELINE, FINAL_PASSES, PASSES, make_pass
from qcompile.passmanager import PassManager, PassManagerResult, PassStats, VerifyOptions


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
) -> PassManagerResult:
    """Optimize a model (in place when given an ir.Model) and return it with per-pass stats.

    ``passes`` None runs the default pipeline to a fixed point (at most ``steps`` sweeps), then
    the final clean-up passes; a list of names runs exactly those passes, sweep by sweep.
    """
    model = _as_model(model_or_path)
    pass_list = resolve_passes(passes)
    final = resolve_passes(FINAL_PASSES) if passes is None else []
    if target_opset is not None:
        modelio.convert_opset(model, target_opset)
    manager = PassManager(
        pass_list, verify=verify, verify_options=verify_options, steps=steps, finalize=final, on_pass=on_pass
    )
    return manager(model)


def optimize(
    model_or_path: ir.Model | str | os.PathLike,
    passes: Sequence[str] | None = None,
    verify: bool = False,
    **kwargs,
) -> ir.Model:
    """Optimize a model with the named passes (default: the FP32 pipeline) and return it.

    ``verify=True`` checks every pass numerically against the input on ONNX Runtime CPU and raises
    :class:`~qcompile.errors.VerificationError` naming the pass that changed the outputs.
    """
    return optimize_with_stats(model_or_path, passes, verify=verify, **kwargs).model
