"""qcompile's pass manager: onnx-ir's own, each pass instrumented, verified and, on failure, undone.

Every pass runs wrapped in an :class:`InstrumentedPass`, and onnx-ir's ``PassManager`` runs the
wrapped passes: ``steps`` sweeps, stopping early at a fixed point; then the ``finalize`` passes once.
The wrapper records each pass's wall time, node count and initializer bytes before and after, and
whether it changed the model; optionally writes the model it produced to ``dump_dir`` (or
$QCOMPILE_DUMP_DIR; off by default); verifies it; and undoes it when that fails.

In verify mode the *original* model is run first on the verification feeds (the user's, or seeded
random feeds sized so that the original runs: qcompile/feedsearch.py); a failure there is the
input's (exit 2). Then, after every pass that changed the model, the ONNX checker runs and the
outputs are compared with those of the model before that pass:

    rel_l2(before, after) = ||y_before - y_after|| / ||y_before||  <=  the pass's bound

Each pass states the bound its numerics justify (``rel_l2_bound``; exact rewrites 1e-5, fusions that
evaluate the same function in another kernel more). Per-pass errors add up at most to the sum of
the bounds (triangle inequality); the end-to-end figure against the original is reported too.

No bound below the model's own float noise means anything: where an output misses its bound, the
model is also run with ONNX Runtime's own graph optimizations (which fold and fuse the same way),
and the output may move up to ``NOISE_FACTOR`` times what those move it,

    rel_l2 <= max(bound, NOISE_FACTOR * rel_l2(y_unoptimized, y_ort_optimized))

— a saturated sigmoid map (a detector that sees no object in random feeds) moves by 5 % under
ORT's own Conv + BatchNormalization fold, so that 5 % says nothing about a pass.

A pass that crashes or fails its check is qcompile's bug (:class:`InternalError`, exit 3). With
``rollback`` it is undone instead — the model as it was before the pass is kept, the pass is skipped
in later sweeps, and the result lists it — so one bad rewrite does not cost the user the rest.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompile import execute, modelio, specs
from qcompile.errors import (
    BackendFailedError,
    InputModelError,
    InternalError,
    PassFailedError,
    QCompileError,
    VerificationError,
)
from qcompile.feedsearch import fitting_feeds
from qcompile.metrics import Comparison, compare_outputs
from qcompile.runtimes import RuntimeOptions

log = logging.getLogger(__name__)

#: The bound of a pass that states none: an exact rewrite (same ops, same order) up to float noise.
DEFAULT_REL_L2 = 1e-5
#: Runtime options for verification runs: a few feeds, so pre-packing would only copy every weight.
VERIFY_RUNTIME = RuntimeOptions(optimization="disable", extra={"session.disable_prepacking": "1"})
#: A folder to write the model into after every pass that changes it, where ``dump_dir`` is not given.
DUMP_DIR_ENV = "QCOMPILE_DUMP_DIR"


@dataclass(frozen=True)
class VerifyOptions:
    """How the pass manager checks that passes preserve semantics.

    ``rel_l2`` None: each pass's own stated bound; a number overrides it for every pass."""

    samples: int = 2
    seed: int = 0
    dims: Mapping[str, int] = field(default_factory=dict)
    batch: int | None = None
    seq: int | None = None
    rel_l2: float | None = None
    target: str = "ort-cpu"
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None
    each_pass: bool = True  # False: one comparison at the end (cheaper on large models)

    def bound(self, p: ir.passes.PassBase) -> float:
        if self.rel_l2 is not None:
            return self.rel_l2
        return getattr(p, "rel_l2_bound", None) or DEFAULT_REL_L2


@dataclass
class PassStats:
    """What one pass did."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    initializer_bytes_before: int
    initializer_bytes_after: int
    modified: bool
    verified: bool | None = None
    rel_l2: float | None = None
    max_abs: float | None = None
    bound: float | None = None
    float_noise: float | None = None  # the model's own float noise, where the bound alone was missed
    rolled_back: bool = False
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PassManagerResult:
    model: ir.Model
    modified: bool
    stats: list[PassStats]
    feeds: str | None = None  # how the verification feeds were chosen
    end_to_end: Comparison | None = None  # final model vs the original, on the verification feeds
    verification_feeds: list[dict] = field(default_factory=list, repr=False)
    reference_outputs: list[dict] | None = field(default=None, repr=False)  # the original's, on those feeds

    @property
    def rolled_back(self) -> list[PassStats]:
        return [s for s in self.stats if s.rolled_back]

    def warnings(self) -> list[str]:
        return [f"pass {s.name!r} was rolled back (the model before it is kept): {s.error}" for s in self.rolled_back]

    def to_json(self) -> dict:
        data = {"modified": self.modified, "passes": [s.to_json() for s in self.stats],
                "rolled_back": [s.name for s in self.rolled_back], "warnings": self.warnings()}
        if self.feeds is not None:
            data["verification_feeds"] = self.feeds
        if self.end_to_end is not None:
            worst = self.end_to_end.worst()
            data["end_to_end"] = {"rel_l2": worst.rel_l2, "max_abs": worst.max_abs, "output": worst.name}
        return data


def count_nodes(model: ir.Model) -> int:
    """Nodes in the model, subgraphs included."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def pass_name(p: ir.passes.PassBase) -> str:
    return getattr(p, "name", None) or type(p).__name__


def snapshot(model: ir.Model) -> ir.Model:
    """A structural copy of ``model`` that shares its weight tensors (cheap), with qcompile's meta."""
    copy = model.clone()
    for key, value in model.meta.items():
        if key.startswith("qcompile."):
            copy.meta[key] = value
    return copy


def run_feeds(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], target: str = "ort-cpu") -> list[dict]:
    """The model's outputs on ``feeds`` (a session made for these few runs)."""
    with execute.loaded(model, target, VERIFY_RUNTIME) as runtime:
        return execute.run_all(runtime, feeds)


def choose_feeds(model: ir.Model, options: VerifyOptions, runtime) -> tuple[list[dict], str]:
    """The verification feeds — given, or sized so that the original (loaded in ``runtime``) runs —
    and how they were chosen."""
    if options.feeds is not None:
        return [dict(f) for f in options.feeds], "given data"
    return fitting_feeds(specs.input_specs(model), lambda feed: execute.run_all(runtime, [feed]),
                         samples=options.samples, seed=options.seed, dims=options.dims, batch=options.batch,
                         seq=options.seq)


def reference_run(model: ir.Model, options: VerifyOptions) -> tuple[list[dict], list[dict], str]:
    """Feeds, the original model's outputs on them, and how they were chosen.

    Everything that fails here is the input's fault: the original model is what was given."""
    try:
        with execute.loaded(model, options.target, VERIFY_RUNTIME) as runtime:
            feeds, how = choose_feeds(model, options, runtime)
            try:
                outputs = execute.run_all(runtime, feeds)
            except BackendFailedError as exc:
                raise InputModelError(f"the original model did not run on the {how}: {exc.what}",
                                      fix="check the data matches the model's inputs") from None
    except BackendFailedError as exc:
        raise InputModelError(
            f"ONNX Runtime cannot load the original model: {exc.what}", where=options.target,
            fix="qcompile verifies on ONNX Runtime; pass --no-verify to skip verification",
        ) from None
    return feeds, outputs, how


class PassManager:
    """Runs onnx-ir passes, each in an :class:`InstrumentedPass`, with onnx-ir's ``PassManager``
    (``steps`` sweeps, stopping early at a fixed point), then the ``finalize`` passes once; verifies
    each (``verify``) and undoes a failing one (``rollback``). ``dump_dir`` (default
    $QCOMPILE_DUMP_DIR, else none) receives ``NN-name.onnx`` after each pass that changed the model."""

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase],
        *,
        verify: bool = False,
        verify_options: VerifyOptions | None = None,
        steps: int = 1,
        finalize: Sequence[ir.passes.PassBase] = (),
        on_pass: Callable[[PassStats], None] | None = None,
        rollback: bool = False,
        dump_dir: str | os.PathLike | None = None,
    ) -> None:
        self.passes = list(passes)
        self.finalize = list(finalize)
        self.verify = verify
        self.verify_options = verify_options or VerifyOptions()
        self.steps = max(1, steps)
        self.on_pass = on_pass
        self.rollback = rollback
        if dump_dir is None:
            dump_dir = os.environ.get(DUMP_DIR_ENV) or None
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None

    def __call__(self, model: ir.Model) -> PassManagerResult:
        feeds: list[dict[str, np.ndarray]] = []
        reference: list[dict] | None = None
        how = None
        if self.verify:
            feeds, reference, how = reference_run(model, self.verify_options)
        keep_original = self.rollback and reference is not None and not self.verify_options.each_pass
        original = snapshot(model) if keep_original else None
        run = _Run(self, feeds, reference if self.verify_options.each_pass else None)
        end_to_end = None
        try:
            model = run.all_sweeps(model)
        except InternalError:
            if original is None:
                raise
            model = None  # a pass crashed: found and rolled back below, verifying each
        if model is None or (reference is not None and run.modified):
            try:
                if model is None:
                    raise PassFailedError("a pass crashed", stage="all passes")
                final = run.outputs if run.outputs is not None else self._outputs_or_fail(model, feeds, "all passes")
                end_to_end = compare_outputs(zip(reference, final))
                if not self.verify_options.each_pass:
                    _check_within(end_to_end, sum(self.verify_options.bound(p) for p in run.modified_passes),
                                  "all passes", lambda: run.noise(model, final))
            except InternalError:
                if original is None:
                    raise
                log.warning("the optimized model fails its check; finding the pass by verifying each")
                each = PassManager(self.passes, verify=True, steps=self.steps, finalize=self.finalize,
                                   on_pass=self.on_pass, rollback=True, dump_dir=self.dump_dir,
                                   verify_options=replace(self.verify_options, feeds=feeds, each_pass=True))
                result = each(original)
                result.feeds = how
                return result
        return PassManagerResult(model, run.modified, run.stats, how, end_to_end, feeds, reference)

    def _outputs_or_fail(self, model: ir.Model, feeds, stage: str) -> list[dict]:
        return checked_outputs(model, feeds, stage, self.verify_options.target)


def checked_outputs(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], stage: str,
                    target: str = "ort-cpu") -> list[dict]:
    """The outputs of a model qcompile produced, after the ONNX checker; a model that fails either
    is qcompile's bug, blamed on ``stage`` (a pass name or a phase)."""
    try:
        modelio.check(model)
    except QCompileError as exc:
        raise VerificationError(f"{_stage(stage)} produced an invalid model: {exc.what}", stage=stage) from None
    try:
        return run_feeds(model, feeds, target)
    except BackendFailedError as exc:
        raise VerificationError(f"{_stage(stage)} produced a model the runtime cannot run: {exc.what}",
                                stage=stage) from None


def _stage(name: str) -> str:
    return name if " " in name else f"pass {name!r}"


#: The least relative L2 a comparison can be held to, by the output's element type: about two units
#: of its rounding (fp16 u = 2^-11, bf16 u = 2^-8) — a rewrite that reorders two operations moves
#: results by one step, and no bound below the type's resolution means anything.
DTYPE_REL_L2_FLOOR = {"float16": 1e-3, "bfloat16": 8e-3}


def output_bound(bound: float, dtype: str | None) -> float:
    return max(bound, DTYPE_REL_L2_FLOOR.get(dtype or "", 0.0))


#: How far beyond ORT's own graph optimizations a pass may move an output (module docstring): the two
#: round differently, by about as much (PP-OCRv5's detector: fuse-batchnorm 0.0503 vs float_noise 0.0502).
NOISE_FACTOR = 2.0


def float_noise(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], outputs: list[dict],
                target: str = "ort-cpu") -> dict[str, float]:
    """Per output, how far ONNX Runtime's own graph optimizations move ``model``'s ``outputs`` (its
    outputs unoptimized, on ``feeds``): rel L2. Empty where the optimized session does not run."""
    try:
        with execute.loaded(model, target, replace(VERIFY_RUNTIME, optimization="all")) as runtime:
            optimized = execute.run_all(runtime, feeds)
    except BackendFailedError:
        return {}
    return {name: out.rel_l2 for name, out in compare_outputs(zip(outputs, optimized)).outputs.items()
            if not out.shape_mismatch}


def _check_within(comparison: Comparison, bound: float, stage: str,
                  noise: Callable[[], dict[str, float]] | None = None) -> float | None:
    """Every output within ``bound`` — or, should one miss it, within the model's float noise
    (``noise()``, measured only then: module docstring). Returns the noise floor used, if one was."""
    floor: dict[str, float] | None = None
    for output in comparison.outputs.values():
        limit = output_bound(bound, output.dtype)
        if not output.shape_mismatch and not output.rel_l2 <= limit and noise is not None:
            floor = noise() if floor is None else floor
            limit = max(limit, NOISE_FACTOR * floor.get(output.name, 0.0))
        if output.shape_mismatch or not output.rel_l2 <= limit:
            detail = output.shape_mismatch or (f"rel L2 {output.rel_l2:.3g} > {limit:g}, "
                                               f"max abs {output.max_abs:.3g}")
            if floor and not output.shape_mismatch:
                detail += f" (ORT's own optimizations move it by {floor.get(output.name, 0.0):.3g})"
            raise VerificationError(f"{_stage(stage)} changed the model's semantics: output {output.name!r} {detail}",
                                    stage=stage)
    return max(floor.values(), default=0.0) if floor else None


class _Run:
    """The state of one run of a PassManager, shared by its wrapped passes: stats, the last verified
    outputs, the passes disabled after a rollback."""

    def __init__(self, manager: PassManager, feeds: list[dict], reference: list[dict] | None) -> None:
        self.manager = manager
        self.feeds = feeds
        self.outputs = reference  # outputs of the last verified model (per-pass verification only)
        self.stats: list[PassStats] = []
        self.modified = False
        self.modified_passes: list[ir.passes.PassBase] = []
        self.disabled: set[str] = set()
        self._noise: dict[str, float] | None = None
        # A copy before every pass only where each pass is verified; with one check at the end, a
        # failure (or a crash) restarts from the original with every pass verified (PassManager).
        self.per_pass_rollback = manager.rollback and (reference is not None or not manager.verify)

    def all_sweeps(self, model: ir.Model) -> ir.Model:
        model = self.sweeps(self.manager.passes, model, self.manager.steps)
        return self.sweeps(self.manager.finalize, model, 1)

    def sweeps(self, passes: Sequence[ir.passes.PassBase], model: ir.Model, steps: int) -> ir.Model:
        """``passes``, each wrapped, run by onnx-ir's PassManager: at most ``steps`` sweeps, fewer
        where a sweep changes nothing. What a pass raised reaches the caller as it was raised."""
        if not passes:
            return model  # onnx-ir's PassManager takes at least one pass
        manager = ir.passes.PassManager([InstrumentedPass(p, self) for p in passes], steps=steps, early_stop=True)
        try:
            return manager(model).model
        except ir.passes.PassError as exc:
            error = _unwrapped(exc)
        raise error

    def noise(self, model: ir.Model, outputs: list[dict]) -> dict[str, float]:
        """The model's float noise on the run's feeds (:func:`float_noise`), measured once per run:
        the passes change what a model computes with, not how well conditioned it is."""
        if self._noise is None:
            self._noise = float_noise(model, self.feeds, outputs, self.manager.verify_options.target)
        return self._noise

    def record(self, stat: PassStats) -> None:
        self.stats.append(stat)
        if self.manager.on_pass:
            self.manager.on_pass(stat)

    def rolled_back(self, name: str, before: ir.Model, exc: InternalError) -> PassStats:
        log.warning("pass %r rolled back: %s", name, exc.what)
        self.disabled.add(name)
        nodes, size = count_nodes(before), modelio.initializer_bytes(before)
        return PassStats(name, 0.0, nodes, nodes, size, size, modified=False, verified=False, rolled_back=True,
                         error=exc.what)


class InstrumentedPass(ir.passes.PassBase):
    """One pass as qcompile runs it inside onnx-ir's PassManager: timed, its nodes and initializer
    bytes counted before and after, the model it produced dumped (``dump_dir``) and verified, and,
    with rollback, undone when it crashes or fails its check. One :class:`PassStats` per execution
    goes to the run; a pass disabled by an earlier rollback is skipped (not modified, no stats).

    In place exactly when ``inner`` is: a rollback restores an in-place pass's model into the same
    object, and a skipped functional pass returns a copy, so onnx-ir's contract checks hold."""

    def __init__(self, inner: ir.passes.PassBase, run: _Run) -> None:
        self.inner = inner
        self.run = run
        self.name = pass_name(inner)

    @property
    def in_place(self) -> bool:
        return self.inner.in_place

    @property
    def changes_input(self) -> bool:
        return self.inner.changes_input

    def __repr__(self) -> str:
        return f"InstrumentedPass({self.name!r})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        run = self.run
        if self.name in run.disabled:
            return ir.passes.PassResult(model if self.in_place else snapshot(model), False)
        before = snapshot(model) if run.per_pass_rollback else None
        structure = _structure(model) if getattr(self.inner, "annotates_only", False) else None
        try:
            new_model, stat = self.measured(model)
            self.dump(new_model, stat)
            if structure is not None:
                self.verify_structure(structure, new_model, stat)
            self.verify(new_model, stat)
        except InternalError as exc:
            if before is None:
                raise
            stat = run.rolled_back(self.name, before, exc)
            new_model = _restore(model, before) if self.in_place else before
        run.record(stat)
        return ir.passes.PassResult(new_model, stat.modified)

    def measured(self, model: ir.Model) -> tuple[ir.Model, PassStats]:
        """Run the inner pass and measure it; an exception inside it is qcompile's bug, named."""
        name = self.name
        nodes_before, bytes_before = count_nodes(model), modelio.initializer_bytes(model)
        start = time.perf_counter()
        try:
            result = self.inner(model)
        except QCompileError:
            raise
        except Exception as exc:
            cause = exc.__cause__ or exc
            message = str(cause).splitlines()[0] if str(cause) else ""
            raise PassFailedError(f"pass {name!r} crashed: {type(cause).__name__}: {message}", stage=name) from exc
        seconds = time.perf_counter() - start
        new_model = result.model
        if new_model is not model:
            for key, value in model.meta.items():
                if key.startswith("qcompile.") and key not in new_model.meta:
                    new_model.meta[key] = value
        return new_model, PassStats(
            name=name,
            seconds=seconds,
            nodes_before=nodes_before,
            nodes_after=count_nodes(new_model),
            initializer_bytes_before=bytes_before,
            initializer_bytes_after=modelio.initializer_bytes(new_model),
            modified=bool(result.modified),
        )

    def dump(self, model: ir.Model, stat: PassStats) -> None:
        """Write the model a pass produced, before its check (a failing pass leaves the model that
        failed), to ``dump_dir/NN-name.onnx``: NN is the pass's position in ``stats``. A dump that
        cannot be written is logged, not fatal."""
        folder = self.run.manager.dump_dir
        if folder is None or not stat.modified:
            return
        path = folder / f"{len(self.run.stats):02d}-{re.sub(r'[^A-Za-z0-9._-]', '_', stat.name)}.onnx"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            modelio.save(model, path)
        except Exception as exc:
            log.warning("could not dump the model after pass %r to %s: %s", stat.name, path, exc)

    def verify_structure(self, before: tuple, model: ir.Model, stat: PassStats) -> None:
        """An annotation-only pass (shape inference, clearing shapes) verified exactly, without a run:
        every node, attribute, connection and initializer is as before, so the function is too."""
        if _structure(model) != before:
            raise VerificationError(f"pass {stat.name!r} changed the graph's structure, not only its annotations",
                                    stage=stat.name)
        stat.verified, stat.bound, stat.rel_l2, stat.max_abs = True, 0.0, 0.0, 0.0  # exact by construction

    def verify(self, model: ir.Model, stat: PassStats) -> None:
        """The ONNX checker, then the outputs against the last verified ones, within the pass's bound."""
        run = self.run
        if not stat.modified:
            return
        run.modified = True
        if self.inner not in run.modified_passes:
            run.modified_passes.append(self.inner)
        if run.outputs is None:
            return
        bound = run.manager.verify_options.bound(self.inner)
        stat.bound = bound
        outputs = run.manager._outputs_or_fail(model, run.feeds, stat.name)
        comparison = compare_outputs(zip(run.outputs, outputs))
        worst = comparison.worst()
        stat.rel_l2, stat.max_abs = worst.rel_l2, worst.max_abs
        stat.float_noise = _check_within(comparison, bound, stat.name, lambda: run.noise(model, outputs))
        stat.verified = True
        run.outputs = outputs


_BY_IDENTITY = frozenset({ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS, ir.AttributeType.TENSOR,
                          ir.AttributeType.TENSORS})


def _structure(model: ir.Model) -> tuple:
    """What a model computes, as a comparable value: every node (op, domain, attributes, input and
    output names), every initializer (name and tensor identity) and the graph's inputs and outputs."""
    graph = model.graph
    nodes = tuple(
        (n.op_type, n.domain, tuple(v.name if v is not None else "" for v in n.inputs),
         tuple(v.name for v in n.outputs),
         tuple(sorted((k, id(a.value) if a.type in _BY_IDENTITY else repr(a.value)) for k, a in n.attributes.items())))
        for n in ir.traversal.RecursiveGraphIterator(graph))
    # order is not semantics
    initializers = tuple(sorted((name, id(v.const_value)) for name, v in graph.initializers.items()))
    return nodes, initializers, tuple(v.name for v in graph.inputs), tuple(v.name for v in graph.outputs)


def _restore(model: ir.Model, saved: ir.Model) -> ir.Model:
    """``model`` (the same object, as an in-place pass's result must be) with ``saved``'s contents."""
    for slot in ir.Model.__slots__:
        setattr(model, slot, getattr(saved, slot))
    return model


def _unwrapped(error: BaseException) -> BaseException:
    """What a pass raised, out of the PassErrors that onnx-ir's PassManager wraps it in (one for the
    sweep, one for the step); an InstrumentedPass lets no PassError of its own out."""
    while isinstance(error, ir.passes.PassError) and error.__cause__ is not None:
        error = error.__cause__
    return error
