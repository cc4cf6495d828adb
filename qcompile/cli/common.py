"""What every command shares: error handling and exit codes, output, model and option parsing.

Exit codes: 0 success; 1 a check the user asked for failed; 2 the user's input or usage is wrong;
3 qcompile itself is wrong (a bug: the pass or phase is named). One line on stderr, no traceback
unless ``--debug`` (or QCOMPILE_DEBUG=1).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import click
from rich.console import Console

from qcompile import interrupts, modelio, specs
from qcompile.errors import QCompileError, UnknownNameError
from qcompile.progress import bar, stderr

__all__ = ["stdout", "stderr", "emit_json", "debugging", "fail", "handle_errors", "check_output_path",
           "output_temp_dir", "commit_saved", "resolve_model", "shape_options", "with_shape_options", "data_feeds",
           "data_option", "calibration_samples"]

stdout = Console(soft_wrap=True)


def _json_default(obj):
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def emit_json(data) -> None:
    """Machine-readable result on stdout (strict JSON: non-finite floats become strings)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    click.echo(json.dumps(clean(data), indent=2, default=_json_default, allow_nan=False))


def debugging() -> bool:
    return os.environ.get("QCOMPILE_DEBUG", "") not in ("", "0")


def fail(exc: QCompileError) -> None:
    click.echo(f"error: {exc.line()}", err=True)
    sys.exit(exc.exit_code)


def handle_errors(fn):
    """Turn every failure into one line on stderr and the exit code of whose fault it is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from qcompile.runtimes import BackendError

        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (interrupts.Terminated): temp files are gone
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(interrupts.exit_code(exc))
        except MemoryError:
            click.echo("error: out of memory — try a smaller batch or sequence length; nothing was written", err=True)
            sys.exit(2)
        except Exception as exc:
            if debugging():
                import traceback

                traceback.print_exc()
            if isinstance(exc, QCompileError):
                fail(exc)
            if isinstance(exc, BackendError):  # a runtime refusing what the user asked it to run
                click.echo(f"error: {' '.join(str(exc).split())}", err=True)
                sys.exit(2)
            message = " ".join(str(exc).split())[:300]
            click.echo(f"error: internal error in qcompile: {type(exc).__name__}: {message} — this is a qcompile "
                       "bug: please report it with the model (rerun with --debug for the traceback); the input is "
                       "untouched and nothing was written", err=True)
            sys.exit(3)

    return wrapper


def check_output_path(out: Path, source: Path | None = None) -> None:
    """Checked before any work (not after minutes of it): the output's folder exists, and writing
    over the model being read is never what the user meant."""
    if not out.parent.resolve().is_dir():
        raise modelio.OutputPathError("output folder does not exist", where=str(out.parent.resolve()),
                                      fix="create it first")
    if source is not None and out.exists() and source.exists() and os.path.samefile(out, source):
        raise modelio.OutputPathError("refusing to overwrite the input model", where=str(out), fix="choose another -o")


def output_temp_dir(out: Path):
    """A temporary folder beside ``out`` (same file system: a rename commits it)."""
    import tempfile

    return tempfile.TemporaryDirectory(dir=out.parent.resolve(), prefix=".qcompile-")


def commit_saved(candidate: Path, out: Path, read_by_input: set[Path]) -> None:
    """Move a model saved in the output's folder (and its data file) into place: the same renames
    that commit modelio.save, without writing it twice. ``read_by_input``: data files of the input."""
    data, final_data = candidate.with_name(f"{candidate.name}.data"), out.with_name(f"{out.name}.data")
    if data.exists() and final_data.resolve() in read_by_input:
        raise modelio.OutputPathError("refusing to overwrite external data the input model reads",
                                      where=str(final_data), fix="choose another output name")
    with interrupts.deferred():
        if data.exists():
            os.replace(data, final_data)
        os.replace(candidate, out)


def resolve_model(arg: str) -> Path:
    """A model path, or ``zoo:NAME`` for a zoo export (exported and cached on first use)."""
    if arg.startswith("zoo:"):
        from qcompile.models import cached_export, get_entry

        try:
            entry = get_entry(arg[4:])
        except KeyError as exc:
            raise UnknownNameError(str(exc.args[0]), fix="see `qcompile zoo list`") from None
        with bar(f"exporting {entry.name} (cached after the first time)"):
            return cached_export(entry)
    return Path(arg)


shape_options = [
    click.option("--batch", type=click.IntRange(min=1), default=None, help="Size of symbolic batch dims (axis 0)."),
    click.option("--seq", type=click.IntRange(min=1), default=None, help="Size of other symbolic dims."),
    click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Size of a named symbolic dim (repeatable)."),
]


def with_shape_options(fn):
    for option in reversed(shape_options):
        fn = option(fn)
    return fn


def data_feeds(data: str | None, model, limit: int | None = None) -> list[dict] | None:
    """Feeds from ``--data FILE.npz`` for ``model`` (validated against its inputs), or None."""
    if not data:
        return None
    from qcompile.feeds import load_npz_feeds

    return load_npz_feeds(data, specs.input_specs(model), limit=limit)


data_option = click.option("--data", type=click.Path(dir_okay=False), default=None,
                           help="Real inputs (.npz named after the inputs) for verification and timing feeds.")


def calibration_samples(calib: str | None, input_specs, count: int, shape: dict) -> list[dict] | None:
    """The first ``count`` samples of a real calibration source, to verify on (None for random data)."""
    if not calib or calib == "random":
        return None
    from qcompile.calibration import iter_feeds, resolve_reader

    return list(iter_feeds(resolve_reader(calib, input_specs, count, **shape), input_specs, count)) or None
