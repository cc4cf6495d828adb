"""The CI gate: a candidate against its reference, on the target's runtime, as checks that pass or fail.

    metric   drop = Metric.drop(ref, cand) <= max_drop;  cand >= min;  cand <= max   (qcompile.evaluators)
    latency  median(cand) / median(ref) <= max_latency_ratio, the two timed interleaved on one feed

Every number used goes into :meth:`GateResult.to_json`; :func:`junit_xml` writes one test case per
check, so any CI system lists the gate as tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from qcompile.errors import InputSpecError
from qcompile.evaluators import Metric, ReferenceRun, Score


@dataclass(frozen=True)
class Thresholds:
    """What the user asked of the candidate (any combination; none: the gate only reports)."""

    max_drop: float | None = None
    minimum: float | None = None
    maximum: float | None = None
    max_latency_ratio: float | None = None

    def validate(self, metric: Metric) -> None:
        """A threshold the metric cannot take is a usage error (exit 2), found before any work."""
        if self.max_drop is not None and metric.name.partition(":")[0] == "sqnr":
            raise InputSpecError("sqnr has no relative drop (the reference's own SQNR is infinite)",
                                 where="--max-drop", fix="give --min DB instead")
        if self.max_drop is not None and self.max_drop < 0:
            raise InputSpecError(f"--max-drop {self.max_drop:g} is negative", fix="give a drop >= 0 (0.01 = 1 %)")
        if self.max_latency_ratio is not None and self.max_latency_ratio <= 0:
            raise InputSpecError(f"--max-latency-ratio {self.max_latency_ratio:g} is not positive",
                                 fix="give a ratio > 0 (1.0: not slower than the reference)")


@dataclass
class Check:
    """One verdict: ``value`` against ``limit``."""

    name: str
    value: float | None
    limit: str
    passed: bool
    detail: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "value": self.value, "limit": self.limit, "passed": self.passed,
                "detail": self.detail}


def metric_checks(score: Score, thresholds: Thresholds) -> list[Check]:
    """The metric's checks (module docstring); a NaN candidate fails every one."""
    checks, cand, name = [], score.candidate, score.metric.name
    if thresholds.max_drop is not None:
        drop = score.drop
        checks.append(Check(f"{name} drop", drop, f"<= {thresholds.max_drop:g}",
                            drop is not None and drop <= thresholds.max_drop,
                            f"reference {score.reference:.6g}, candidate {cand:.6g}"))
    if thresholds.minimum is not None:
        checks.append(Check(name, cand, f">= {thresholds.minimum:g}", cand >= thresholds.minimum,
                            f"reference {score.reference:.6g}"))
    if thresholds.maximum is not None:
        checks.append(Check(name, cand, f"<= {thresholds.maximum:g}", cand <= thresholds.maximum,
                            f"reference {score.reference:.6g}"))
    return checks


def latency_check(timing: dict, max_ratio: float) -> Check:
    """median(candidate) / median(reference) from :func:`qcompile.bench.bench_models`'s report."""
    ref, cand = timing["results"]
    ratio = cand["median_ms"] / ref["median_ms"] if ref["median_ms"] > 0 else math.inf
    return Check("latency ratio", ratio, f"<= {max_ratio:g}", ratio <= max_ratio,
                 f"reference {ref['median_ms']:.3f} ms, candidate {cand['median_ms']:.3f} ms (median of "
                 f"{cand['runs']} interleaved runs)")


@dataclass
class GateResult:
    reference: str
    candidate: str
    target: str
    score: Score
    checks: list[Check] = field(default_factory=list)
    timing: dict | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "target": self.target,
                "passed": self.passed, "score": self.score.to_json(), "checks": [c.to_json() for c in self.checks],
                "latency": self.timing, "seconds": round(self.seconds, 3)}

    def report_data(self, command: str) -> dict:
        """The gate as :func:`qcompile.report.write_report` data."""
        s = self.score
        return {
            "title": f"qcompile gate: {'PASS' if self.passed else 'FAIL'}",
            "command": command,
            "summary": [["verdict", "PASS" if self.passed else "FAIL"], ["reference", self.reference],
                        ["candidate", self.candidate], ["target", self.target], ["samples", s.samples]],
            "gate": {"metric": s.metric.name, "reference": s.reference, "candidate": s.candidate, "drop": s.drop,
                     "checks": [c.to_json() for c in self.checks], "passed": self.passed},
        }


def run_gate(reference: str | Path, candidate: str | Path, metric: Metric, feeds: list[dict],
             thresholds: Thresholds, target: str = "ort-cpu", runs: int = 20) -> GateResult:
    """Score ``candidate`` against ``reference`` on ``feeds`` and apply ``thresholds``."""
    started = time.perf_counter()
    score = ReferenceRun(metric, reference, feeds, target).score(candidate)
    checks = metric_checks(score, thresholds)
    timing = None
    if thresholds.max_latency_ratio is not None:
        from qcompile.bench import BenchSettings, bench_models

        timing = bench_models([reference, candidate], BenchSettings(target=target, runs=runs),
                              labels=["reference", "candidate"], feed=feeds[0] if feeds else None)
        checks.append(latency_check(timing, thresholds.max_latency_ratio))
    return GateResult(str(reference), str(candidate), target, score, checks, timing, time.perf_counter() - started)


def junit_xml(result: GateResult, suite: str = "qcompile gate") -> str:
    """JUnit XML: one test case per check (a failure element where it failed), numbers as properties."""
    root = ET.Element("testsuites")
    node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(result.checks)),
                         failures=str(len(result.failed)), errors="0", time=f"{result.seconds:.3f}")
    properties = ET.SubElement(node, "properties")
    for key, value in (("reference", result.reference), ("candidate", result.candidate), ("target", result.target),
                       ("metric", result.score.metric.name), ("reference_value", result.score.reference),
                       ("candidate_value", result.score.candidate), ("samples", result.score.samples)):
        ET.SubElement(properties, "property", name=key, value=str(value))
    for check in result.checks:
        case = ET.SubElement(node, "testcase", classname="qcompile.gate", name=f"{check.name} {check.limit}",
                             time="0")
        message = f"{check.name} = {check.value!s} (limit {check.limit}); {check.detail}"
        if check.passed:
            ET.SubElement(case, "system-out").text = message
        else:
            ET.SubElement(case, "failure", message=message, type="threshold").text = message
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
