"""The pipelines: optimize (load -> opset conversion -> passes under the PassManager) and
:class:`Pipeline` (a recipe for a target: optimize -> smooth -> annotate -> observe -> lower -> check)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import onnx_ir as ir

from qcompile import modelio
from qcompile.errors import UnknownNameError
from qcompile.passes import DEFAULT_PIPELINE, FINAL_PASSES, PASSES, make_pass
from qcompile.passmanager import PassManager, PassManagerResult, PassStats, VerifyOptions, reference_run

if TYPE_CHECKING:
    from qcompile.recipes import Recipe


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


# --------------------------------------------------------------------------------------------------
# The quantization pipeline: one orchestrator for every recipe and target.


@dataclass
class Result:
    """What a Pipeline run produced: the model, and every figure on the way (one type for every recipe).

    ``details`` is the recipe kind's own record (static: plan, calibration ranges, per-node SQNR;
    weight-only: quantized MatMuls, AWQ alphas); the phases, accuracy, notes and speed guard are
    common to all."""

    model: ir.Model
    recipe: "Recipe"
    target: str
    details: Any
    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_peak_rss_mb: dict[str, float] = field(default_factory=dict)
    kv_cache: Any = None  # qcompile.kv_cache.CacheChange when the cache's type was changed

    def __getattr__(self, name: str):
        """The recipe kind's own fields (``calibration``, ``sqnr_db``, ``smoothquant``, ``quantized``,
        ``awq``, ...) read through the result."""
        if name == "details":
            raise AttributeError(name)
        return getattr(self.details, name)

    @property
    def kind(self) -> str:
        return self.recipe.kind

    @property
    def statistics(self):
        """What calibration observed (static recipes: ranges and non-finite counts), else None."""
        return getattr(self.details, "calibration", None)

    @property
    def node_figures(self) -> dict[str, float]:
        """Per-node figures: the INT8 output SQNR (dB) the sensitivity guard measured (static recipes)."""
        return dict(getattr(self.details, "sqnr_db", {}) or {})

    @property
    def plan(self):
        return getattr(self.details, "plan", None)

    @property
    def accuracy(self):
        return self.details.accuracy

    @property
    def notes(self) -> list[str]:
        return self.details.notes

    @property
    def latency(self) -> dict | None:
        return self.details.latency

    @property
    def verification_feeds(self) -> list:
        return self.details.verification_feeds

    @property
    def timing_feed(self) -> dict | None:
        return self.details.timing_feed

    def to_json(self) -> dict:
        return {"kind": self.kind, "target": self.target, **self.details.to_json(),
                "kv_cache": self.kv_cache.to_json() if self.kv_cache else None,
                "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
                "phase_peak_rss_mb": {k: round(v) for k, v in self.phase_peak_rss_mb.items()}}


class Pipeline:
    """``Pipeline(recipe, target).run(model, reader) -> Result`` — the one orchestrator.

    Stages, each timed on one phase clock (``Result.phase_seconds``):

        load → reference (the original runs on the verification feeds; the speed guard times it)
        → optimize (canonicalize + the target's fusions, checked) → opset (raised where the format needs it)
        → smooth (SmoothQuant / AWQ scales folded, verified FP32-equivalent)
        → annotate (the target's annotators write specs on values) → observe (one calibration loop)
        → lower (Q/DQ, MatMulNBits, blocked DQ) → check (checker in the target's terms, run, compared)
        → speed_guard (original and result timed in turn in their check sessions)

    Static recipes (int8, fp8, w8a8-smoothquant) run the static stages of qcompile.static_int8;
    weight-only recipes those of qcompile.weight_only; the float recipe (fp16) qcompile.float_recipe's;
    all read the target from the registry. What is not quantized runs in the recipe's
    ``high_precision``, else the target's (FP16 on GPU targets: qcompile.precision).
    """

    def __init__(self, recipe: "Recipe", target: str | None = None) -> None:
        from qcompile import targets

        self.target = targets.get(target or recipe.target)
        self.recipe = dataclasses.replace(recipe, target=self.target.name).validate()  # the recipe reproduces the run

    def run(self, model: ir.Model | str | os.PathLike, reader=None, *, verify_options: VerifyOptions | None = None,
            guard_runs: int | str | None = None, keep_float=None, weight_dtype=None, statistics=None,
            budget=None) -> Result:
        """Quantize ``model`` (in place when an ir.Model) with calibration data from ``reader``.

        ``guard_runs`` (a number or "auto"): time the original and the result in turn (``latency``);
        ``keep_float`` / ``weight_dtype``: override what the target measures (static recipes);
        ``statistics``: a qcompile.calibrate.StatisticsCache shared with runs for other targets;
        ``budget``: a qcompile.budget.BudgetSpec (static recipes): what stays float is searched
        against an accuracy budget on held-out data instead of the per-node SQNR guard; without one,
        the recipe's ``accuracy_budget`` is (qcompile/budget.py: held out from calibration, not
        timed, the guard where it cannot be measured)."""
        from qcompile.errors import InputSpecError
        from qcompile.memory import PhaseClock

        recipe, target = self.recipe, self.target.name
        high_precision = recipe.high_precision or self.target.high_precision
        self.target.require_precision(recipe.precision(self.target.high_precision))
        if recipe.kind != "float":
            self.target.require_precision(high_precision)
        if budget is not None and recipe.kind != "static-int8":
            from qcompile.recipes import PRESETS

            static = ", ".join(name for name, r in PRESETS.items() if r.kind == "static-int8")
            raise InputSpecError(f"--accuracy-budget needs a static recipe (W8A8, FP8), not {recipe.name!r}",
                                 fix=f"choose {static}, or drop --accuracy-budget")
        if recipe.needs_calibration and reader is None:
            raise InputSpecError(f"recipe {recipe.name!r} needs calibration data", fix="pass --calib SPEC")
        if self.target.device != "cpu":
            guard_runs = None  # a CPU timing says nothing of a GPU target: `qcompile bench --target` on its GPU
        notes: list[str] = []
        if recipe.kind == "static-int8" and (budget is not None or recipe.accuracy_budget is not None):
            from qcompile.budget import BudgetSpec, instead, split_calibration

            budget = budget or BudgetSpec(None, recipe.accuracy_budget, timing_runs=0, required=False)
            budget, reader, note = split_calibration(budget, reader, high_precision)
            notes += [note + instead(recipe.min_sqnr_db)] if note else []
        clock = PhaseClock()
        kept: list = []
        if recipe.kv_cache != "fp32" and reader is not None:  # the cache's scales and check: calibration prompts
            from qcompile.calibration import FirstFeeds

            reader = FirstFeeds(reader, 4)
            kept = reader.kept
        if recipe.kind == "float":
            from qcompile.float_recipe import convert_float

            details = convert_float(model, high_precision, target=target, exclude=recipe.exclude,
                                    verify_options=verify_options, guard_runs=guard_runs, clock=clock)
        elif recipe.kind == "static-int8":
            from qcompile.static_int8 import quantize_static as quantize

            details = quantize(model, reader, target=target, method=recipe.method, per_channel=recipe.per_channel,
                               exclude=recipe.exclude, samples=recipe.samples, min_sqnr_db=recipe.min_sqnr_db,
                               smoothquant=recipe.smoothquant, quantize_attention=recipe.quantize_attention,
                               verify_options=verify_options, guard_runs=guard_runs, keep_float=keep_float,
                               weight_dtype=weight_dtype, clock=clock, precision=recipe.dtype,
                               high_precision=high_precision, statistics=statistics, budget=budget)
        else:
            from qcompile.passes.quant.nbits import WeightOnlyConfig
            from qcompile.weight_only import quantize_weights

            config = WeightOnlyConfig(bits=recipe.bits, block_size=recipe.block_size, symmetric=recipe.symmetric,
                                      format=recipe.format, include_lm_head=recipe.include_lm_head,
                                      include_embeddings=recipe.include_embeddings,
                                      accuracy_level=recipe.accuracy_level, lm_head_bits=recipe.lm_head_bits,
                                      lm_head_block_size=recipe.lm_head_block_size)
            details = quantize_weights(model, config, algorithm=recipe.algorithm, reader=reader,
                                       samples=recipe.samples, verify_options=verify_options, target=target,
                                       clock=clock, guard_runs=guard_runs, high_precision=high_precision,
                                       exclude=recipe.exclude)
        details.notes[:0] = notes
        if recipe.kv_cache != "fp32":
            from qcompile.kv_cache import convert_cache

            change = convert_cache(details.model, recipe.kv_cache, _prompts(kept, details), target)
            details.notes.append(change.note())
            clock.lap("kv_cache")
        else:
            change = None
        return Result(details.model, recipe, target, details, clock.seconds, clock.peak_rss_mb, change)


def _prompts(kept: list, details, count: int = 4) -> list:
    """Token sequences for the KV-cache conversion: calibration prompts, else the verification feeds'."""
    feeds = kept or list(details.verification_feeds or [])
    return [feed["input_ids"][:1] for feed in feeds if "input_ids" in feed][:count]


def quantize(model: ir.Model | str | os.PathLike, reader=None, *, recipe: "str | Recipe" = "int8",
             target: str | None = None, verify_options: VerifyOptions | None = None,
             guard_runs: int | str | None = None, statistics=None, budget=None, **changes: Any) -> Result:
    """Quantize ``model`` with a recipe (a preset name or a :class:`~qcompile.recipes.Recipe`, with
    ``changes`` applied: ``method="entropy"``, ``bits=4``, ...) for ``target``: a thin layer over
    :class:`Pipeline`. In place when given an ir.Model. ``statistics``: a
    :class:`~qcompile.calibrate.StatisticsCache` shared by runs for several targets. ``min_sqnr_db``
    and ``accuracy_budget`` choose what stays float (None: off; the guard alone turns the budget off:
    :meth:`~qcompile.recipes.Recipe.choosing_float`).

        result = qcompile.quantize("model.onnx", reader, recipe="w8a8-smoothquant", target="onnx-qdq")
        qcompile.save(result.model, "model.int8.onnx")
    """
    from qcompile.recipes import preset

    chosen = preset(recipe) if isinstance(recipe, str) else recipe
    choice = {key: changes.pop(key) for key in ("min_sqnr_db", "accuracy_budget") if key in changes}
    pipeline = Pipeline(chosen.with_(**changes).choosing_float(**choice), target)
    return pipeline.run(model, reader, verify_options=verify_options, guard_runs=guard_runs, statistics=statistics,
                        budget=budget)
