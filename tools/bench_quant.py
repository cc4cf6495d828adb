"""INT8 static quantization, side by side: FP32, onnxruntime.quantization.quantize_static, qcompile.

    python tools/bench_quant.py [--models minilm,digits_cnn,resnet18,gpt_synth] [--runs 30]
                                [--samples 64] [--json-out FILE]
    python tools/bench_quant.py --models gpt_independent [--repeat 3] [--gpt-width 1024]
                                [--gpt-layers 12] [--gpt-vocab 8192] [--gpt-heads 16] [--gpt-external]

Every quantizer gets the same FP32 export and the same calibration feeds (the zoo entry's reader
over real data; random images/tokens for the random-weight entries). ORT is run as its docs show:
QDQ format, per-channel, U8 activations / S8 weights, with MinMax, Percentile and Entropy
calibration (a crash is reported as such). For ResNet-18, qcompile also runs with every Conv in
INT8 (no op class kept float by the kernel probe). For MiniLM and digits, qcompile also runs with s8
weights forced, to show what u8 x s8 saturation costs on CPUs that have it. Each quantizer runs in
its own process so that its peak RSS is its own. Columns: task metric, latency ratio vs FP32 at
batch 1 and 8 (interleaved on ORT CPU), quantize wall time, peak RSS.

``gpt_independent`` is the cost claim on a GPT that qcompile's zoo did not build (tools/
gpt_independent.py writes it directly in ONNX; default width 1024, 12 layers, vocabulary 8192, 168 M
parameters, 673 MB inline; 32 x 128 random tokens to calibrate). Each command runs as a whole
process, as a user would run it, under a launcher that reports its wall time and peak RSS
(``getrusage(RUSAGE_CHILDREN)``): the floor (a script that loads the model in ONNX Runtime with its
defaults and runs it once over every calibration sample: the least any static quantizer that
calibrates on ORT must spend), ``qcompile quantize --target ort-cpu --calib FILE --json`` (its
phases from the JSON; "outside phases" is the wall time they do not cover) and onnxruntime's
``quantize_static`` (QDQ, per channel, U8/S8, MinMax). ``--repeat N`` runs the three N times,
rotating who goes first; the table has every run and the medians, and each run's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import metric_cell, report, run_isolated, score, time_rows

GPT_168M = {"width": 768, "depth": 12, "heads": 12, "vocab": 50304, "max_seq": 1024}
SETUPS = {
    # name: (zoo entry, export options, calibration samples, timing dims, timing batches)
    "minilm": ("minilm", {}, 64, {"sequence": 128}, (1, 8)),
    "digits_cnn": ("digits_cnn", {}, 300, {}, (1, 8)),
    "resnet18": ("resnet18", {}, 16, {}, (1, 8)),
    "gpt_synth": ("gpt_synth", GPT_168M, 32, {"sequence": 128}, ()),
}


def _ort_quantize(src: str, dst: str, feeds: list, method: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                          "entropy": CalibrationMethod.Entropy}[method],
    )


def _qcompile_quantize(src: str, dst: str, feeds: list, method: str) -> None:
    import qcompile
    from qcompile.calibration import IterableReader
    from qcompile.static_int8 import quantize_static as quantize

    method, *flags = method.split("+")  # e.g. "mse+smoothquant", "mse+s8", "mse+all"
    result = quantize(src, IterableReader(feeds), method=method, smoothquant="auto" if "smoothquant" in flags else None,
                      weight_dtype="int8" if "s8" in flags else None, keep_float=() if "all" in flags else None)
    qcompile.save(result.model, dst)


def quantize_with(kind: str, src: str, dst: str, feeds: list, method: str) -> None:
    (_ort_quantize if kind == "ort" else _qcompile_quantize)(src, dst, feeds, method)


def measure(name: str, runs: int, samples: int | None, workdir: Path) -> list[dict]:
    from qcompile.models import cached_export, get_entry

    entry_name, options, default_samples, dims, batches = SETUPS[name]
    entry = get_entry(entry_name)
    src = cached_export(entry, options)
    n = samples or default_samples
    reader = entry.calibration(n) if entry_name != "gpt_synth" else entry.calibration(n, 128, options["vocab"])
    feeds = list(reader)
    candidates = [("FP32", None, None), ("ORT quantize_static MinMax", "ort", "minmax"),
                  ("ORT quantize_static Percentile", "ort", "percentile"),
                  ("ORT quantize_static Entropy", "ort", "entropy"), ("qcompile (mse)", "qcompile", "mse")]
    if not batches:  # cost-only entries: the anchor is MinMax
        candidates = [c for c in candidates if c[2] in (None, "minmax", "mse")]
    if name == "resnet18":  # the goal is stated with every Conv in INT8: no op class kept float
        candidates.append(("qcompile (mse), every Conv in INT8", "qcompile", "mse+all"))
    if name in ("minilm", "digits_cnn"):  # what the u8 x s8 saturation costs where the CPU has it
        candidates.append(("qcompile (mse), s8 weights forced", "qcompile", "mse+s8"))
    padded = None
    if name == "minilm":  # ORT's histogram calibrators need equal-length feeds: give them padded ones too
        padded = list(entry.calibration(n, pad_to=128))
        candidates += [("qcompile (mse + SmoothQuant auto)", "qcompile", "mse+smoothquant"),
                       ("ORT quantize_static Percentile, feeds padded to 128", "ort", "percentile"),
                       ("ORT quantize_static Entropy, feeds padded to 128", "ort", "entropy"),
                       ("qcompile (mse), feeds padded to 128", "qcompile", "mse")]
    rows = []
    for label, kind, method in candidates:
        row = {"model": name, "quantizer": label, "samples": len(feeds)}
        path = src
        if kind is not None:
            use_padded = "padded" in label
            path = workdir / f"{name}-{kind}-{method.replace('+', '-')}{'-padded' if use_padded else ''}.onnx"
            row.update(run_isolated(quantize_with, kind, str(src), str(path), padded if use_padded else feeds, method))
            if row["error"]:
                rows.append(row)
                continue
        rows.append(score(row, entry, path, src))
    time_rows(rows, runs, {f"b{batch}": {"batch": batch, **dims} for batch in batches})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| model | quantizer | metric | speed vs FP32 b1 | b8 | quantize s | peak RSS MB | model MB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['model']} | {r['quantizer']} | **crash**: {r['error']} | | | {r['seconds']:.1f} "
                       f"| {r['peak_rss_mb']:.0f} | |")
            continue
        metric = metric_cell(r) if ("r_at_1" in r or "top1" in r) else ""
        speed = lambda k: f"{r[k]:.2f}×" if k in r else "—"  # noqa: E731
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "—"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "—"
        out.append(f"| {r['model']} | {r['quantizer']} | {metric} | {speed('speed_b1')} | {speed('speed_b8')} "
                   f"| {secs} | {rss} | {r['bytes'] / 1e6:.0f} |")
    return "\n".join(out)


# --- the cost claim on an independently built GPT (gpt_independent) -------------------------------

#: Runs COMMAND... and writes {"seconds", "cpu_seconds", "peak_rss_mb", "returncode"} to OUT: the
#: child's wall time, CPU time and peak RSS (getrusage of children: this launcher has no other child).
LAUNCHER = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1] + '.stdout', 'wb')).returncode
seconds = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
json.dump({'seconds': seconds, 'cpu_seconds': usage.ru_utime + usage.ru_stime, 'peak_rss_mb': usage.ru_maxrss / 1024,
           'returncode': code}, open(sys.argv[1], 'w'))
"""

#: The floor: what a user's script spends to run the model once over the calibration samples on ONNX
#: Runtime (its defaults), session creation included.
FLOOR = """
import sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
ids = np.load(sys.argv[2])['input_ids']
for sample in ids:
    session.run(None, {'input_ids': sample})
"""

#: onnxruntime's quantize_static as its documentation shows it (QDQ, per channel, U8/S8, MinMax).
ORT_STATIC = """
import sys
import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
ids = np.load(sys.argv[3])['input_ids']
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter(ids)
    def get_next(self):
        sample = next(self.it, None)
        return None if sample is None else {'input_ids': sample}
quantize_static(sys.argv[1], sys.argv[2], Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
"""


def whole_process(command: list[str], workdir: Path, label: str, env: dict | None = None) -> dict:
    """``command`` as a whole process: wall seconds, CPU seconds, peak RSS (MiB, like VmHWM), exit
    code, stdout."""
    out = workdir / f"{label}.json"
    subprocess.run([sys.executable, "-c", LAUNCHER, str(out), *command], check=True, env=env, cwd=workdir)
    result = json.loads(out.read_text())
    result["stdout"] = Path(f"{out}.stdout").read_text(errors="replace")
    result["load_average"] = os.getloadavg()[0]
    return result


def _qcompile_command() -> list[str]:
    script = Path(sys.executable).with_name("qcompile")
    return [str(script)] if script.exists() else [sys.executable, "-m", "qcompile"]


def _model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def measure_cost(args, workdir: Path) -> dict:
    """Floor, qcompile and quantize_static on the independent GPT, ``args.repeat`` rounds."""
    import gpt_independent

    model = workdir / "gpt.onnx"
    calib = workdir / "calib.npz"
    options = dict(width=args.gpt_width, layers=args.gpt_layers, vocab=args.gpt_vocab, heads=args.gpt_heads,
                   max_seq=max(256, args.gpt_seq))
    gpt_independent.write(model, external=args.gpt_external, **options)
    gpt_independent.write_calibration(calib, args.gpt_samples, args.gpt_seq, args.gpt_vocab)
    size = _model_bytes(model)
    quantize_args = ["quantize", str(model), "-o", str(workdir / "q.onnx"), "--target", "ort-cpu",
                     "--calib", str(calib), "--json"]
    commands = {
        "floor": [sys.executable, "-c", FLOOR, str(model), str(calib)],
        "qcompile": [*_qcompile_command(), *quantize_args],
        "quantize_static": [sys.executable, "-c", ORT_STATIC, str(model), str(workdir / "ort.onnx"), str(calib)],
    }
    envs = {}
    if args.before:  # the same command from another source tree (qcompile before a change), for its effect
        commands["qcompile before"] = [sys.executable, "-m", "qcompile", *quantize_args]
        envs["qcompile before"] = {**os.environ, "PYTHONPATH": str(args.before)}
    names = list(commands)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.repeat):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for stale in workdir.glob(("ort" if name == "quantize_static" else "q") + ".onnx*"):
                stale.unlink()
            result = whole_process(commands[name], workdir, f"{name.replace(' ', '_')}-{round_index}", envs.get(name))
            if result["returncode"] != 0:
                raise SystemExit(f"{name} failed (exit {result['returncode']}): {' '.join(commands[name][:3])} ...")
            if name.startswith("qcompile"):
                report_json = json.loads(result["stdout"])
                result["phases"] = report_json.get("phase_seconds", {})
                result["phase_rss"] = report_json.get("phase_peak_rss_mb", {})
                result["speedup"] = report_json["speedup"]
                result["output_mb"] = _model_bytes(workdir / "q.onnx") / 1e6
            elif name == "quantize_static":
                result["output_mb"] = _model_bytes(workdir / "ort.onnx") / 1e6
            del result["stdout"]
            runs[name].append(result)
            print(f"round {round_index + 1}: {name} {result['seconds']:.1f} s, {result['peak_rss_mb']:.0f} MB "
                  f"(load average {result['load_average']:.1f})", flush=True)
    return {"options": {**options, "external": args.gpt_external, "samples": args.gpt_samples, "seq": args.gpt_seq},
            "parameters": gpt_independent.parameter_count(args.gpt_width, args.gpt_layers, args.gpt_vocab,
                                                          options["max_seq"]),
            "model_bytes": size, "runs": runs}


def cost_markdown(cost: dict) -> str:
    """The cost table (every round, then medians), then the phases of each qcompile's median run."""
    size_mib = cost["model_bytes"] / 2**20  # peak RSS is in MiB (kB / 1024): the ratio is bytes / bytes
    runs = cost["runs"]
    o = cost["options"]
    out = [f"GPT width {o['width']}, {o['layers']} layers, vocabulary {o['vocab']}, {o['heads']} heads, "
           f"{cost['parameters'] / 1e6:.1f} M parameters, {cost['model_bytes'] / 1e6:.0f} MB "
           f"({'external data' if o['external'] else 'inline'}); {o['samples']} x {o['seq']}-token samples.",
           "",
           "| round | command | load avg | wall s | CPU s | × floor (wall) | peak RSS MiB | RSS × model bytes |",
           "|---|---|---|---|---|---|---|---|"]

    def line(label, name, r, floor):
        load = f"{r['load_average']:.1f}" if "load_average" in r else ""
        out.append(f"| {label} | {name} | {load} | {r['seconds']:.1f} | {r['cpu_seconds']:.0f} "
                   f"| {r['seconds'] / floor:.2f}× | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / size_mib:.2f}× |")

    for i in range(len(runs["floor"])):
        for name, rs in runs.items():
            line(str(i + 1), name, rs[i], runs["floor"][i]["seconds"])
    if len(runs["floor"]) > 1:
        floor = statistics.median(r["seconds"] for r in runs["floor"])
        for name, rs in runs.items():
            median = {key: statistics.median(r[key] for r in rs) for key in ("seconds", "cpu_seconds", "peak_rss_mb")}
            line("median", name, median, floor)
        ratios = ", ".join(
            f"{name} {statistics.median(r['seconds'] / f['seconds'] for r, f in zip(rs, runs['floor'])):.2f}×"
            for name, rs in runs.items() if name != "floor")
        out.append(f"\nMedian of the per-round wall-time ratios to the floor: {ratios}.")
    for name, rs in runs.items():
        if not name.startswith("qcompile") or not rs[0].get("phases"):
            continue
        typical = sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2]
        phases = typical["phases"]
        outside = typical["seconds"] - sum(phases.values())
        out += ["", f"{name}: phases of its median run ({typical['seconds']:.1f} s wall, speed guard "
                f"{typical['speedup']:.2f}× FP32, output {typical['output_mb']:.0f} MB):", "",
                "| phase | " + " | ".join(phases) + " | outside phases |",
                "|---|" + "---|" * (len(phases) + 1),
                "| s | " + " | ".join(f"{v:.2f}" for v in phases.values()) + f" | {outside:.2f} |",
                "| peak RSS MiB | " + " | ".join(f"{typical['phase_rss'].get(k, 0):.0f}" for k in phases) + " | |"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,digits_cnn,resnet18,gpt_synth")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="gpt_independent: rounds of the three commands")
    parser.add_argument("--gpt-width", type=int, default=1024)
    parser.add_argument("--gpt-layers", type=int, default=12)
    parser.add_argument("--gpt-vocab", type=int, default=8192)
    parser.add_argument("--gpt-heads", type=int, default=16)
    parser.add_argument("--gpt-external", action="store_true", help="gpt_independent: weights as external data")
    parser.add_argument("--gpt-samples", type=int, default=32)
    parser.add_argument("--gpt-seq", type=int, default=128)
    parser.add_argument("--before", type=Path, default=None,
                        help="gpt_independent: also run `python -m qcompile` with this PYTHONPATH (an earlier tree)")
    args = parser.parse_args()
    names = [name.strip() for name in args.models.split(",")]
    rows, cost = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name == "gpt_independent":
                cost = measure_cost(args, Path(tmp))
                print(cost_markdown(cost), flush=True)
                continue
            rows += measure(name, args.runs, args.samples, Path(tmp))
            print(markdown([r for r in rows if r["model"] == name]), flush=True)
    if cost is None:
        report(rows, markdown, args.json_out)
        return
    if rows:
        report(rows, markdown, None)
    else:
        from qcompile.targets.ort_cpu.kernel_probe import cpu_signature

        print(f"\n{cpu_signature()}")
    print("\n" + cost_markdown(cost))
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": [{k: v for k, v in r.items() if k != "path"} for r in rows],
                                             "gpt_independent": cost}, indent=2, default=str))


if __name__ == "__main__":
    main()
