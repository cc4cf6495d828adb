"""What a zoo entry is, and the cache its exports live in (outside git, keyed by entry version)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from qcompile.cache import cache_root
from qcompile.calibration import Feed, IterableReader
from qcompile.errors import DependencyError, UnknownNameError


class FeedReader(IterableReader):
    """The zoo's calibration data: qcompile's own, so a failure while reading it is qcompile's (exit 3)."""

    def __init__(self, feeds: Iterator[Feed] | list[Feed]) -> None:
        super().__init__(feeds, "the zoo's data", user_code=False)


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo: how to build it, what it takes, how to feed and judge it.

    ``export(path, **options)`` writes the ONNX file; ``calibration(n)`` returns a reader of n real
    feeds (random for speed-only entries); ``heldout(n)``, n feeds of the same kind drawn apart from
    both the calibration and the evaluation data (what an accuracy budget is measured on);
    ``evaluate(model_path, target, reference)`` returns the task metric as a dict (empty for
    speed-only entries, which have random weights), ``metric`` naming its headline key.
    """

    name: str
    version: str
    description: str
    real_weights: bool
    task: str
    export: Callable[..., None]
    calibration: Callable[[int], FeedReader]
    evaluate: Callable[..., dict[str, Any]]
    bench_dims: Mapping[str, int] = field(default_factory=dict)
    default_options: Mapping[str, Any] = field(default_factory=dict)
    heldout: Callable[[int], FeedReader] | None = None
    metric: str | None = None
    higher_is_better: bool = True

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "real_weights": self.real_weights,
            "task": self.task,
            "metric": self.metric,
            "options": dict(self.default_options),
        }


def _options_key(options: Mapping[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(options.items()))


def cached_export(entry: ZooEntry, options: Mapping[str, Any] | None = None) -> Path:
    """The entry's ONNX export from the cache, exporting it first if missing (atomically)."""
    opts = {**entry.default_options, **(options or {})}
    key = f"{entry.name}-v{entry.version}" + (f"-{_options_key(opts)}" if opts != dict(entry.default_options) else "")
    folder = cache_root() / "zoo" / key
    model_path = folder / "model.onnx"
    if model_path.is_file():
        return model_path
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    try:
        with quiet_exporters():
            entry.export(tmp / "model.onnx", **opts)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            if not model_path.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_path


@contextlib.contextmanager
def quiet_exporters():
    """Exporters' own chatter off (torch's tracer warnings, transformers' progress bars and logs): a
    user's screen shows qcompile's messages; the exported graph is checked by qcompile anyway."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def require(module: str, extra: str = "export"):
    """Import an optional dependency or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DependencyError(
            f"the model zoo needs {module!r}, which is not installed",
            fix=f"pip install 'qcompile-onnx[{extra}]' (see README: setup)",
        ) from None


def hf_offline() -> None:
    """Never reach a model hub at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


EXPORTERS = ("torchscript", "dynamo")


def torch_export(
    module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int | None = None,
    keep_batchnorm: bool = False, exporter: str = "torchscript",
) -> None:
    """ONNX export of a module in eval mode into ``path``: TorchScript (opset 17) or dynamo (opset 18).

    The TorchScript exporter folds BatchNormalization into Conv by itself; ``keep_batchnorm`` exports
    the BatchNormalization nodes (inference mode) as other exporters and frameworks do.
    """
    if exporter not in EXPORTERS:
        raise UnknownNameError(f"unknown exporter {exporter!r}", fix=f"use one of: {', '.join(EXPORTERS)}")
    torch = require("torch")
    module.eval()
    if exporter == "dynamo":
        # torch.export's own form of the dynamic axes (its conversion of ``dynamic_axes`` fails on a
        # forward taking *past): every named axis of every input left for the exporter to infer
        import inspect

        auto = torch.export.Dim.AUTO
        shapes = [{axis: auto for axis in (dynamic_axes or {}).get(name, {})} or None
                  for name in list(input_names)[:len(args)]]
        kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
        if inspect.Parameter.VAR_POSITIONAL in kinds:  # torch.export sees *rest as one tuple argument
            at = kinds.index(inspect.Parameter.VAR_POSITIONAL)
            shapes = shapes[:at] + [tuple(shapes[at:])]
        shapes = tuple(shapes)
        with torch.no_grad():
            program = torch.onnx.export(
                module, args, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=shapes, opset_version=opset or 18, dynamo=True, external_data=False,
                optimize=True, verbose=False,
            )
        program.save(str(path))
        return
    mode = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset or 17,
            dynamo=False,
            do_constant_folding=True,
            training=mode,
        )
