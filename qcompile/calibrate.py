"""Streaming calibration: one loop over the data feeds every statistic (:func:`collect`).

The observed tensors are made graph outputs, the model runs on ONNX Runtime CPU feed by feed
(whatever the target: calibration is arithmetic, not deployment), and each tensor is handed to its
statistics (ranges, per-channel |X| max, moments, Hessians, row samples: qcompile.quant) and
dropped: memory does not grow with the number of samples, and no other intermediate tensor is ever
materialised.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompile import execute, memory, modelio, specs
from qcompile.calibration import CalibrationReader, iter_feeds
from qcompile.errors import InputSpecError, InternalError
from qcompile.progress import bar
from qcompile.quant.observers import HistogramObserver, Method, MinMaxObserver, make_observer
from qcompile.runtimes import Runtime, RuntimeOptions

log = logging.getLogger(__name__)

#: Every target calibrates on ONNX Runtime CPU (qcompile.targets: ``calibration_runtime``).
CALIBRATION_RUNTIME = "ort-cpu"


@dataclass
class CalibrationResult:
    """Observed ranges (lo, hi) per tensor, non-finite counts, and throughput."""

    ranges: dict[str, tuple[float, float]]
    nonfinite: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
    check_outputs: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)  # see collect_ranges

    def to_json(self) -> dict:
        widths = [hi - lo for lo, hi in self.ranges.values()]
        return {
            "tensors": len(self.ranges),
            "samples": self.samples,
            "seconds": self.seconds,
            "samples_per_s": self.samples / self.seconds if self.seconds else None,
            "nonfinite_values": dict(self.nonfinite),
            "range_width_min": min(widths) if widths else None,
            "range_width_max": max(widths) if widths else None,
        }


@contextlib.contextmanager
def tapped(model: ir.Model, names: list[str], *, keep_outputs: bool = False) -> Iterator[Runtime]:
    """A runtime on ``model`` whose outputs are ``names`` (the graph is restored after).

    Only the nodes those tensors depend on are loaded: a language model's head, say, is not run
    to calibrate its input. ``keep_outputs``: the model's own outputs stay outputs too (after
    ``names``), so that some feeds can also compute them (:func:`collect_ranges`'s ``check_feeds``).
    Memory-mapped weights are kept non-resident while the runtime pre-packs them."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    values.update(model.graph.initializers)  # a constant can be a graph output too
    outputs_before = list(model.graph.outputs)
    tapped_values = []
    for name in dict.fromkeys([*names, *(v.name for v in outputs_before if keep_outputs)]):
        value = values.get(name)
        if value is None:
            raise InternalError(f"tensor {name!r} to observe is not in the graph", stage="calibration")
        if value.type is None:
            value.dtype = ir.DataType.FLOAT
        tapped_values.append(value)
    model.graph.outputs.clear()
    model.graph.outputs.extend(tapped_values)
    try:
        with contextlib.ExitStack() as stack:
            with memory.shedding(model):  # pre-packing reads each weight once; the packed copies are used
                runtime = stack.enter_context(execute.loaded(model, CALIBRATION_RUNTIME, _tap_options(model)))
            yield runtime
    finally:
        model.graph.outputs.clear()
        model.graph.outputs.extend(outputs_before)


def _tap_options(model: ir.Model) -> RuntimeOptions:
    """Pre-packed weights make calibration runs faster on ORT CPU, but the packed copy doubles
    weight memory unless the originals are memory-mapped (their pages are dropped after packing):
    large in-memory models are run unpacked."""
    if modelio.in_memory_weight_bytes(model) > modelio.AUTO_EXTERNAL_BYTES:
        return RuntimeOptions(extra={"session.disable_prepacking": "1"})
    return RuntimeOptions()


Statistic = Any  # anything with ``update(x: np.ndarray)``: qcompile.quant.observers / qcompile.quant.statistics


@dataclass
class Collected:
    """What one calibration loop saw: samples, seconds, and the model's own outputs on ``check_feeds``."""

    samples: int = 0
    seconds: float = 0.0
    check_outputs: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)


def collect(
    model: ir.Model,
    statistics: Mapping[str, Sequence[Statistic]],
    reader: CalibrationReader,
    *,
    samples: int | None = None,
    runtime: Runtime | None = None,
    check_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    check_outputs: Sequence[str] = (),
    label: str = "calibrating",
) -> Collected:
    """THE calibration loop: run the model feed by feed on ORT CPU and hand each observed tensor to
    every statistic that wants it, then drop it (memory independent of the number of samples).

    ``statistics``: tensor name -> statistics updated with it. ``runtime``: an open :func:`tapped`
    runtime exposing those names (else one is opened here). ``check_feeds``: feeds on which the
    model's own outputs ``check_outputs`` are wanted too (the runtime then keeps them: :func:`tapped`
    with ``keep_outputs``), returned in order; a calibration feed equal to one of them computes both
    in one run, the others run once more after the last calibration feed. A tensor whose range
    observers saw only inf/NaN is the data's fault (InputSpecError).
    """
    names = list(statistics)
    if not names and not check_feeds:
        return Collected()  # nothing to observe (no MatMul for GPTQ, say): the data is not read
    input_specs = specs.input_specs(model)
    observers = {name: [s for s in stats if isinstance(s, (MinMaxObserver, HistogramObserver))]
                 for name, stats in statistics.items()}
    unseen = {name for name in names if observers[name]}  # range tensors yet to show a finite value
    started = time.perf_counter()
    count = 0
    checked: dict[int, dict[str, np.ndarray]] = {}
    both = list(dict.fromkeys([*names, *check_outputs]))
    with contextlib.ExitStack() as stack:
        if runtime is None:
            runtime = stack.enter_context(tapped(model, names, keep_outputs=bool(check_feeds)))
        with bar(f"{label} {len(names)} tensors", total=samples) as advance:
            for feed in iter_feeds(reader, input_specs, samples):
                match = next((i for i, f in enumerate(check_feeds) if i not in checked and _same_feed(feed, f)), None)
                arrays = runtime.run(feed, outputs=names if match is None else both)
                if match is not None:
                    checked[match] = {name: arrays[name] for name in check_outputs}
                for name in names:
                    array = arrays[name]
                    skipped = [o.nonfinite for o in observers[name]]
                    for statistic in statistics[name]:
                        statistic.update(array)
                    if name in unseen and any(o.nonfinite - k < np.size(array)
                                              for o, k in zip(observers[name], skipped)):
                        unseen.discard(name)  # some value of this feed was finite
                del arrays
                count += 1
                elapsed = time.perf_counter() - started
                advance(description=f"{label} {len(names)} tensors — {count / max(elapsed, 1e-9):.1f} samples/s")
            for i, feed in enumerate(check_feeds):
                if i not in checked:
                    checked[i] = runtime.run(feed, outputs=list(check_outputs))
    hopeless = [name for name in names if name in unseen and any(o.nonfinite for o in observers[name])]
    if hopeless:
        shown = ", ".join(repr(name) for name in hopeless[:3])
        shown += f" and {len(hopeless) - 3} more" if len(hopeless) > 3 else ""
        raise InputSpecError(
            f"{'tensor' if len(hopeless) == 1 else 'tensors'} {shown} saw no finite value in {count} calibration "
            "samples (only inf/NaN): no quantization range exists",
            fix="check the calibration data (inputs all ±inf?), or --exclude the node that reads it; "
            "nothing was written")
    return Collected(count, time.perf_counter() - started, [checked[i] for i in range(len(check_feeds))])


def collect_ranges(
    model: ir.Model,
    names: list[str],
    reader: CalibrationReader,
    *,
    method: Method = "percentile",
    samples: int | None = None,
    percentile: float = 99.999,
    symmetric: bool = False,
    runtime: Runtime | None = None,
    extra: Mapping[str, Sequence[Statistic]] | None = None,
    check_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    check_outputs: Sequence[str] = (),
) -> CalibrationResult:
    """Per-tensor (lo, hi) of ``names`` by ``method``, from :func:`collect`; ``extra`` statistics
    (e.g. the rows sensitivity is measured on) are fed in the same loop.
    ``symmetric``: the activations' quantizer is symmetric (int8) rather than u8 with a zero point."""
    observers = {name: make_observer(method, percentile=percentile, symmetric=symmetric) for name in names}
    statistics: dict[str, list[Statistic]] = {name: [observer] for name, observer in observers.items()}
    for name, more in (extra or {}).items():
        statistics.setdefault(name, []).extend(more)
    collected = collect(model, statistics, reader, samples=samples, runtime=runtime, check_feeds=check_feeds,
                        check_outputs=check_outputs, label=f"calibrating ({method})")
    ranges = {}
    nonfinite = {}
    for name, observer in observers.items():
        lo, hi = observer.range()
        ranges[name] = (float(lo), float(hi))
        if observer.nonfinite:
            nonfinite[name] = observer.nonfinite
    if nonfinite:
        log.warning("non-finite values skipped while calibrating %d tensors (%d values)",
                    len(nonfinite), sum(nonfinite.values()))
    return CalibrationResult(ranges, nonfinite, collected.samples, collected.seconds, collected.check_outputs)


@dataclass
class StatisticsCache:
    """Calibration statistics computed once and reused by later runs on the same float graph and data
    (``qcompile compile --target a,b,c``: one calibration pass for every target whose optimized
    graph is the same).

    Keyed by :func:`graph_fingerprint` and the calibration settings; holds per tensor the ranges
    (per method and symmetry) and the sensitivity row samples. A run reuses them only when every
    tensor it observes is held (a partial hit calibrates again: the loop costs the same either way).
    """

    entries: dict[tuple, dict] = field(default_factory=dict)

    def lookup(self, key: tuple, names: Sequence[str], rows: Sequence[str]) -> tuple[dict, dict] | None:
        """(ranges, row samples) for ``names`` and ``rows`` under ``key``, or None unless all are held."""
        entry = self.entries.get(key)
        if entry is None or not all(n in entry["ranges"] for n in names) or not all(r in entry["rows"] for r in rows):
            return None
        return {n: entry["ranges"][n] for n in names}, {r: entry["rows"][r] for r in rows}

    def store(self, key: tuple, ranges: Mapping[str, tuple[float, float]], rows: Mapping[str, Any],
              samples: int) -> None:
        entry = self.entries.setdefault(key, {"ranges": {}, "rows": {}, "samples": samples})
        entry["ranges"].update(ranges)
        entry["rows"].update(rows)

    def samples(self, key: tuple) -> int:
        return self.entries.get(key, {}).get("samples", 0)


def graph_fingerprint(model: ir.Model) -> str:
    """A digest of the main graph's structure (ops, attributes, value names) and of its constants (name,
    type, shape and 1,024 evenly spaced values each): equal digests, equal calibration statistics."""
    import hashlib

    digest = hashlib.sha256()
    for node in model.graph:
        inputs = [v.name if v is not None else "" for v in node.inputs]
        attributes = sorted((k, repr(a.value)) for k, a in node.attributes.items()
                            if not isinstance(a.value, (ir.Graph, ir.TensorProtocol)))
        digest.update(repr((node.domain, node.op_type, node.name, inputs, [v.name for v in node.outputs],
                            attributes)).encode())
    for name, value in sorted(model.graph.initializers.items()):
        tensor = value.const_value
        digest.update(repr((name, str(value.dtype), tuple(value.shape or ()))).encode())
        if tensor is not None and tensor.size:
            flat = tensor.numpy().reshape(-1)
            digest.update(np.ascontiguousarray(flat[:: max(1, flat.size // 1024)]).tobytes())
    return digest.hexdigest()


def _same_feed(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Whether two feeds hold the same arrays (names, shapes, dtypes and values)."""
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        x, y = np.asarray(x), np.asarray(b[name])
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
            return False
    return True
