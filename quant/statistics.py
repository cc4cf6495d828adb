"""Statistics the one calibration loop feeds (qcompile.calibrate.collect): each sees every
calibration batch of one tensor through ``update(x)`` and keeps a bounded state, whatever the
number of samples. Rows are the tensor seen as [rows, channels] (its last axis), without the rows
that hold a NaN or an inf (``finite_rows``).

    observers (qcompile.quant.observers)   ranges: minmax, percentile, entropy, mse
    AbsMax              max |X| over the finite values                        (FP16 range checks)
    ChannelAbsMax       max_j |X_j| per channel                               (SmoothQuant)
    ChannelMoments      E|X_j| and E[X_j^2] per channel                       (AWQ scales and clipping)
    Hessian             H = sum X^T X                                         (GPTQ)
    RowSample           rows of the first ``feeds`` batches (evenly spaced, at most ``rows_per_feed``
                        each): the data on which alphas are searched and SQNR measured
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcompile.quant.observers import MinMaxObserver, finite_rows


@dataclass
class AbsMax:
    """max |x| over every finite value seen (0 before any), and how many values were not finite."""

    value: float = 0.0
    nonfinite: int = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0 or x.dtype.kind != "f":
            return
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x = x[finite]
            if x.size == 0:
                return
        self.value = max(self.value, float(x.max()), -float(x.min()))


@dataclass
class ChannelAbsMax:
    """max |X_j| over the last axis's channels (non-finite values skipped)."""

    observer: MinMaxObserver = field(default_factory=lambda: MinMaxObserver(axis=-1))

    def update(self, x: np.ndarray) -> None:
        self.observer.update(x)

    def absmax(self) -> np.ndarray:
        lo, hi = self.observer.range()
        return np.maximum(np.abs(lo), np.abs(hi))


@dataclass
class ChannelMoments:
    """sum |x_j| and sum x_j^2 over finite rows, in float64, and the row count."""

    abs_sum: np.ndarray | float = 0.0
    square_sum: np.ndarray | float = 0.0
    count: int = 0

    def update(self, x: np.ndarray) -> None:
        rows = finite_rows(x).astype(np.float64)
        self.abs_sum = self.abs_sum + np.abs(rows).sum(axis=0)
        self.square_sum = self.square_sum + np.square(rows).sum(axis=0)
        self.count += len(rows)

    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / self.count

    def mean_square(self) -> np.ndarray:
        return self.square_sum / self.count


@dataclass
class Hessian:
    """H = sum over finite rows of x^T x (float32, as the layer computes)."""

    h: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        rows = finite_rows(x).astype(np.float32)
        h = rows.T @ rows
        self.h = h if self.h is None else self.h + h


@dataclass
class RowSample:
    """The finite rows of the first ``feeds`` batches; with ``rows_per_feed``, at most that many
    evenly spaced rows of each (as float32 copies)."""

    feeds: int
    rows_per_feed: int | None = None
    parts: list[np.ndarray] = field(default_factory=list)
    seen: int = 0

    def update(self, x: np.ndarray) -> None:
        if self.seen >= self.feeds:
            return
        self.seen += 1
        rows = finite_rows(x)
        if self.rows_per_feed is not None:
            rows = even_rows(rows, self.rows_per_feed).astype(np.float32)
        self.parts.append(rows)

    def rows(self) -> np.ndarray:
        """The kept rows, joined once (the parts are freed)."""
        if len(self.parts) > 1:
            self.parts = [np.concatenate(self.parts)]
        return self.parts[0]


def even_rows(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced rows of ``rows``."""
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]
    return rows
