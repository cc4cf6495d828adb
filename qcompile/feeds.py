"""Feeds from files: an .npz whose arrays are named after the model's inputs.

An array whose rank is the input's rank holds one sample; one rank higher holds samples stacked
on a new leading axis. Every feed is validated against the model's inputs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from qcompile.errors import InputSpecError
from qcompile.specs import InputSpec, validate_feed


def load_npz_feeds(path: str | Path, input_specs: list[InputSpec], limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds from one .npz (samples stacked or single)."""
    path = Path(path)
    if not path.is_file():
        raise InputSpecError("data file not found", where=str(path), fix="pass an existing .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputSpecError(f"cannot read .npz: {exc}", where=str(path), fix="write it with numpy.savez") from None
    by_name = {s.name: s for s in input_specs}
    stacked = None
    for name, array in arrays.items():
        spec = by_name.get(name)
        if spec is None:
            raise InputSpecError(f"array {name!r} is not a model input", where=str(path),
                                 fix=f"name arrays after the inputs: {sorted(by_name)}")
        is_stacked = array.ndim == len(spec.shape) + 1
        if stacked is None:
            stacked = is_stacked
        elif stacked != is_stacked:
            raise InputSpecError("some arrays are stacked samples and some are single samples", where=str(path),
                                 fix="stack every input on a new leading axis, or none")
    if stacked:
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise InputSpecError("stacked arrays have different sample counts", where=str(path),
                                 fix="give every input the same number of samples")
        n = counts.pop()
        feeds = [{name: a[i] for name, a in arrays.items()} for i in range(n)]
    else:
        feeds = [arrays]
    if limit is not None:
        feeds = feeds[:limit]
    for i, feed in enumerate(feeds):
        validate_feed(input_specs, feed, where=f"sample {i} of {path}")
    return feeds
