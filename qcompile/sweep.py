"""A recipe x target sweep: every pair quantized (one calibration per graph and data, shared), then
every candidate evaluated through an executor (qcompile/executor.py): the end metric on held-out data
against the float model and the latency on the check runtime; the Pareto front of the two picks.

Candidates for targets whose runtime is not here are written, not evaluated (their figures come
from `qcompile gate --target` on their hardware).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qcompile import modelio
from qcompile.evaluators import Metric, ReferenceRun, evaluate_task


@dataclass
class SweepRow:
    recipe: str
    target: str
    path: str
    value: float | None = None
    drop: float | None = None
    latency_ms: float | None = None
    note: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Sweep:
    metric: Metric
    reference_value: float | None
    rows: list[SweepRow] = field(default_factory=list)
    reference_latency_ms: float | None = None

    def to_json(self) -> dict:
        return {"metric": self.metric.to_json(), "reference": self.reference_value,
                "reference_latency_ms": self.reference_latency_ms, "rows": [r.to_json() for r in self.rows]}

    def report_data(self) -> dict:
        rows = [r for r in self.rows if r.value is not None]
        return {"metric_name": self.metric.name, "higher_is_better": self.metric.higher_is_better,
                "candidates": [{"name": "fp32", "latency_ms": self.reference_latency_ms,
                                "metric": self.reference_value, "within_budget": None, "chosen": False}]
                + [{"name": f"{r.recipe} @ {r.target}", "latency_ms": r.latency_ms, "metric": r.value,
                    "within_budget": None, "chosen": False} for r in rows]}


def run_sweep(model_path: str | Path, recipes: list[str], target_names: list[str], reader_factory, out_dir: Path,
              metric: Metric, feeds: list[dict], executor=None, timing_runs: int = 10, verify_options=None) -> Sweep:
    """Quantize ``model_path`` with each recipe for each target into ``out_dir`` (``reader_factory()``:
    a fresh calibration reader per run), then evaluate them (module docstring)."""
    from qcompile import targets
    from qcompile.calibrate import StatisticsCache
    from qcompile.executor import InProcess
    from qcompile.pipeline import quantize
    from qcompile.runtimes import get_runtime

    executor = executor or InProcess()
    rows: list[SweepRow] = []
    for recipe in recipes:
        cache = StatisticsCache()
        for name in target_names:
            path = out_dir / f"{Path(model_path).stem}.{recipe}.{name}.onnx"
            result = quantize(str(model_path), reader_factory(), recipe=recipe, target=name, statistics=cache,
                              verify_options=verify_options)
            modelio.save(result.model, path)
            rows.append(SweepRow(recipe, name, str(path)))
    reference = ReferenceRun(metric, model_path, feeds)
    runnable = [r for r in rows if get_runtime(targets.get(r.target).runtime).available()]
    for row in rows:
        if row not in runnable:
            row.note = f"not evaluated: {targets.get(row.target).runtime} is not available here"
    items = [(str(model_path), timing_runs)] + [(r.path, timing_runs) for r in runnable]
    evaluations = executor.map(evaluate_task, items, shared=reference)
    sweep = Sweep(metric, reference.value, rows, evaluations[0]["latency_ms"])
    for row, evaluation in zip(runnable, evaluations[1:]):
        row.value, row.drop = evaluation["score"]["candidate"], evaluation["score"]["drop"]
        row.latency_ms = evaluation["latency_ms"]
    return sweep
