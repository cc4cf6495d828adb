"""An instrumented pass manager over onnx-ir passes, with optional numeric verification.

For every pass it records wall time, node count and initializer bytes before and after, and whether
the pass changed the model. In verify mode, after every pass that changed the model, it runs the
ONNX checker and compares the outputs with the *input* model's outputs on ONNX Runtime CPU, on
seeded random feeds built from the input specs (or the user's feeds). A pass that changes semantics
fails with its name and the worst output error.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompile import execute, modelio, specs
from qcompile.errors import BackendFailedError, PassFailedError, QCompileError, VerificationError
from qcompile.metrics import Comparison, compare_outputs
from qcompile.runtimes import RuntimeOptions


@dataclass(frozen=True)
class VerifyOptions:
    """How the pass manager checks that passes preserve semantics."""

    samples: int = 2
    seed: int = 0
    dims: Mapping[str, int] = field(default_factory=dict)
    batch: int | None = None
    seq: int | None = None
    rel_l2: float = 1e-5
    target: str = "ort-cpu"
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None
    each_pass: bool = True  # False: one comparison at the end (cheaper on large models)

    def make_feeds(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        if self.feeds is not None:
            return [dict(f) for f in self.feeds]
        input_specs = specs.input_specs(model)
        return [
            specs.random_feed(input_specs, seed=self.seed + i, dims=self.dims, batch=self.batch, seq=self.seq)
            for i in range(self.samples)
        ]


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

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PassManagerResult:
    model: ir.Model
    modified: bool
    stats: list[PassStats]

    def to_json(self) -> dict:
        return {"modified": self.modified, "passes": [s.to_json() for s in self.stats]}


def count_nodes(model: ir.Model) -> int:
    """Nodes in the model, subgraphs included."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def pass_name(p: ir.passes.PassBase) -> str:
    return getattr(p, "name", None) or type(p).__name__


class PassManager:
    """Runs onnx-ir passes in order (``steps`` sweeps, stopping early at a fixed point), then the
    ``finalize`` passes once."""

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase],
        *,
        verify: bool = False,
        verify_options: VerifyOptions | None = None,
        steps: int = 1,
        finalize: Sequence[ir.passes.PassBase] = (),
        on_pass: Callable[[PassStats], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.finalize = list(finalize)
        self.verify = verify
        self.verify_options = verify_options or VerifyOptions()
        self.steps = max(1, steps)
        self.on_pass = on_pass

    def __call__(self, model: ir.Model) -> PassManagerResult:
        reference = None
        feeds: list[dict[str, np.ndarray]] = []
        if self.verify:
            feeds = self.verify_options.make_feeds(model)
            reference = self._run(model, feeds)
        stats: list[PassStats] = []
        any_modified = False
        per_pass = reference if self.verify_options.each_pass else None
        for _ in range(self.steps):
            model, sweep_modified = self._sweep(self.passes, model, stats, feeds, per_pass)
            any_modified |= sweep_modified
            if not sweep_modified:
                break
        model, final_modified = self._sweep(self.finalize, model, stats, feeds, per_pass)
        any_modified |= final_modified
        if reference is not None and per_pass is None and any_modified:
            self._verify(model, PassStats("all passes", 0.0, 0, 0, 0, 0, True), feeds, reference)
        return PassManagerResult(model, any_modified, stats)

    def _sweep(self, passes, model, stats, feeds, reference) -> tuple[ir.Model, bool]:
        modified = False
        for p in passes:
            model, stat = self._run_pass(p, model)
            if stat.modified and reference is not None:
                self._verify(model, stat, feeds, reference)
            stats.append(stat)
            if self.on_pass:
                self.on_pass(stat)
            modified |= stat.modified
        return model, modified

    def _run_pass(self, p: ir.passes.PassBase, model: ir.Model) -> tuple[ir.Model, PassStats]:
        name = pass_name(p)
        nodes_before, bytes_before = count_nodes(model), modelio.initializer_bytes(model)
        start = time.perf_counter()
        try:
            result = p(model)
        except QCompileError:
            raise
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise PassFailedError(
                f"pass {name!r} crashed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}",
                fix="report it and rerun without this pass (--passes)",
            ) from exc
        seconds = time.perf_counter() - start
        new_model = result.model
        if new_model is not model and "qcompile.source_path" in model.meta:
            new_model.meta["qcompile.source_path"] = model.meta["qcompile.source_path"]
        return new_model, PassStats(
            name=name,
            seconds=seconds,
            nodes_before=nodes_before,
            nodes_after=count_nodes(new_model),
            initializer_bytes_before=bytes_before,
            initializer_bytes_after=modelio.initializer_bytes(new_model),
            modified=bool(result.modified),
        )

    def _run(self, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        # A few feeds: pre-packing would only add a re-laid-out copy of every weight.
        options = RuntimeOptions(optimization="disable", extra={"session.disable_prepacking": "1"})
        with execute.loaded(model, self.verify_options.target, options) as runtime:
            return execute.run_all(runtime, feeds)

    def _verify(self, model: ir.Model, stat: PassStats, feeds, reference) -> None:
        try:
            modelio.check(model)
        except QCompileError as exc:
            stat.verified = False
            raise VerificationError(f"pass {stat.name!r} produced an invalid model: {exc.what}") from None
        try:
            outputs = self._run(model, feeds)
        except BackendFailedError as exc:
            stat.verified = False
            raise VerificationError(f"pass {stat.name!r} produced a model the runtime cannot run: {exc.what}") from None
        comparison: Comparison = compare_outputs(zip(reference, outputs))
        worst = comparison.worst()
        stat.rel_l2, stat.max_abs = worst.rel_l2, worst.max_abs
        stat.verified = comparison.within(self.verify_options.rel_l2)
        if not stat.verified:
            detail = worst.shape_mismatch or f"rel L2 {worst.rel_l2:.3g} > {self.verify_options.rel_l2:g}, max abs {worst.max_abs:.3g}"
            raise VerificationError(
                f"pass {stat.name!r} changed the model's semantics: output {worst.name!r} {detail}",
                fix="disable the pass with --passes and report the model",
            )
