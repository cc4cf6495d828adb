"""Comparison metrics between a reference and a candidate output.

- max_abs:   max |a - b|
- rel_l2:    ||a - b||_2 / ||a||_2          (0 when both are zero)
- cosine:    <a, b> / (||a|| ||b||)          (flattened)
- sqnr_db:   10 log10(||a||^2 / ||a - b||^2) (inf when identical)
- top1:      fraction of positions whose argmax over the last axis agrees (last axis > 1 only)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np


def _flatten_sequence(value) -> np.ndarray | None:
    """A sequence output as one flat array: tensors raveled and joined, maps as their values by key."""
    if not isinstance(value, (list, tuple)):
        return None
    parts = []
    for item in value:
        if isinstance(item, dict):
            parts.append(np.asarray([item[k] for k in sorted(item)], dtype=np.float64))
        else:
            parts.append(np.asarray(item).ravel())
    if not parts:
        return np.zeros(0)
    try:
        return np.concatenate(parts)
    except ValueError:  # mixed dtypes that do not join
        return None


@dataclass
class OutputComparison:
    """Metrics for one output, accumulated over any number of samples."""

    name: str
    samples: int = 0
    max_abs: float = 0.0
    _err_sq: float = 0.0
    _ref_sq: float = 0.0
    _cand_sq: float = 0.0
    _dot: float = 0.0
    _top1_hits: int = 0
    _top1_total: int = 0
    shape_mismatch: str | None = None
    nonfinite_mismatch: int = 0
    dtype: str | None = None  # the reference's element type (its resolution bounds any comparison)

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        """Accumulate one sample (a tensor, or a sequence of tensors or of maps, compared element-wise)."""
        self.samples += 1
        if isinstance(ref, (list, tuple)) or isinstance(cand, (list, tuple)):
            ref, cand = _flatten_sequence(ref), _flatten_sequence(cand)
            if ref is None or cand is None:
                self.shape_mismatch = "a sequence against a non-sequence, or of different lengths or keys"
                return
        ref = np.asarray(ref)
        cand = np.asarray(cand)
        self.dtype = str(ref.dtype)
        if ref.shape != cand.shape:
            self.shape_mismatch = f"{ref.shape} vs {cand.shape}"
            return
        if not np.issubdtype(ref.dtype, np.number) and ref.dtype != np.bool_:
            equal = bool(np.array_equal(ref, cand))
            self._err_sq += 0.0 if equal else 1.0
            self._ref_sq += 1.0
            self.max_abs = max(self.max_abs, 0.0 if equal else math.inf)
            return
        a = ref.astype(np.float64).ravel()
        b = cand.astype(np.float64).ravel()
        finite = np.isfinite(a) & np.isfinite(b)
        same_nonfinite = (~np.isfinite(a)) & (~np.isfinite(b)) & ((a == b) | (np.isnan(a) & np.isnan(b)))
        self.nonfinite_mismatch += int(np.count_nonzero(~finite & ~same_nonfinite))
        a, b = a[finite], b[finite]
        diff = a - b
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self._err_sq += float(diff @ diff)
        self._ref_sq += float(a @ a)
        self._cand_sq += float(b @ b)
        self._dot += float(a @ b)
        if ref.ndim >= 1 and ref.shape[-1] > 1 and np.issubdtype(ref.dtype, np.floating):
            hits = np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)
            self._top1_hits += int(np.count_nonzero(hits))
            self._top1_total += int(hits.size)

    @property
    def rel_l2(self) -> float:
        if self.shape_mismatch or self.nonfinite_mismatch:
            return math.inf
        if self._ref_sq == 0.0:
            return 0.0 if self._err_sq == 0.0 else math.inf
        return math.sqrt(self._err_sq / self._ref_sq)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self._ref_sq * self._cand_sq)
        if denom == 0.0:
            return 1.0 if self._err_sq == 0.0 else 0.0
        return self._dot / denom

    @property
    def sqnr_db(self) -> float:
        if self.shape_mismatch:
            return -math.inf
        if self._err_sq == 0.0:
            return math.inf
        if self._ref_sq == 0.0:
            return -math.inf
        return 10.0 * math.log10(self._ref_sq / self._err_sq)

    @property
    def top1(self) -> float | None:
        return self._top1_hits / self._top1_total if self._top1_total else None

    def to_json(self) -> dict:
        def clean(x):
            if x is None or isinstance(x, str):
                return x
            return x if math.isfinite(x) else str(x)

        return {
            "name": self.name,
            "samples": self.samples,
            "max_abs": clean(self.max_abs),
            "rel_l2": clean(self.rel_l2),
            "cosine": clean(self.cosine),
            "sqnr_db": clean(self.sqnr_db),
            "top1": clean(self.top1),
            "shape_mismatch": self.shape_mismatch,
            "nonfinite_mismatch": self.nonfinite_mismatch,
        }


@dataclass
class Comparison:
    """Per-output comparisons of two models on the same feeds."""

    outputs: dict[str, OutputComparison] = field(default_factory=dict)

    def add(self, ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray]) -> None:
        for name, value in ref.items():
            if name not in cand:
                self.outputs.setdefault(name, OutputComparison(name)).shape_mismatch = "missing in candidate"
                continue
            self.outputs.setdefault(name, OutputComparison(name)).add(value, cand[name])

    def worst(self) -> OutputComparison:
        """The output with the largest relative L2 error."""
        return max(self.outputs.values(), key=lambda o: (o.rel_l2, o.max_abs))

    def within(self, rel_l2: float) -> bool:
        return all(o.rel_l2 <= rel_l2 for o in self.outputs.values())

    def to_json(self) -> dict:
        return {name: o.to_json() for name, o in self.outputs.items()}


def compare_outputs(pairs: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]) -> Comparison:
    """Compare (reference, candidate) output dicts over many samples."""
    result = Comparison()
    for ref, cand in pairs:
        result.add(ref, cand)
    return result
