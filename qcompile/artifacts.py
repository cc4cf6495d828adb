"""What a target's runtime serves, built from a target-ready ONNX file (``qcompile compile``).

    tensorrt          a serialized engine (TensorRT Python API, strongly typed, no precision flags) and
                      ``<engine>.json`` beside it: build options, versions, GPU, cache key
                      (qcompile.runtimes.tensorrt; engine and timing caches under the qcompile cache)
    ort-*, migraphx   the model and ``<model>.session.json``: the runtime, its providers with their
                      options and the graph optimization level — loaded and run once here, so the pair
                      is known to work

The runtime must be usable on this machine; where it is not, :func:`missing_runtimes` says exactly
what is missing (the CLI exits 2 before any work).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from qcompile import execute, targets
from qcompile.cache import cache_root
from qcompile.errors import BackendFailedError, InputSpecError
from qcompile.runtimes import BackendError, get_runtime, missing


def missing_runtimes(names: Sequence[str]) -> dict[str, str]:
    """Per target whose serving runtime cannot run here, the one-line reason."""
    reasons = {}
    for name in names:
        reason = missing(targets.get(name).runtime)
        if reason:
            reasons[name] = reason
    return reasons


def parse_profiles(items: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """``--profile NAME=min:opt:max`` values as {dim: (min, opt, max)} (usage errors exit 2)."""
    from qcompile.runtimes import parse_profile

    try:
        return parse_profile(",".join(items))
    except ValueError as exc:
        raise InputSpecError(str(exc), where="--profile", fix="write NAME=min:opt:max, e.g. seq=1:128:512") from None


def build(onnx_path: Path, target: str, out: Path, *, profiles: Mapping[str, tuple[int, int, int]] | None = None,
          feed: Mapping[str, np.ndarray] | None = None) -> dict:
    """Build ``target``'s artifact from ``onnx_path`` at ``out`` (``out`` and its JSON, written atomically);
    returns what the JSON holds."""
    spec = targets.get(target)
    if spec.runtime == "tensorrt":
        from qcompile.runtimes import build_engine

        try:
            info = build_engine(onnx_path, out, dims=dict(profiles or {}), cache_dir=cache_root() / "tensorrt")
        except BackendError as exc:
            raise BackendFailedError(str(exc), where=target, fix="check the model with `qcompile inspect`") from None
        return {"target": target, "artifact": str(out), **info}
    runtime = get_runtime(spec.runtime)
    providers = runtime.providers() if hasattr(runtime, "providers") else [[getattr(runtime, "provider", spec.runtime),
                                                                           {}]]
    info = {"target": target, "runtime": spec.runtime, "model": out.name,
            "providers": [[name, dict(options)] for name, options in providers],
            "graph_optimization_level": "ORT_ENABLE_ALL" if spec.runtime.startswith("ort-") else None}
    with execute.loaded(str(onnx_path), spec.runtime) as loaded:
        if feed is not None:
            try:
                loaded.run(feed)
            except BackendError as exc:
                raise BackendFailedError(str(exc), where=target, fix="check the inputs match the model") from None
    os.replace(onnx_path, out)
    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.exists():
        os.replace(data, out.with_name(out.name + ".data"))
    sidecar = out.with_name(out.name + ".session.json")
    tmp = sidecar.with_name(f".{sidecar.name}.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, sidecar)
    return {**info, "artifact": str(out), "session_json": str(sidecar)}
