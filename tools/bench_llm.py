"""LLM quantization side by side: FP32, onnxruntime's quantizers and qcompile's recipes.

    python tools/bench_llm.py [--models smollm2,minilm,gpt_synth] [--runs 30] [--json-out FILE]
                              [--w8a8-guards 33,35] [--only TEXT,...]

Quantizers (each in its own process, for its own wall time and peak RSS):
    FP32                                 the export, untouched
    ORT quantize_dynamic INT8            onnxruntime.quantization.quantize_dynamic, its defaults
    ORT MatMulNBits RTN W4 b32 / b128    MatMulNBitsQuantizer(bits=4, block_size=B), its defaults (RTN)
    qcompile W8A8 + SmoothQuant          recipe w8a8-smoothquant (alpha searched per layer)
    qcompile W8 weight-only b128         recipe w8-weight-only (RTN)
    qcompile W4 weight-only GPTQ b128    recipe w4-weight-only (GPTQ)
    qcompile W4 weight-only AWQ b128     recipe w4-weight-only with --algorithm awq
    qcompile W4 GPTQ b128 + embeddings   recipe w4-weight-only with --include-lm-head --include-embeddings
                                         (SmolLM2, MiniLM: every weight in 4 bits, SmolLM2's tied table too)
    --w8a8-guards G,...                  extra W8A8 + SmoothQuant rows at other SQNR guards (dB), to
                                         see the accuracy / speed trade of the recipe's guard
    --only TEXT,...                      run only the rows whose label contains one of TEXT (and FP32)

Models: ``smollm2`` (perplexity on pydoc text; decode-step and seq-128 prefill latency), ``minilm``
(R@1, embedding cosine), ``gpt_synth`` at 168 M parameters (random weights: speed and cost only;
its LM head is untied and quantized by every quantizer, qcompile's included, since at decode it is
a third of the weight bytes). The decode step feeds one new token (sequence length 1, no KV cache):
every weight byte is read for one token, as in real decoding. Latency ratios are vs FP32, batch 1,
interleaved in one run on ONNX Runtime CPU. Calibration: real text for SmolLM2/MiniLM, random
tokens for gpt_synth; the same feeds for every quantizer that calibrates.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchlib import metric_cell, report, run_isolated, score, time_rows

GPT_168M = {"width": 768, "depth": 12, "heads": 12, "vocab": 50304, "max_seq": 1024}
SETUPS = {
    # name: (zoo entry, export options, calibration samples, timing shapes {label: dims})
    "smollm2": ("smollm2", {}, 32, {"decode": {"sequence": 1}, "prefill128": {"sequence": 128}}),
    "minilm": ("minilm", {}, 64, {}),
    "gpt_synth": ("gpt_synth", GPT_168M, 32, {"decode": {"sequence": 1}, "prefill128": {"sequence": 128}}),
}
QUANTIZERS = [
    # label, kind, argument
    ("FP32", None, None),
    ("ORT quantize_dynamic INT8", "ort-dynamic", None),
    ("ORT MatMulNBits RTN W4 b32", "ort-nbits", 32),
    ("ORT MatMulNBits RTN W4 b128", "ort-nbits", 128),
    ("qcompile W8A8 + SmoothQuant", "recipe", ("w8a8-smoothquant", {})),
    ("qcompile W8 weight-only b128", "recipe", ("w8-weight-only", {})),
    ("qcompile W4 weight-only GPTQ b128", "recipe", ("w4-weight-only", {})),
    ("qcompile W4 weight-only AWQ b128", "recipe", ("w4-weight-only", {"algorithm": "awq"})),
    ("qcompile W4 GPTQ b128 + embeddings", "recipe",
     ("w4-weight-only", {"include_lm_head": True, "include_embeddings": True})),
]
ONLY = {"qcompile W4 GPTQ b128 + embeddings": ("smollm2", "minilm")}  # rows not run on every model


def calibration_reader(name: str, samples: int):
    from qcompile.models import get_entry

    entry_name, options, _, _ = SETUPS[name]
    entry = get_entry(entry_name)
    if entry_name == "gpt_synth":
        return entry.calibration(samples, 128, options["vocab"])
    return entry.calibration(samples)


def quantize_with(kind: str, arg, name: str, src: str, dst: str, samples: int) -> None:
    """One quantizer on one model (runs in its own process)."""
    if kind == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    elif kind == "ort-nbits":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=arg)
        quantizer.process()
        quantizer.model.save_model_to_file(dst, use_external_data_format=False)
    else:
        import qcompile
        from qcompile.recipes import preset, run_recipe

        preset_name, overrides = arg
        recipe = preset(preset_name).with_(samples=samples, **overrides)
        if name == "gpt_synth" and recipe.kind == "weight-only":
            recipe = recipe.with_(include_lm_head=True)
        reader = calibration_reader(name, samples) if recipe.needs_calibration else None
        qcompile.save(run_recipe(src, recipe, reader).model, dst)


def measure(name: str, runs: int, workdir: Path, quantizers: list[tuple]) -> list[dict]:
    from qcompile.models import cached_export, get_entry

    entry_name, options, samples, shapes = SETUPS[name]
    entry = get_entry(entry_name)
    src = cached_export(entry, options)
    rows = []
    for i, (label, kind, arg) in enumerate(quantizers):
        if name not in ONLY.get(label, (name,)):
            continue
        row = {"model": name, "quantizer": label}
        path = src
        if kind is not None:
            path = workdir / f"{name}-{i}.onnx"
            row.update(run_isolated(quantize_with, kind, arg, name, str(src), str(path), samples))
            if row["error"]:
                rows.append(row)
                continue
        rows.append(score(row, entry, path, src))
        print(f"  {label}: {row.get('perplexity', row.get('r_at_1', ''))}", flush=True)
    time_rows(rows, runs, {shape: {"batch": 1, **dims} for shape, dims in shapes.items()})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| model | quantizer | metric | decode step vs FP32 | prefill 128 vs FP32 | model MB | quantize s "
           "| peak RSS MB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "—"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "—"
        if r.get("error"):
            out.append(f"| {r['model']} | {r['quantizer']} | **failed**: {r['error']} | | | | {secs} | {rss} |")
            continue
        metric = metric_cell(r)
        speed = lambda k: f"{r[k]:.2f}× ({r['median_ms_' + k[6:]]:.1f} ms)" if k in r else "—"  # noqa: E731
        out.append(f"| {r['model']} | {r['quantizer']} | {metric} | {speed('speed_decode')} "
                   f"| {speed('speed_prefill128')} "
                   f"| {r['bytes'] / 1e6:.0f} | {secs} | {rss} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,minilm,gpt_synth")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--w8a8-guards", default="", metavar="DB,...")
    parser.add_argument("--only", default="", metavar="TEXT,...")
    args = parser.parse_args()
    quantizers = list(QUANTIZERS)
    w8a8 = next(i for i, q in enumerate(quantizers) if q[2] == ("w8a8-smoothquant", {}))
    for db in reversed([float(g) for g in args.w8a8_guards.split(",") if g.strip()]):
        quantizers.insert(w8a8 + 1, (f"qcompile W8A8 + SmoothQuant, guard {db:g} dB", "recipe",
                                     ("w8a8-smoothquant", {"min_sqnr_db": db})))
    wanted = [t.strip() for t in args.only.split(",") if t.strip()]
    if wanted:
        quantizers = [q for q in quantizers if q[1] is None or any(t in q[0] for t in wanted)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in (n.strip() for n in args.models.split(",")):
            print(f"== {name}", flush=True)
            rows += measure(name, args.runs, Path(tmp), quantizers)
            print(markdown([r for r in rows if r["model"] == name]), flush=True)
    report(rows, markdown, args.json_out)


if __name__ == "__main__":
    main()
