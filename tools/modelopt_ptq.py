"""NVIDIA ModelOpt ONNX post-training quantization on CPU: the anchor qcompile's benchmark compares against.

Runs ``modelopt.onnx.quantization.quantize`` (nvidia-modelopt 0.47) with ONNX Runtime CPU as the calibration
execution provider and writes the quantized model plus a JSON report (options, wall time, peak RSS).
It must run with the separate ModelOpt venv, never with qcompile's (it does not import qcompile)::

    python3 -m venv /work/modelopt-venv
    /work/modelopt-venv/bin/pip install --no-deps -r tools/modelopt_requirements.txt
    /work/modelopt-venv/bin/python tools/modelopt_ptq.py --model IN.onnx --calib CALIB.npz --mode int8 \\
        [--calibration-method max|entropy|awq_clip|awq_lite|rtn_dq] [--high-precision fp32|fp16|bf16] \\
        [--calibration-shapes "image:32x1x8x8"] [--block-size 128] [--option KEY=JSON ...] \\
        -o OUT.onnx [--json REPORT.json] [--log-level WARNING]

CALIB.npz holds, per model input, either one array named after the input with the samples stacked along axis 0
(passed as ModelOpt's ``calibration_data``; ModelOpt splits it into steps of the model's batch size, a symbolic
batch counting as 1, or as ``--calibration-shapes`` says), or ragged samples named ``INPUT/INDEX``
(``input_ids/0``, ``input_ids/1``, ...; one feed per index, lengths may differ; passed as a data reader).

ModelOpt's ONNX path imports torch at module level only for ``qdq_utils._cast_fp8`` (an FP8 weight cast). torch
is not installed in that venv: a placeholder module stands in while modelopt is imported and ``_cast_fp8`` is
replaced by the same cast through ml_dtypes (clamp to +-448, round to nearest even), so no torch path runs.

Notes: calibration runs on ONNX Runtime CPU only (``calibration_eps=["cpu"]``); ModelOpt writes (and removes)
intermediate files beside the input model. Peak RSS is ru_maxrss of the whole process (imports and calibration data
included; ``rss_before_quantize_mib`` is the peak before quantize() started). fp32 and fp16 outputs run on ORT CPU;
bf16 ones do not (no CPU QuantizeLinear for bfloat16). ORT 1.24 (ModelOpt's pin, in this venv) fails to load fp8
transformer outputs at ORT_ENABLE_EXTENDED and above (its MatMulIntegerToFloat fusion takes the fp8 Q/DQ); score the
outputs with qcompile's own onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np

DEFAULT_METHOD = {"int8": "entropy", "fp8": "entropy", "int4": "awq_clip"}


def import_modelopt():
    """``modelopt.onnx.quantization`` without torch (see the module docstring)."""
    import ml_dtypes
    import onnxruntime.quantization  # noqa: F401  (before the placeholder: ORT probes find_spec("torch"))

    placeholder = "torch" not in sys.modules
    if placeholder:
        sys.modules["torch"] = types.ModuleType("torch")
    try:
        import modelopt
        import modelopt.onnx.quantization as moq
        from modelopt.onnx.quantization import qdq_utils
    finally:
        if placeholder:
            del sys.modules["torch"]

    def cast_fp8(array: np.ndarray) -> np.ndarray:
        clipped = np.clip(np.asarray(array, dtype=np.float32), -448.0, 448.0)
        return clipped.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)

    if placeholder:
        qdq_utils._cast_fp8 = cast_fp8
    return modelopt, moq


def load_calibration(path: str):
    """(calibration_data dict, None) for stacked arrays, or (None, feeds list) for ``INPUT/INDEX`` samples."""
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    if not any("/" in name for name in arrays):
        return arrays, None
    feeds: dict[int, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, index = key.rsplit("/", 1)
        feeds.setdefault(int(index), {})[name] = value
    return None, [feeds[i] for i in sorted(feeds)]


def feed_reader(feeds: list[dict[str, np.ndarray]]):
    """An ONNX Runtime CalibrationDataReader with the get_first/rewind ModelOpt also calls."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self.iterator, None)

        def get_first(self):
            return feeds[0]

        def rewind(self):
            self.iterator = iter(feeds)

    return Reader()


def peak_rss_mib() -> dict[str, float]:
    """Peak resident set size so far (ru_maxrss is KiB on Linux) of this process and of its waited children."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(own, 1), "peak_rss_children_mib": round(children, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="input ONNX model")
    parser.add_argument("--calib", required=True, help="calibration .npz (see the module docstring)")
    parser.add_argument("--mode", required=True, choices=["int8", "fp8", "int4"])
    parser.add_argument("--calibration-method", help="int8/fp8: entropy|max; int4: awq_clip|awq_lite|awq_full|rtn_dq")
    parser.add_argument("--high-precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="dtype of what stays unquantized (default fp32, which ORT CPU runs)")
    parser.add_argument("--calibration-shapes", help='one calibration step\'s input shapes, e.g. "image:32x1x8x8"')
    parser.add_argument("--block-size", type=int, help="int4 block size (ModelOpt's default 128; -1 per channel)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help="another quantize() keyword, e.g. disable_mha_qdq=true (repeatable)")
    parser.add_argument("-o", "--output", required=True, help="quantized ONNX model to write")
    parser.add_argument("--json", help="report to write (printed to stdout either way)")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)

    data, feeds = load_calibration(args.calib)
    options = {
        "onnx_path": str(Path(args.model).resolve()),
        "quantize_mode": args.mode,
        "calibration_method": args.calibration_method or DEFAULT_METHOD[args.mode],
        "calibration_shapes": args.calibration_shapes,
        "calibration_eps": ["cpu"],
        "output_path": str(Path(args.output).resolve()),
        "high_precision_dtype": args.high_precision,
        "block_size": args.block_size,
        "log_level": args.log_level,
    }
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    started = time.perf_counter()
    modelopt, moq = import_modelopt()
    import_s = time.perf_counter() - started
    if feeds is None:
        options["calibration_data"] = data
    else:
        options["calibration_data_reader"] = feed_reader(feeds)

    rss_before = peak_rss_mib()["peak_rss_mib"]
    started = time.perf_counter()
    moq.quantize(**options)
    quantize_s = time.perf_counter() - started

    samples = len(feeds) if feeds is not None else int(next(iter(data.values())).shape[0])
    shown = {k: v for k, v in options.items() if k not in ("calibration_data", "calibration_data_reader")}
    report = {
        "tool": "nvidia-modelopt",
        "modelopt_version": modelopt.__version__,
        "onnxruntime_version": sys.modules["onnxruntime"].__version__,
        "options": shown,
        "calibration": {"path": str(Path(args.calib).resolve()), "samples": samples,
                        "layout": "stacked" if feeds is None else "ragged"},
        "import_s": round(import_s, 3),
        "quantize_wall_s": round(quantize_s, 3),
        "rss_before_quantize_mib": rss_before,
        **peak_rss_mib(),
        "output_bytes": Path(args.output).stat().st_size,
    }
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
