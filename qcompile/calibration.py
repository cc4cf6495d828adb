"""Calibration data readers: anything with ORT's ``get_next()`` protocol, plus built-ins.

Built-ins, by the SPEC string the CLI takes:

    random              seeded random feeds from the input specs (speed only: warned)
    PATH.npz            one .npz, arrays named after the inputs, samples stacked on a new axis 0
    FOLDER/             a folder of .npz files, one feed each (sorted by name)
    module:callable     a function returning a reader or an iterable of feeds
    zoo:NAME            the zoo entry's reader over its real data (its calibration data; for gates and
                        accuracy budgets its held-out data, apart from calibration and evaluation)

A user's ``onnxruntime.quantization.CalibrationDataReader`` works unchanged. Every feed is validated
against the model's inputs. An empty reader, a feed with NaN in an input (NaN is no value: it would
poison every range and statistic downstream), and a user's reader that raises are errors of the
user's input (exit 2), naming the reader and the sample. ±inf is allowed in inputs (additive masks):
observers skip non-finite values, and a tensor that never sees a finite one is refused by
:func:`qcompile.calibrate.collect_ranges`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import numpy as np

from qcompile import decoder, specs
from qcompile.errors import InputSpecError, QCompileError, UnknownNameError
from qcompile.feeds import load_npz_feeds

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


class CalibrationReader(Protocol):
    """ORT's protocol: ``get_next()`` returns a feed dict, or None when exhausted."""

    def get_next(self) -> Mapping[str, np.ndarray] | None: ...


class IterableReader:
    """Adapts any iterable of feeds to ``get_next()``.

    ``name`` says where the feeds come from in messages; ``user_code``: whether iterating runs the
    user's code (an exception from it is then the user's error, exit 2, not a qcompile bug)."""

    name = "the calibration reader"
    user_code = True

    def __init__(self, feeds, name: str | None = None, *, user_code: bool = True) -> None:
        self._it = iter(feeds)
        if name is not None:
            self.name = name
        self.user_code = user_code

    def get_next(self) -> Feed | None:
        return next(self._it, None)

    def __iter__(self) -> Iterator[Feed]:
        while (feed := self.get_next()) is not None:
            yield feed


class FirstFeeds(IterableReader):
    """``reader``'s feeds as they are read, the first ``keep`` of them also kept in ``kept`` (for a
    later stage: a reader can be read once)."""

    def __init__(self, reader: CalibrationReader, keep: int) -> None:
        super().__init__(iter(reader.get_next, None), describe(reader), user_code=_is_user_code(reader))
        self.keep, self.kept = keep, []

    def get_next(self) -> Feed | None:
        feed = super().get_next()
        if feed is not None and len(self.kept) < self.keep:
            self.kept.append(feed)
        return feed


class HeldOutSplit(IterableReader):
    """``reader``'s feeds with every ``every``-th one (the 4th, 8th, ...) set aside in ``heldout``
    (at most ``limit``) instead of passed on: data apart from calibration, for an accuracy budget.

    The first ``every * minimum`` feeds are read before any is passed on: a reader that ends
    sooner is passed on whole (nothing held out; ``split`` False), so a small calibration set is
    never thinned for a budget too small to measure. Its name says so: statistics computed on it
    (qcompile.calibrate.StatisticsCache, keyed by the reader's name) are not those of the whole."""

    def __init__(self, reader: CalibrationReader, *, every: int, minimum: int, limit: int) -> None:
        super().__init__((), f"{describe(reader)} (every {every}th held out)", user_code=_is_user_code(reader))
        self.reader, self.every, self.minimum, self.limit = reader, every, minimum, limit
        self.heldout: list = []
        self.split: bool | None = None  # decided on the first read
        self._buffer: list = []
        self._read = 0

    def get_next(self) -> Feed | None:
        if self.split is None:
            while len(self._buffer) < self.every * self.minimum:
                feed = _next_feed(self.reader, len(self._buffer))
                if feed is None:
                    break
                self._buffer.append(feed)
            self.split = len(self._buffer) >= self.every * self.minimum
        while True:
            feed = self._buffer.pop(0) if self._buffer else _next_feed(self.reader, self._read)
            if feed is None:
                return None
            self._read += 1
            if self.split and self._read % self.every == 0 and len(self.heldout) < self.limit:
                self.heldout.append(feed)
                continue
            return feed


def describe(reader: CalibrationReader) -> str:
    """The reader as messages name it: its CLI spec, or its class."""
    name = getattr(reader, "name", None)
    if isinstance(name, str) and name:
        return name
    cls = type(reader)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_user_code(reader: CalibrationReader) -> bool:
    flag = getattr(reader, "user_code", None)
    if isinstance(flag, bool):
        return flag
    return not type(reader).__module__.startswith("qcompile.")  # the zoo's readers are qcompile's own


def _next_feed(reader: CalibrationReader, index: int) -> Mapping[str, np.ndarray] | None:
    try:
        return reader.get_next()
    except QCompileError:
        raise
    except Exception as exc:
        if not _is_user_code(reader):
            raise  # qcompile's own reader failing is a qcompile bug
        message = " ".join(str(exc).split())[:200]
        raise InputSpecError(
            f"calibration reader {describe(reader)} raised {type(exc).__name__}{': ' + message if message else ''} "
            f"at sample {index}", fix="fix the reader (it is your code); nothing was written") from None


def _check_finite_inputs(feed: Feed, where: str) -> None:
    for name, array in feed.items():
        if array.dtype.kind in "fc" and array.size and np.isnan(array).any():
            bad = int(np.count_nonzero(np.isnan(array)))
            raise InputSpecError(
                f"input {name!r} in {where} holds NaN ({bad:,} of {array.size:,} values)",
                fix="fix the data: NaN is no value and would poison every calibration range; nothing was written")


def iter_feeds(
    reader: CalibrationReader, input_specs: list[specs.InputSpec], limit: int | None = None
) -> Iterator[Feed]:
    """Validated feeds from ``reader`` (at most ``limit``); raises if it yields none at all, if a
    feed holds NaN, and (as the user's error) if a user's reader raises."""
    count = 0
    while limit is None or count < limit:
        feed = _next_feed(reader, count)
        if feed is None:
            break
        where = f"calibration sample {count} of {describe(reader)}"
        if not isinstance(feed, Mapping):
            raise InputSpecError(f"{where} is a {type(feed).__name__}, not a dict of input name -> array",
                                 fix="make the reader yield {input_name: numpy array} dicts")
        feed = decoder.complete(input_specs, {name: np.asarray(value) for name, value in feed.items()})
        specs.validate_feed(input_specs, feed, where=where)
        _check_finite_inputs(feed, where)
        count += 1
        yield feed
    if count == 0:
        raise InputSpecError(
            f"calibration reader {describe(reader)} produced no samples",
            fix="give it data (check the path, folder or callable) or use --calib random for speed-only runs",
        )


class RandomReader(IterableReader):
    """Seeded random feeds. Symbolic dims are sized as given, else — once :meth:`fit` has seen a feed the
    model runs on (the pipeline's verification feed) — like that feed."""

    name = "random"
    user_code = False

    def __init__(self, input_specs: list[specs.InputSpec], samples: int, seed: int = 0, **shape) -> None:
        self.input_specs, self.samples, self.seed, self.shape = input_specs, samples, seed, shape
        self.user_sized = any(shape.get(key) for key in ("dims", "batch", "seq"))
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._it = None

    def fit(self, feed: Mapping[str, np.ndarray]) -> None:
        if not self.user_sized and self._it is None:
            self._shapes = {name: tuple(np.shape(array)) for name, array in feed.items()}

    def get_next(self) -> Feed | None:
        if self._it is None:
            self._it = iter([specs.random_feed(self.input_specs, seed=self.seed + i, shapes=self._shapes, **self.shape)
                             for i in range(self.samples)])
        return next(self._it, None)


def fit_reader(reader: CalibrationReader | None, feeds: list[Feed]) -> None:
    """Size a random reader's feeds like the verification feeds (which the model is known to run on)."""
    if isinstance(reader, RandomReader) and feeds:
        reader.fit(feeds[0])


def random_reader(input_specs: list[specs.InputSpec], samples: int, seed: int = 0, **shape) -> RandomReader:
    log.warning("calibrating on random data: ranges are meaningless for accuracy; use it for speed only")
    return RandomReader(input_specs, samples, seed, **shape)


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

    return IterableReader(feeds(), str(folder), user_code=False)


class _UserReader:
    """A user's ``get_next()`` reader, named after the CLI spec that made it."""

    user_code = True

    def __init__(self, reader: CalibrationReader, name: str) -> None:
        self.reader, self.name = reader, name

    def get_next(self) -> Mapping[str, np.ndarray] | None:
        return self.reader.get_next()


def callable_reader(spec: str) -> CalibrationReader:
    """The reader a user's ``module:callable`` returns. Everything that runs the user's code
    (importing, calling, iterating) fails as the user's error, naming the spec."""
    module_name, _, attr = spec.partition(":")
    fix = "name it as module:function, importable from the current folder"
    try:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise InputSpecError(f"cannot import calibration callable {spec!r}: {exc}", fix=fix) from None
    except Exception as exc:  # the user's module raised while being imported
        raise InputSpecError(f"importing calibration callable {spec!r} raised {type(exc).__name__}: {exc}",
                             fix="fix the module (it is your code)") from None
    if not callable(factory):
        raise InputSpecError(f"calibration callable {spec!r} is {type(factory).__name__!r}, not a function", fix=fix)
    try:
        made: Any = factory()
    except QCompileError:
        raise
    except Exception as exc:
        raise InputSpecError(f"calibration callable {spec!r} raised {type(exc).__name__}: {exc}",
                             fix="fix the callable (it is your code); nothing was written") from None
    if hasattr(made, "get_next"):
        return _UserReader(made, spec)
    try:
        return IterableReader(made, spec)
    except TypeError:
        raise InputSpecError(f"calibration callable {spec!r} returned {type(made).__name__!r}, which is neither a "
                             "reader (get_next()) nor an iterable of feeds",
                             fix="return a list or generator of {input_name: array} dicts") from None
    except Exception as exc:  # iter() ran the user's __iter__
        raise InputSpecError(f"iterating what {spec!r} returned raised {type(exc).__name__}: {exc}",
                             fix="fix the callable (it is your code)") from None


def resolve_reader(spec: str, input_specs: list[specs.InputSpec], samples: int, *, heldout: bool = False,
                   **shape) -> CalibrationReader:
    """A reader for a CLI SPEC string (see the module docstring); ``heldout``: ``zoo:NAME`` reads the
    entry's held-out data (apart from its calibration and evaluation data) instead of calibration's."""
    if spec == "random":
        return random_reader(input_specs, samples, **shape)
    if spec.startswith("zoo:"):
        from qcompile.models import get_entry

        try:
            entry = get_entry(spec[4:])
        except KeyError as exc:
            raise UnknownNameError(str(exc.args[0]), fix="see `qcompile zoo list`") from None
        if not heldout:
            return entry.calibration(samples)
        if entry.heldout is None:
            raise InputSpecError(f"zoo entry {entry.name!r} has no held-out data", where=spec,
                                 fix="give your own data (.npz, folder or module:callable)")
        return entry.heldout(samples)
    path = Path(spec)
    if path.is_dir():
        return npz_folder_reader(path, input_specs)
    if path.suffix == ".npz" or path.exists():
        return IterableReader(load_npz_feeds(path, input_specs), str(path), user_code=False)
    if ":" in spec:
        return callable_reader(spec)
    raise InputSpecError(f"calibration spec {spec!r} is not a file, folder, module:callable, zoo:NAME or 'random'",
                         fix="see `qcompile quantize --help`")
