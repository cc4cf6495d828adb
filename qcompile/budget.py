"""Accuracy-budget mixed precision: the fastest plan whose end metric stays within a budget.

    1. trial 0: everything quantizable quantized (the most aggressive plan), measured on held-out data
    2. per quantized layer, cost / saving = 10^(-local SQNR / 10) / MACs (qcompile/analyze.py): the
       noise it adds per multiply-add it moves to INT8; layers are fallen back in that order
    3. the number k of layers kept float is searched on [0, N] (k = 0 over budget, k = N float):
       each round evaluates ``parallelism`` values of k spread over the open interval (one: bisection),
       assuming more float never costs accuracy; bounded by ``max_trials`` and ``max_seconds``
    4. of the candidates within budget, the one with the lowest measured latency on the target wins
       (the one with fewest layers float unless another is measurably faster: LATENCY_MARGIN);
       none within: the closest (smallest drop) is reported, and the caller fails (exit 1)

Held-out data: the user's (``--budget-data``), a zoo entry's held-out split, or else every
:data:`HOLD_OUT_EVERY`-th calibration sample, set aside before calibration reads it
(:func:`split_calibration`; at least :data:`MIN_HELDOUT` of them, or nothing is set aside). The static
recipes' default budget (qcompile/recipes.py) is not *required*: where it has no data to be measured on,
the per-node SQNR guard decides instead, and says so; it is chosen by accuracy alone (candidates not
timed: the fewest layers float within budget), so the same inputs give the same bytes.

Drop is qcompile.evaluators' relative drop against the float model on the same held-out feeds. Each
candidate is built by the pipeline's own lowering (the same code as the final model) and evaluated
through an executor (qcompile/executor.py): the reference is computed once and shipped, candidates by path.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from qcompile.evaluators import Metric, ReferenceRun, evaluate_task


@dataclass(frozen=True)
class BudgetSpec:
    """What the user asked: ``metric`` on ``feeds`` (held out) at most ``max_drop`` worse than FP32.

    ``metric`` None: :func:`default_metric` of the model; ``feeds`` empty: held out from calibration
    (:func:`split_calibration`, at most ``heldout_samples``); ``timing_runs`` 0: candidates are not
    timed (the fewest layers float within budget wins); ``required`` False: without data to measure
    it on, the SQNR guard decides instead (the recipes' default budget)."""

    metric: Metric | None
    max_drop: float
    feeds: list = field(default_factory=list, repr=False, compare=False)
    max_trials: int = 12
    max_seconds: float = 1800.0
    timing_runs: int = 10
    executor: Any = field(default=None, compare=False)
    data: str = ""  # where the feeds came from, in words
    order: str = "noise-per-mac"  # ORDERS: how layers are ranked for falling back
    required: bool = True
    heldout_samples: int = 16
    min_feeds: int = 1


#: Calibration lends every 4th sample to a budget with no held-out data of its own (the 4th, 8th, ...) ...
HOLD_OUT_EVERY = 4
#: ... when that gives at least this many: fewer measure nothing (a budget on 2 samples is noise).
MIN_HELDOUT = 4


def default_metric(input_names: set[str], output_names: set[str]) -> str:
    """The budget's metric when none is named: perplexity for a causal LM, else output cosine."""
    return "perplexity" if "input_ids" in input_names and "logits" in output_names else "cosine"


def split_calibration(spec: BudgetSpec, reader, high_precision: str = "fp32"):
    """(spec, reader, note): a spec without feeds gets every :data:`HOLD_OUT_EVERY`-th calibration
    sample, and the reader passes on the rest (qcompile.calibration.HeldOutSplit). Where nothing
    can be measured — random calibration data, or (for a budget that is not ``required``) a float
    part that ORT CPU does not score natively — a required budget is the user's error (exit 2);
    otherwise the spec is None and the note says why the SQNR guard decides."""
    from qcompile.calibration import HeldOutSplit, RandomReader
    from qcompile.errors import InputSpecError

    if high_precision != "fp32" and not spec.required:  # asked for, _quantize_float says what to do
        return None, reader, (f"accuracy budget not measured: the float part runs in {high_precision}, which ORT "
                              "CPU does not score natively")
    if spec.feeds or reader is None:
        return spec, reader, None
    if isinstance(reader, RandomReader):
        if spec.required:
            raise InputSpecError("--accuracy-budget needs held-out data: the calibration data is random",
                                 where="--budget-data",
                                 fix="give inputs that are neither the calibration nor the evaluation set")
        return None, reader, "accuracy budget not measured: the calibration data is random"
    split = HeldOutSplit(reader, every=HOLD_OUT_EVERY, minimum=MIN_HELDOUT, limit=spec.heldout_samples)
    data = f"every {HOLD_OUT_EVERY}th calibration sample, held out from calibration"
    return dataclasses.replace(spec, feeds=split.heldout, data=data, min_feeds=MIN_HELDOUT), split, None


def too_few_feeds(spec: BudgetSpec) -> str | None:
    """Why ``spec`` cannot be measured once calibration has read its reader (None: it can); a
    required budget that cannot is the user's error (exit 2)."""
    from qcompile.errors import InputSpecError

    if len(spec.feeds) >= spec.min_feeds:
        return None
    why = (f"{len(spec.feeds)} held-out samples, at least {spec.min_feeds} needed: a calibration set of at least "
           f"{HOLD_OUT_EVERY * MIN_HELDOUT} samples lends every {HOLD_OUT_EVERY}th")
    if spec.required:
        raise InputSpecError(f"--accuracy-budget: {why}", where="--budget-data",
                             fix="give held-out inputs with --budget-data, or more calibration samples")
    return f"accuracy budget not measured: {why}"


def instead(min_sqnr_db: float | None) -> str:
    """What chose what stays float where the budget could not: the guard, or nothing."""
    return (f"; the {min_sqnr_db:g} dB SQNR guard chose what stays float" if min_sqnr_db is not None
            else "; no SQNR guard set: every planned layer is quantized")


@dataclass
class Trial:
    index: int
    kept_float: int
    value: float
    drop: float | None
    within: bool
    latency_ms: float | None
    path: str
    seconds: float

    def to_json(self) -> dict:
        """Everything but the path: candidates are temporary files, gone once the result is chosen."""
        return {k: v for k, v in asdict(self).items() if k != "path"}


@dataclass
class BudgetResult:
    spec: BudgetSpec
    reference_value: float
    order: list[str]  # the fallback order; empty when the all-quantized candidate was within budget
    layers: int = 0  # quantized layers of the all-quantized candidate
    trials: list[Trial] = field(default_factory=list)
    chosen: int | None = None  # index into trials (within budget)
    stopped: str = ""

    @property
    def met(self) -> bool:
        return self.chosen is not None

    @property
    def best(self) -> Trial:
        """The chosen trial, or the closest to the budget."""
        if self.chosen is not None:
            return self.trials[self.chosen]
        return min(self.trials, key=lambda t: (math.inf if t.drop is None else t.drop, t.kept_float))

    def kept_float(self) -> list[str]:
        return self.order[: self.best.kept_float]

    def to_json(self) -> dict:
        return {"metric": self.spec.metric.name, "max_drop": self.spec.max_drop, "data": self.spec.data,
                "samples": len(self.spec.feeds), "reference": self.reference_value, "layers": self.layers,
                "met": self.met,
                "chosen": self.chosen, "best": self.best.index, "stopped": self.stopped,
                "fallback_order": self.order, "trials": [t.to_json() for t in self.trials]}

    def report_data(self) -> dict:
        """Candidates and search path for qcompile.report."""
        metric = self.spec.metric
        return {
            "metric_name": metric.name, "higher_is_better": metric.higher_is_better,
            "budget": {"metric": metric.name, "limit": _limit(metric, self.reference_value, self.spec.max_drop),
                       "reference": self.reference_value},
            "candidates": [{"name": f"trial {t.index}: {t.kept_float} float", "latency_ms": t.latency_ms,
                            "metric": t.value, "within_budget": t.within, "chosen": t.index == self.best.index}
                           for t in self.trials],
            "search": [{"trial": t.index, "kept_float": t.kept_float, "metric": t.value, "latency_ms": t.latency_ms,
                        "within_budget": t.within, "note": f"drop {t.drop:.4g}" if t.drop is not None else ""}
                       for t in self.trials],
        }


def _limit(metric: Metric, reference: float, max_drop: float) -> float:
    """The metric value the budget allows (module docstring's drop, inverted)."""
    scale = 1.0 if reference == 0 else abs(reference)
    return reference - max_drop * scale if metric.higher_is_better else reference + max_drop * scale


#: noise-per-mac: 10^(-local SQNR/10) / MACs (accuracy cost per latency saved); noise: the noise alone
ORDERS = ("noise-per-mac", "noise")


def fallback_order(layers, order: str = "noise-per-mac") -> list[str]:
    """Layers by noise (per multiply-add), most first (analyze.Layer: local_sqnr_db, macs)."""
    def cost(layer) -> float:
        noise = 0.0 if math.isinf(layer.local_sqnr_db) else 10.0 ** (-layer.local_sqnr_db / 10.0)
        return noise / max(layer.macs, 1) if order == "noise-per-mac" else noise

    return [layer.node for layer in sorted(layers, key=lambda layer: (-cost(layer), layer.node))]


def search(build: Callable[[list[str]], Path], first: Path, order: list[str] | Callable[[], list[str]],
           reference: ReferenceRun, spec: BudgetSpec, log: Callable[[Trial], None] | None = None,
           layers: int | None = None) -> BudgetResult:
    """The search (module docstring): ``build(nodes)`` writes the candidate with ``nodes`` float;
    ``first`` is the all-quantized candidate, already built; ``order`` the fallback order, or what
    measures it — called only when ``first`` is over budget (measuring it costs runs of its own);
    ``layers`` how many layers ``first`` quantizes (default: the order's length)."""
    from qcompile.executor import InProcess

    executor = spec.executor or InProcess()
    started = time.perf_counter()
    result = BudgetResult(spec, reference.value, [],
                          layers if layers is not None else 0 if callable(order) else len(order))
    evaluated: dict[int, Trial] = {}

    def run(ks: list[int]) -> None:
        paths = [first if k == 0 else build(order[:k]) for k in ks]
        t0 = time.perf_counter()
        rows = executor.map(evaluate_task, [(str(p), spec.timing_runs) for p in paths], shared=reference)
        each = (time.perf_counter() - t0) / max(len(ks), 1)
        for k, path, row in zip(ks, paths, rows):
            drop = row["score"]["drop"]
            trial = Trial(len(result.trials), k, row["score"]["candidate"], drop,
                          drop is not None and drop <= spec.max_drop, row["latency_ms"], str(path), each)
            result.trials.append(trial)
            evaluated[k] = trial
            if log:
                log(trial)

    def out_of_budget() -> str:
        if len(result.trials) >= spec.max_trials:
            return f"trial limit {spec.max_trials}"
        if time.perf_counter() - started >= spec.max_seconds:
            return f"time limit {spec.max_seconds:g} s"
        return ""

    run([0])
    if not evaluated[0].within:
        result.order = order() if callable(order) else list(order)
        result.layers = layers if layers is not None else len(result.order)
    order = result.order
    lo, hi = 0, len(order)  # k = lo is over budget (once measured); k = hi: everything float
    while not evaluated[0].within and hi - lo > 1:
        result.stopped = out_of_budget()
        if result.stopped:
            break
        count = max(1, min(executor.parallelism, spec.max_trials - len(result.trials), hi - lo - 1))
        ks = sorted({lo + (hi - lo) * (i + 1) // (count + 1) for i in range(count)} - set(evaluated))
        if not ks:
            break
        run(ks)
        passing = [k for k in evaluated if evaluated[k].within]
        hi = min(passing, default=hi)
        lo = max((k for k in evaluated if not evaluated[k].within and k < hi), default=lo)
    if not any(t.within for t in result.trials) and hi == len(order) and hi not in evaluated \
            and not out_of_budget() and order:
        run([hi])  # is the budget reachable at all?
    result.chosen = choose([t for t in result.trials if t.within])
    return result


#: A within-budget candidate with more layers float replaces the one with fewest only when it measures
#: this much faster: below it, fastest-of-N timings on a shared machine do not tell the two apart.
LATENCY_MARGIN = 0.05


def choose(within: list[Trial]) -> int | None:
    """The index of the fastest candidate within budget (module docstring; :data:`LATENCY_MARGIN`)."""
    if not within:
        return None
    fewest = min(within, key=lambda t: t.kept_float)
    timed = [t for t in within if t.latency_ms is not None and fewest.latency_ms is not None
             and t.latency_ms < fewest.latency_ms * (1.0 - LATENCY_MARGIN)]
    return min(timed, key=lambda t: t.latency_ms).index if timed else fewest.index
