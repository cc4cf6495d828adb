"""End metrics of a model against a reference, one source of truth for their names.

A metric turns (reference outputs, candidate outputs, feed) over many feeds into one number; the
reference model's own value is the same metric with its outputs in both places, so every metric
has a reference value to measure a drop from:

    cosine[:OUT]     <a, b> / (|a| |b|) over all samples (flattened; all outputs: the lowest)  higher better, ref 1
    rel_l2[:OUT]     |a - b| / |a|                           (all outputs: the highest)      lower better,  ref 0
    sqnr[:OUT]       10 log10(|a|^2 / |a - b|^2) dB          (all outputs: the lowest)       higher better, ref inf
    top1[:OUT]       share of positions whose argmax over the last axis agrees               higher better, ref 1
    perplexity       exp(mean NLL of input_ids[t+1] under logits[t]), masked by attention_mask,
                     of each model on its own (a causal LM's ``logits`` output)             lower better
    zoo:NAME[:KEY]   the zoo entry's task metric on its own evaluation set (R@1, perplexity, top-1)
    module:function  a user's ``function(ref_outputs, cand_outputs, feed) -> float``, averaged over
                     feeds (higher better unless the function has ``higher_is_better = False``)

Drop relative to the reference (0.01 = 1 % worse): ``(ref - cand) / |ref|`` for higher-better
metrics, ``(cand - ref) / |ref|`` for lower-better ones; where the reference is 0 (rel_l2), the
difference itself; where it is infinite (sqnr), none (give an absolute ``--min``).
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from qcompile.errors import InputSpecError, UnknownNameError
from qcompile.metrics import OutputComparison

Outputs = Mapping[str, np.ndarray]

#: The output-similarity metrics: (higher is better, reference value, how all outputs combine).
SIMILARITY = {
    "cosine": (True, 1.0, min),
    "rel_l2": (False, 0.0, max),
    "sqnr": (True, math.inf, min),
    "top1": (True, 1.0, min),
}
INTRINSIC = ("perplexity",)
METRIC_HELP = ("cosine | rel_l2 | sqnr | top1 (each optionally :OUTPUT) | perplexity | zoo:NAME[:KEY] | "
               "module:function")


@dataclass(frozen=True)
class Metric:
    """A named end metric; ``kind`` is similarity, intrinsic, task or user."""

    name: str
    kind: str
    higher_is_better: bool
    output: str | None = None  # similarity: one output (None: all)
    function: Callable[..., float] | None = field(default=None, compare=False, repr=False)

    @property
    def pairwise(self) -> bool:
        """Whether the candidate is scored against the reference's outputs (kept per feed)."""
        return self.kind in ("similarity", "user")

    @property
    def needs_data(self) -> bool:
        return self.kind != "task"

    def drop(self, reference: float, candidate: float) -> float | None:
        """How much worse the candidate is (module docstring); None where no drop is defined."""
        worse = reference - candidate if self.higher_is_better else candidate - reference
        if math.isnan(candidate) or math.isnan(reference):
            return math.inf
        if math.isinf(reference):
            return None
        if math.isinf(candidate):
            return -math.inf if (candidate > 0) == self.higher_is_better else math.inf
        return worse if reference == 0 else worse / abs(reference)

    def accumulator(self) -> "Accumulator":
        if self.kind == "similarity":
            return _Similarity(self)
        if self.kind == "intrinsic":
            return _Perplexity()
        if self.kind == "user":
            return _User(self)
        raise ValueError(f"{self.name} is evaluated on its own data, not accumulated")

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "higher_is_better": self.higher_is_better}


def parse_metric(name: str) -> Metric:
    """The metric a CLI NAME means (module docstring); an unknown one is the user's error (exit 2)."""
    base, _, rest = name.partition(":")
    if base in SIMILARITY:
        return Metric(name, "similarity", SIMILARITY[base][0], output=rest or None)
    if name in INTRINSIC:
        return Metric(name, "intrinsic", higher_is_better=False)
    if base == "zoo":
        from qcompile.models import get_entry

        entry_name, _, key = rest.partition(":")
        try:
            entry = get_entry(entry_name)
        except KeyError as exc:
            raise UnknownNameError(str(exc.args[0]), fix="see `qcompile zoo list`") from None
        if not entry.metric:
            raise InputSpecError(f"zoo entry {entry.name!r} has no task metric (random weights)", where=name,
                                 fix="use an output-similarity metric: " + METRIC_HELP)
        key = key or entry.metric
        higher = entry.higher_is_better if key == entry.metric else key != "perplexity"
        return Metric(f"zoo:{entry.name}:{key}", "task", higher)
    if rest:
        function = _user_function(name)
        return Metric(name, "user", bool(getattr(function, "higher_is_better", True)), function=function)
    raise UnknownNameError(f"unknown metric {name!r}", fix="choose: " + METRIC_HELP)


def _user_function(spec: str) -> Callable[..., float]:
    module_name, _, attr = spec.partition(":")
    try:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputSpecError(f"cannot import metric {spec!r}: {exc}",
                             fix="name it as module:function, importable from the current folder") from None
    except Exception as exc:
        raise InputSpecError(f"importing metric {spec!r} raised {type(exc).__name__}: {exc}",
                             fix="fix the module (it is your code)") from None
    if not callable(function):
        raise InputSpecError(f"metric {spec!r} is not a function", fix="name a function(ref, cand, feed) -> float")
    return function


class Accumulator:
    """Adds one feed at a time; :meth:`value` is the metric over all of them."""

    def add(self, reference: Outputs, candidate: Outputs, feed: Mapping[str, np.ndarray]) -> None: ...

    def value(self) -> float: ...


class _Similarity(Accumulator):
    def __init__(self, metric: Metric) -> None:
        self.metric = metric
        self.base = metric.name.partition(":")[0]
        self.outputs: dict[str, OutputComparison] = {}

    def add(self, reference, candidate, feed) -> None:
        names = [self.metric.output] if self.metric.output else list(reference)
        for name in names:
            if name not in reference:
                raise InputSpecError(f"the reference has no output {name!r}", where=self.metric.name,
                                     fix=f"choose one of: {', '.join(reference)}")
            comparison = self.outputs.setdefault(name, OutputComparison(name))
            if name not in candidate:
                comparison.shape_mismatch = "missing in candidate"
                continue
            comparison.add(reference[name], candidate[name])

    def value(self) -> float:
        _, ideal, combine = SIMILARITY[self.base]
        values = []
        for o in self.outputs.values():
            if o.shape_mismatch:
                values.append(-math.inf if SIMILARITY[self.base][0] else math.inf)
                continue
            v = {"cosine": o.cosine, "rel_l2": o.rel_l2, "sqnr": o.sqnr_db, "top1": o.top1}[self.base]
            if v is not None:
                values.append(v)
        return combine(values) if values else ideal


class _Perplexity(Accumulator):
    """exp(mean next-token NLL) of the candidate's own ``logits`` on the feed's ``input_ids``."""

    def __init__(self) -> None:
        self.nll, self.count = 0.0, 0

    def add(self, reference, candidate, feed) -> None:
        logits = candidate.get("logits")
        if logits is None:
            floats = [v for v in candidate.values() if np.asarray(v).ndim == 3]
            logits = floats[0] if len(floats) == 1 else None
        if logits is None or "input_ids" not in feed:
            raise InputSpecError("perplexity needs a causal LM: an input 'input_ids' and an output 'logits' "
                                 "[batch, sequence, vocab]", fix="choose an output-similarity metric")
        ids = np.asarray(feed["input_ids"])
        mask = np.asarray(feed.get("attention_mask", np.ones_like(ids))).astype(bool)
        logits = np.asarray(logits, dtype=np.float64)[:, :-1]
        logits = logits - logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = ids[:, 1:]
        picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        valid = mask[:, 1:] & mask[:, :-1]
        self.nll -= float(picked[valid].sum())
        self.count += int(valid.sum())

    def value(self) -> float:
        return math.exp(self.nll / self.count) if self.count else math.nan


class _User(Accumulator):
    def __init__(self, metric: Metric) -> None:
        self.metric, self.total, self.count = metric, 0.0, 0

    def add(self, reference, candidate, feed) -> None:
        try:
            value = float(self.metric.function(dict(reference), dict(candidate), dict(feed)))
        except Exception as exc:
            raise InputSpecError(f"metric {self.metric.name!r} raised {type(exc).__name__}: {exc}",
                                 fix="fix the function (it is your code)") from None
        self.total += value
        self.count += 1

    def value(self) -> float:
        return self.total / self.count if self.count else math.nan


@dataclass
class Score:
    """A candidate's metric against its reference's."""

    metric: Metric
    reference: float
    candidate: float
    samples: int

    @property
    def drop(self) -> float | None:
        return self.metric.drop(self.reference, self.candidate)

    def to_json(self) -> dict:
        return {"metric": self.metric.name, "higher_is_better": self.metric.higher_is_better,
                "reference": self.reference, "candidate": self.candidate, "drop": self.drop, "samples": self.samples}


class ReferenceRun:
    """The reference model's side of a metric, computed once: its value and (pairwise metrics) its
    outputs per feed; :meth:`score` then scores any number of candidates against it, each from a
    path (what an executor ships: this object, once, and model paths)."""

    def __init__(self, metric: Metric, reference: str | Path, feeds: list[dict], target: str = "ort-cpu") -> None:
        self.metric, self.reference, self.target = metric, str(reference), target
        self.feeds = feeds
        if metric.kind == "task":
            self.outputs: list[dict] = []
            self.value = _task_value(metric, self.reference, target)
            return
        ref_outputs = _run(self.reference, feeds, target)
        accumulator = metric.accumulator()
        for outputs, feed in zip(ref_outputs, feeds):
            accumulator.add(outputs, outputs, feed)
        self.value = accumulator.value()
        self.outputs = ref_outputs if metric.pairwise else []

    def score(self, candidate: str | Path, target: str | None = None) -> Score:
        return self.evaluate(candidate, target=target)[0]

    def evaluate(self, candidate: str | Path, timing_runs: int = 0,
                 target: str | None = None) -> tuple[Score, float | None]:
        """The candidate's score and, with ``timing_runs``, its fastest of that many runs on the largest
        feed (ms), timed in the same session after scoring (warm)."""
        from qcompile import execute

        target = target or self.target
        if self.metric.kind == "task":
            score = Score(self.metric, self.value, _task_value(self.metric, str(candidate), target), 0)
            if not timing_runs:
                return score, None
        accumulator = self.metric.accumulator() if self.metric.kind != "task" else None
        with execute.loaded(str(candidate), target) as runtime:
            if accumulator is not None:
                for i, feed in enumerate(self.feeds):
                    accumulator.add(self.outputs[i] if self.outputs else {}, runtime.run(feed), feed)
                score = Score(self.metric, self.value, accumulator.value(), len(self.feeds))
            latency = None
            if timing_runs and self.feeds:
                import time

                feed = max(self.feeds, key=lambda f: sum(np.asarray(a).size for a in f.values()))
                runtime.run(feed)
                best = math.inf
                for _ in range(timing_runs):
                    started = time.perf_counter()
                    runtime.run(feed)
                    best = min(best, time.perf_counter() - started)
                latency = best * 1000.0
        return score, latency


def evaluate_task(reference: ReferenceRun, item: tuple[str, int]) -> dict:
    """One candidate evaluation as an executor task (qcompile/executor.py): ``item`` is (model path,
    timing runs); the reference is shipped once."""
    path, runs = item
    score, latency = reference.evaluate(path, runs)
    return {"path": path, "score": score.to_json(), "latency_ms": latency}


def _task_value(metric: Metric, path: str, target: str) -> float:
    from qcompile.models import get_entry

    _, name, key = metric.name.split(":", 2)
    result = get_entry(name).evaluate(path, target)
    if key not in result:
        raise InputSpecError(f"zoo entry {name!r} reports no {key!r}", where=metric.name,
                             fix=f"choose one of: {', '.join(k for k, v in result.items() if isinstance(v, float))}")
    return float(result[key])


def _iter_run(path: str, feeds: Iterable[dict], target: str):
    from qcompile import execute

    with execute.loaded(path, target) as runtime:
        for feed in feeds:
            yield runtime.run(feed)


def _run(path: str, feeds: list[dict], target: str) -> list[dict]:
    return list(_iter_run(path, feeds, target))


def score_models(metric: Metric, reference: str | Path, candidate: str | Path, feeds: list[dict],
                 target: str = "ort-cpu") -> Score:
    """``candidate``'s metric against ``reference``'s on ``feeds`` (task metrics: their own data)."""
    return ReferenceRun(metric, reference, feeds, target).score(candidate)

