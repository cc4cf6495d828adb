"""ONNX Runtime backends: CPU (always available) and CUDA (with onnxruntime-gpu)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from qcompile.runtimes.base import Availability, BackendError, RuntimeOptions, SharedWeightsModel

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


#: Custom-op libraries every session registers (paths joined by os.pathsep): kernels for a user's own
#: domains, so that graphs holding them can be verified and calibrated (the nodes stay black boxes).
CUSTOM_OP_LIBRARIES_ENV = "QCOMPILE_CUSTOM_OP_LIBRARIES"


def custom_op_libraries() -> list[str]:
    return [path for path in os.environ.get(CUSTOM_OP_LIBRARIES_ENV, "").split(os.pathsep) if path]


class OrtRuntime:
    """ONNX Runtime with one execution provider."""

    accepts_shared_weights = True

    def __init__(self, name: str = "ort-cpu", provider: str = "CPUExecutionProvider") -> None:
        self.name = name
        self.provider = provider
        self._session = None
        self._shared: list = []  # OrtValues over the caller's arrays, alive as long as the session

    def available(self) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError:
            return Availability(False, "onnxruntime is not installed (pip install onnxruntime)")
        if self.provider not in ort.get_available_providers():
            return Availability(
                False, f"{self.provider} is not in this onnxruntime build (install onnxruntime-gpu and a CUDA driver)"
            )
        return Availability(True)

    def load(self, model: str | bytes | SharedWeightsModel, options: RuntimeOptions | None = None) -> None:
        import onnxruntime as ort

        options = options or RuntimeOptions()
        if options.optimization not in _LEVELS:
            raise BackendError(f"unknown optimization level {options.optimization!r}; use one of {sorted(_LEVELS)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[options.optimization])
        so.log_severity_level = 4  # errors reach us as exceptions; a fallback attempt must not print them
        if options.threads:
            so.intra_op_num_threads = int(options.threads)
            so.inter_op_num_threads = 1
        if not options.spin_wait:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        for key, value in options.extra.items():
            so.add_session_config_entry(str(key), str(value))
        for library in custom_op_libraries():
            try:
                so.register_custom_ops_library(library)
            except Exception as exc:  # ORT raises its own types for a library it cannot load
                raise BackendError(f"cannot load custom-op library {library}: {str(exc).splitlines()[0]}") from None
        if isinstance(model, SharedWeightsModel):
            self._create_sharing(model, so)
        else:
            self._create(model, so)

    def _create(self, model: str | bytes, so) -> None:
        import onnxruntime as ort

        try:
            self._session = ort.InferenceSession(model, sess_options=so, providers=[self.provider])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise BackendError(f"onnxruntime could not load the model: {str(exc).strip().splitlines()[0]}") from exc

    def _create_sharing(self, model: SharedWeightsModel, so) -> None:
        """A session whose initializers are the caller's arrays (SessionOptions.add_initializer)."""
        import onnxruntime as ort

        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in model.weights.values()]
        for name, value in zip(model.weights, values):
            so.add_initializer(name, value)
        # ORT checks that external data exists before it sees the overrides: an empty file will do.
        with tempfile.TemporaryDirectory(prefix="qcompile-shared-") as folder:
            Path(folder, model.placeholder).touch()
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            self._create(model.proto, so)
        self._shared = values

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._require().get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._require().get_outputs()]

    def _require(self):
        if self._session is None:
            raise BackendError(f"{self.name}: call load() before run()")
        return self._session

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        session = self._require()
        names = list(outputs) if outputs is not None else self.output_names
        try:
            arrays = session.run(names, dict(feeds))
        except Exception as exc:
            raise BackendError(f"onnxruntime failed to run: {str(exc).strip().splitlines()[0]}") from exc
        return dict(zip(names, arrays))

    def close(self) -> None:
        self._session = None
        self._shared = []

    def __enter__(self) -> "OrtRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
