"""Streaming calibration: one pass over the data, observing only the tensors that will be quantized.

The model is copied with those tensors added as outputs, run on ONNX Runtime CPU feed by feed, and
each requested output is handed to its observer and dropped: memory does not grow with the number
of samples, and no other intermediate tensor is ever materialised.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompile import execute, memory, modelio, specs
from qcompile.calibration import CalibrationReader, iter_feeds
from qcompile.errors import InputSpecError, InternalError
from qcompile.quant.observers import Method, make_observer
from qcompile.progress import bar
from qcompile.runtimes import Runtime, RuntimeOptions

log = logging.getLogger(__name__)


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
def tapped(model: ir.Model, names: list[str], target: str = "ort-cpu", *,
           keep_outputs: bool = False) -> Iterator[Runtime]:
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
                runtime = stack.enter_context(execute.loaded(model, target, _tap_options(model)))
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


def collect_ranges(
    model: ir.Model,
    names: list[str],
    reader: CalibrationReader,
    *,
    method: Method = "percentile",
    samples: int | None = None,
    percentile: float = 99.999,
    symmetric: bool = False,
    target: str = "ort-cpu",
    runtime: Runtime | None = None,
    on_outputs: Callable[[Mapping[str, np.ndarray]], None] | None = None,
    check_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    check_outputs: Sequence[str] = (),
) -> CalibrationResult:
    """Observe ``names`` over the reader's feeds; returns per-tensor (lo, hi).

    ``runtime``: an open :func:`tapped` runtime exposing ``names`` (else one is opened here).
    ``on_outputs`` sees each feed's observed tensors too (e.g. to keep a sample of them).
    ``symmetric``: the activations' quantizer is symmetric (int8) rather than u8 with a zero point.
    ``check_feeds``: feeds on which the model's own outputs ``check_outputs`` are wanted too (the
    runtime then keeps them: :func:`tapped` with ``keep_outputs``), returned in the result's
    ``check_outputs``, in order. A calibration feed equal to one of them computes both in one run;
    the others run once more after the last calibration feed.
    """
    input_specs = specs.input_specs(model)
    observers = {name: make_observer(method, percentile=percentile, symmetric=symmetric) for name in names}
    unseen = set(names)  # tensors that have not yet shown a finite value
    started = time.perf_counter()
    count = 0
    checked: dict[int, dict[str, np.ndarray]] = {}
    both = list(dict.fromkeys([*names, *check_outputs]))
    with contextlib.ExitStack() as stack:
        if runtime is None:
            runtime = stack.enter_context(tapped(model, names, target, keep_outputs=bool(check_feeds)))
        with bar(f"calibrating {len(names)} tensors ({method})", total=samples) as advance:
            for feed in iter_feeds(reader, input_specs, samples):
                match = next((i for i, f in enumerate(check_feeds) if i not in checked and _same_feed(feed, f)), None)
                arrays = runtime.run(feed, outputs=names if match is None else both)
                if match is not None:
                    checked[match] = {name: arrays[name] for name in check_outputs}
                for name in names:
                    observer, array = observers[name], arrays[name]
                    skipped = observer.nonfinite
                    observer.update(array)
                    if name in unseen and observer.nonfinite - skipped < np.size(array):
                        unseen.discard(name)  # some value of this feed was finite
                if on_outputs is not None:
                    on_outputs(arrays)
                del arrays
                count += 1
                elapsed = time.perf_counter() - started
                advance(description=f"calibrating {len(names)} tensors ({method}) — {count / max(elapsed, 1e-9):.1f} samples/s")
            for i, feed in enumerate(check_feeds):
                if i not in checked:
                    checked[i] = runtime.run(feed, outputs=list(check_outputs))
    seconds = time.perf_counter() - started
    hopeless = [name for name in names if name in unseen and observers[name].nonfinite]
    if hopeless:
        shown = ", ".join(repr(name) for name in hopeless[:3]) + (f" and {len(hopeless) - 3} more" if len(hopeless) > 3 else "")
        raise InputSpecError(
            f"{'tensor' if len(hopeless) == 1 else 'tensors'} {shown} saw no finite value in {count} calibration samples (only inf/NaN): "
            "no quantization range exists", fix="check the calibration data (inputs all ±inf?), or --exclude the node that reads it; "
            "nothing was written")
    ranges = {}
    nonfinite = {}
    for name, observer in observers.items():
        lo, hi = observer.range()
        ranges[name] = (float(lo), float(hi))
        if observer.nonfinite:
            nonfinite[name] = observer.nonfinite
    if nonfinite:
        log.warning("non-finite values skipped while calibrating %d tensors (%d values)", len(nonfinite), sum(nonfinite.values()))
    return CalibrationResult(ranges, nonfinite, count, seconds, [checked[i] for i in range(len(check_feeds))])


def _same_feed(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Whether two feeds hold the same arrays (names, shapes, dtypes and values)."""
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        x, y = np.asarray(x), np.asarray(b[name])
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
            return False
    return True
