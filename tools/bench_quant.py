"""INT8 static quantization, side by side: FP32, onnxruntime.quantization.quantize_static, qcompile.

    python tools/bench_quant.py [--models minilm,digits_cnn,resnet18,gpt_synth] [--runs 30]
                                [--samples 64] [--json-out FILE]

Every quantizer gets the same FP32 export and the same calibration feeds (the zoo entry's reader
over real data; random images/tokens for the random-weight entries). ORT is run as its docs show:
QDQ format, per-channel, U8 activations / S8 weights, with MinMax, Percentile and Entropy
calibration (a crash is reported as such). For ResNet-18, qcompile also runs with every Conv in
INT8 (no op class kept float by the kernel probe). For MiniLM and digits, qcompile also runs with s8
weights forced, to show what u8 x s8 saturation costs on CPUs that have it. Each quantizer runs in its own process so that its
peak RSS is its own. Columns: task metric, latency ratio vs FP32 at batch 1 and 8 (interleaved on
ORT CPU), quantize wall time, peak RSS.
"""

from __future__ import annotations

import argparse
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
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

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
    from qcompile.quantize import quantize

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
            out.append(f"| {r['model']} | {r['quantizer']} | **crash**: {r['error']} | | | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | |")
            continue
        metric = metric_cell(r) if ("r_at_1" in r or "top1" in r) else ""
        speed = lambda k: f"{r[k]:.2f}×" if k in r else "—"  # noqa: E731
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "—"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "—"
        out.append(f"| {r['model']} | {r['quantizer']} | {metric} | {speed('speed_b1')} | {speed('speed_b8')} "
                   f"| {secs} | {rss} | {r['bytes'] / 1e6:.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,digits_cnn,resnet18,gpt_synth")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += measure(name.strip(), args.runs, args.samples, Path(tmp))
            print(markdown([r for r in rows if r["model"] == name.strip()]), flush=True)
    report(rows, markdown, args.json_out)


if __name__ == "__main__":
    main()
