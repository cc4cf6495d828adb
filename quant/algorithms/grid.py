"""Grid search: the candidate with the least error, the first one on ties (grid order is preference)."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def argmin(grid: Iterable[T], error: Callable[[T], float]) -> T:
    """min over ``grid`` of ``error`` — each candidate scored once."""
    errors = {candidate: error(candidate) for candidate in grid}
    return min(errors, key=errors.get)
