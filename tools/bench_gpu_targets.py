"""Accuracy of what TensorRT will run, measured on CPU now: qcompile's ``tensorrt`` target beside
NVIDIA ModelOpt 0.47's ``modelopt.onnx.quantization``, on the same FP32 export and calibration data.

    python tools/bench_gpu_targets.py [--models minilm,smollm2] [--rows int8,int8-sq,fp8,int4]
                                      [--no-modelopt] [--modelopt-method int8=max] [--json-out FILE]

Rows per model: FP32; qcompile ``--target tensorrt`` for INT8, INT8 + SmoothQuant (the w8a8-smoothquant
recipe), FP8 E4M3 and INT4 weight-only (GPTQ, block 128, blocked DequantizeLinear), all written with
``--high-precision fp32`` (the same Q/DQ placement TensorRT gets, in a graph ONNX Runtime CPU scores
natively; the FP16 variant differs only by the mixed-precision pass, checked separately); and ModelOpt's
INT8 (entropy), FP8 and INT4 (AWQ-clip) with ``high_precision_dtype=fp32``, run by
tools/modelopt_ptq.py in its own venv (/work/modelopt-venv, see tools/modelopt_requirements.txt).

Scores come from the zoo's evaluators (MiniLM: retrieval R@1 on chatterbot Q/A and embedding cosine
to FP32; SmolLM2: perplexity on the pydoc text), on ONNX Runtime CPU. Quantize cost: wall time and
peak RSS of each quantizer run as a whole process (qcompile's CLI; ModelOpt's script, whose RSS
includes its own calibration-data arrays). Calibration data: the zoo entry's reader (64 samples
MiniLM, 32 SmolLM2), dumped once to an .npz for ModelOpt (ragged samples as ``INPUT/INDEX``; for its
INT4 AWQ, which concatenates samples, MiniLM's sentences padded to 128 tokens).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import metric_cell, report, score

ROOT = Path(__file__).resolve().parents[1]
MODELOPT_PYTHON = Path("/work/modelopt-venv/bin/python")
SAMPLES = {"minilm": 64, "smollm2": 32}
#: row -> qcompile quantize arguments (all --target tensorrt --high-precision fp32)
QCOMPILE_ROWS = {
    "int8": ["--precision", "int8"],
    "int8-sq": ["--recipe", "w8a8-smoothquant"],
    "fp8": ["--precision", "fp8"],
    "int4": ["--precision", "int4"],
}
#: row -> (ModelOpt mode, its calibration method)
MODELOPT_ROWS = {"int8": ("int8", "entropy"), "fp8": ("fp8", "max"), "int4": ("int4", "awq_clip")}


def timed(command: list[str]) -> dict:
    """Run ``command`` as a whole process: wall seconds, peak RSS (MB) of it and its children, error."""
    launcher = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
                "rc = subprocess.call(sys.argv[1:]); "
                "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, "
                "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    done = subprocess.run([sys.executable, "-c", launcher, *command], capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        result["error"] = (done.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return result


def calibration_npz(entry, samples: int, path: Path, pad_to: int | None = None) -> Path:
    """The entry's calibration feeds as an .npz: stacked when every sample has one shape, else ``INPUT/INDEX``
    (``pad_to``: MiniLM's sentences padded to that many tokens, one shape)."""
    reader = entry.calibration(samples, pad_to=pad_to) if pad_to else entry.calibration(samples)
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    arrays = {}
    for name in feeds[0]:
        shapes = {np.shape(f[name]) for f in feeds}
        if len(shapes) == 1:
            arrays[name] = np.concatenate([np.asarray(f[name]) for f in feeds])
        else:
            arrays.update({f"{name}/{i}": np.asarray(f[name]) for i, f in enumerate(feeds)})
    np.savez(path, **arrays)
    return path


def qcompile_row(name: str, model: Path, row: str, out: Path) -> dict:
    command = [sys.executable, "-m", "qcompile", "quantize", str(model), "--target", "tensorrt",
               "--high-precision", "fp32", "--calib", f"zoo:{name}", "--samples", str(SAMPLES[name]),
               *QCOMPILE_ROWS[row], "-o", str(out)]
    return {"quantizer": f"qcompile tensorrt {row}", **timed(command)}


def modelopt_row(model: Path, calib: Path, row: str, out: Path, methods: dict[str, str]) -> dict:
    mode, method = MODELOPT_ROWS[row]
    method = methods.get(row, method)
    command = [str(MODELOPT_PYTHON), str(ROOT / "tools" / "modelopt_ptq.py"), "--model", str(model), "--calib",
               str(calib), "--mode", mode, "--calibration-method", method, "--high-precision", "fp32", "-o", str(out),
               "--log-level", "ERROR"]
    return {"quantizer": f"ModelOpt 0.47 {row} ({method})", **timed(command)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | quantizer | metric | quantize s | peak RSS MB |", "|---|---|---|---|---|"]
    for r in rows:
        metric = r["error"] if r.get("error") else metric_cell(r)
        lines.append(f"| {r['model']} | {r['quantizer']} | {metric} | "
                     f"{r.get('seconds', 0):.1f} | {r.get('peak_rss_mb', 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--rows", default=",".join(QCOMPILE_ROWS))
    parser.add_argument("--no-modelopt", action="store_true")
    parser.add_argument("--modelopt-method", action="append", default=[], metavar="ROW=METHOD",
                        help="ModelOpt's calibration method for a row (default int8=entropy, fp8=max, int4=awq_clip)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from qcompile.models import cached_export, get_entry

    with_modelopt = not args.no_modelopt and MODELOPT_PYTHON.exists()
    methods = dict(item.split("=", 1) for item in args.modelopt_method)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            entry = get_entry(name)
            model = Path(cached_export(entry))
            fp32 = score({"model": name, "quantizer": "FP32"}, entry, model, model)
            rows.append(fp32)
            calib = calibration_npz(entry, SAMPLES[name], folder / f"{name}.calib.npz") if with_modelopt else None
            padded = (calibration_npz(entry, SAMPLES[name], folder / f"{name}.padded.npz", pad_to=128)
                      if with_modelopt and name == "minilm" else calib)
            for row in args.rows.split(","):
                out = folder / f"{name}.qcompile.{row}.onnx"
                result = {"model": name, **qcompile_row(name, model, row, out)}
                rows.append(score(result, entry, out, model) if not result.get("error") else result)
                if with_modelopt and row in MODELOPT_ROWS:
                    out = folder / f"{name}.modelopt.{row}.onnx"
                    result = {"model": name, **modelopt_row(model, padded if row == "int4" else calib, row, out,
                                                             methods)}
                    if not result.get("error"):
                        try:
                            score(result, entry, out, model)
                        except Exception as exc:  # a model ORT CPU cannot run is ModelOpt's result, not ours
                            result["error"] = f"scoring failed: {str(exc).splitlines()[0][:160]}"
                    rows.append(result)
                print(markdown(rows[-2:]), flush=True)
    report(rows, markdown, args.json_out)
    print(f"\n{time.strftime('%Y-%m-%d')}; command: python tools/bench_gpu_targets.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
