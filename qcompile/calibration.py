"""Calibration data readers: anything with ORT's ``get_next()`` protocol, plus built-ins.

Built-ins, by the SPEC string the CLI takes:

    random              seeded random feeds from the input specs (speed only: warned)
    PATH.npz            one .npz, arrays named after the inputs, samples stacked on a new axis 0
    FOLDER/             a folder of .npz files, one feed each (sorted by name)
    module:callable     a function returning a reader or an iterable of feeds
    zoo:NAME            the zoo entry's reader over its real data

A user's ``onnxruntime.quantization.CalibrationDataReader`` works unchanged. Every feed is validated
against the model's inputs; an empty reader is an error.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import numpy as np

from qcompile import specs
from qcompile.errors import InputSpecError, UnknownNameError
from qcompile.feeds import load_npz_feeds

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


class CalibrationReader(Protocol):
    """ORT's protocol: ``get_next()`` returns a feed dict, or None when exhausted."""

    def get_next(self) -> Mapping[str, np.ndarray] | None: ...


class IterableReader:
    """Adapts any iterable of feeds to ``get_next()``."""

    def __init__(self, feeds) -> None:
        self._it = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._it, None)


def iter_feeds(
    reader: CalibrationReader, input_specs: list[specs.InputSpec], limit: int | None = None
) -> Iterator[Feed]:
    """Validated feeds from ``reader`` (at most ``limit``); raises if it yields none at all."""
    count = 0
    while limit is None or count < limit:
        feed = reader.get_next()
        if feed is None:
            break
        feed = {name: np.asarray(value) for name, value in feed.items()}
        specs.validate_feed(input_specs, feed, where=f"calibration sample {count}")
        count += 1
        yield feed
    if count == 0:
        raise InputSpecError(
            "the calibration reader produced no samples",
            fix="give it data (check the path, folder or callable) or use --calib random for speed-only runs",
        )


def random_reader(input_specs: list[specs.InputSpec], samples: int, seed: int = 0, **shape) -> IterableReader:
    log.warning("calibrating on random data: ranges are meaningless for accuracy; use it for speed only")
    return IterableReader(specs.random_feed(input_specs, seed=seed + i, **shape) for i in range(samples))


def npz_folder_reader(folder: Path, input_specs: list[specs.InputSpec]) -> IterableReader:
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise InputSpecError("no .npz files in the calibration folder", where=str(folder),
                             fix="put one .npz per sample there, arrays named after the inputs")

    def feeds():
        for path in files:
            loaded = load_npz_feeds(path, input_specs)
            if len(loaded) != 1:
                raise InputSpecError("a folder .npz must hold one sample", where=str(path),
                                     fix="do not stack samples in folder files")
            yield loaded[0]

    return IterableReader(feeds())


def callable_reader(spec: str) -> CalibrationReader:
    module_name, _, attr = spec.partition(":")
    try:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise InputSpecError(f"cannot import calibration callable {spec!r}: {exc}",
                             fix="name it as module:function, importable from the current folder") from None
    made: Any = factory()
    return made if hasattr(made, "get_next") else IterableReader(made)


def resolve_reader(spec: str, input_specs: list[specs.InputSpec], samples: int, **shape) -> CalibrationReader:
    """A reader for a CLI SPEC string (see the module docstring)."""
    if spec == "random":
        return random_reader(input_specs, samples, **shape)
    if spec.startswith("zoo:"):
        from qcompile.models import get_entry

        try:
            return get_entry(spec[4:]).calibration(samples)
        except KeyError as exc:
            raise UnknownNameError(str(exc.args[0]), fix="see `qcompile zoo list`") from None
    path = Path(spec)
    if path.is_dir():
        return npz_folder_reader(path, input_specs)
    if path.suffix == ".npz" or path.exists():
        return IterableReader(load_npz_feeds(path, input_specs))
    if ":" in spec:
        return callable_reader(spec)
    raise InputSpecError(f"calibration spec {spec!r} is not a file, folder, module:callable, zoo:NAME or 'random'",
                         fix="see `qcompile quantize --help`")
