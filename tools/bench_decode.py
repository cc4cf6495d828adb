"""KV-cache decoding side by side: qcompile's models against ONNX Runtime GenAI's builder's.

    python tools/bench_decode.py [--models smollm2,gpt_synth] [--prompt 128] [--new 128] [--rounds 5]
                                 [--threads 2] [--loops genai,ort] [--only TEXT,...] [--workdir DIR]
                                 [--json-out FILE]

Every model is written as a user would write it — `qcompile zoo export … --option cache=true`, then
`qcompile optimize` / `qcompile quantize` (each writes its genai_config.json), and the builder
(`python -m onnxruntime_genai.models.builder -i HF_FOLDER -e cpu`, offline, on the zoo's own
SmolLM2 weights saved as a Hugging Face folder) — each in its own process. Then, in one process,
every model of a zoo entry decodes the same random 128-token prompt greedily, interleaved in rounds
(one warm-up generation each), in each loop of ``--loops``: ``genai`` (ONNX Runtime GenAI's loop,
what the builder's numbers are measured in) and ``ort`` (qcompile's InferenceSession step loop,
spin-waiting off). Perplexity (SmolLM2): the zoo's evaluator, pydoc text, 512-token windows, the
same for every row. Peak RSS: a fresh process that loads the model and generates 32 tokens.

SmolLM2 rows (builder precision in brackets):
    FP32 export            the zoo's torch export with the cache, unoptimised        [fp32]
    qcompile FP32          `qcompile optimize` (GQA + RotaryEmbedding + skip-norm fusions)
    qcompile W8 b32        w8-weight-only, block 32, LM head too                     [int8]
    qcompile W4 GPTQ b32 sym    w4-weight-only GPTQ (128 samples), block 32, symmetric: the builder's layout
                           (embeddings and LM head in 4 bits, the tied table stored once)   [int4]
    qcompile W4 GPTQ b32 asym   w4-weight-only GPTQ (64 samples), block 32, asymmetric, embeddings and the
                           LM head in 4 bits (tied: one set of codes and zero points)  [int4]
    ... INT8 KV            the same with the KV cache in INT8 (per-channel scales; 4x less per token)
    qcompile W4 GPTQ b128 asym  the same at block 128                            [int4 block_size=128]
    qcompile W4 GPTQ b128 sym head b32   symmetric, 128 samples, block 128, head (and tied table) in blocks of 32
    ... asym head b32      block 128, asymmetric, the LM head (and the tied table) in blocks of 32, 128 GPTQ samples
    qcompile W4 GPTQ b128  block 128, symmetric, head (and tied table) in 8 bits  [int4 block_size=128]
    qcompile W8A8 + SQ budget 1.5%   w8a8-smoothquant on the fused cache model, what stays float searched
                           against a 1.5 % perplexity budget on held-out text (the target: 15.5 = FP32 + 1.6 %)
gpt_synth (168 M, random weights: speed only): FP32 export, qcompile FP32, qcompile W4 RTN b32 and b128.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GPT_168M = ["width=768", "depth=12", "heads=12", "vocab=50304", "max_seq=1024"]
W4 = ["--recipe", "w4-weight-only", "--include-lm-head", "--include-embeddings"]
W4_ASYM = [*W4, "--asymmetric", "--samples", "64"]  # zero points (shared by the tied table), 64 GPTQ samples
ROWS = {
    # model: [(label, how, arguments)]; how: export | optimize | quantize | builder
    "smollm2": [
        ("FP32 export", "export", []),
        ("qcompile FP32", "optimize", []),
        ("qcompile W8 b32", "quantize", ["--recipe", "w8-weight-only", "--block-size", "32", "--include-lm-head"]),
        ("qcompile W4 GPTQ b32 sym", "quantize", [*W4, "--samples", "128", "--block-size", "32"]),
        ("qcompile W4 GPTQ b32 asym", "quantize", [*W4_ASYM, "--block-size", "32"]),
        ("qcompile W4 GPTQ b32 asym INT8 KV", "quantize", [*W4_ASYM, "--block-size", "32", "--kv-cache", "int8"]),
        ("qcompile W4 GPTQ b128 asym", "quantize", [*W4_ASYM, "--block-size", "128"]),
        ("qcompile W4 GPTQ b128 asym head b32", "quantize", [*W4, "--asymmetric", "--samples", "128", "--block-size",
                                                            "128", "--lm-head-block", "32"]),
        ("qcompile W4 GPTQ b128 sym head b32", "quantize", [*W4, "--samples", "128", "--block-size", "128",
                                                           "--lm-head-block", "32"]),
        ("qcompile W4 GPTQ b128", "quantize", [*W4, "--block-size", "128", "--lm-head-bits", "8"]),
        ("qcompile W8A8 + SQ budget 1.5%", "quantize", ["--recipe", "w8a8-smoothquant", "--accuracy-budget", "0.015",
                                                      "--metric", "perplexity"]),
        ("builder fp32", "builder", ["-p", "fp32"]),
        ("builder int8", "builder", ["-p", "int8"]),
        ("builder int4", "builder", ["-p", "int4"]),
        ("builder int4 b128", "builder", ["-p", "int4", "--extra_options", "block_size=128"]),
    ],
    "gpt_synth": [
        ("FP32 export", "export", []),
        ("qcompile FP32", "optimize", []),
        ("qcompile W4 RTN b32", "quantize", ["--recipe", "w4-weight-only", "--algorithm", "rtn", "--block-size", "32",
                                             "--include-lm-head"]),
        ("qcompile W4 RTN b128", "quantize", ["--recipe", "w4-weight-only", "--algorithm", "rtn", "--block-size",
                                              "128", "--include-lm-head"]),
    ],
}
EXPORT_OPTIONS = {"smollm2": ["cache=true"], "gpt_synth": ["cache=true", *GPT_168M]}
CALIBRATION = {"smollm2": "zoo:smollm2", "gpt_synth": "random"}


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                              "TRANSFORMERS_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}; see {log}")


def build(model: str, rows: list[tuple], workdir: Path) -> list[dict]:
    """Write every row's model into its own folder (skipped when already there)."""
    qcompile = [sys.executable, "-m", "qcompile"]
    folder = workdir / model
    export = folder / "fp32-export" / "model.onnx"
    built = []
    for label, how, args in rows:
        out = folder / label.lower().replace(" ", "-").replace("+", "") / "model.onnx"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            log = out.parent / "build.log"
            options = [x for o in EXPORT_OPTIONS[model] for x in ("--option", o)]
            if how == "export":
                run([*qcompile, "zoo", "export", model, *options, "-o", str(out)], log)
            elif how == "optimize":
                run([*qcompile, "optimize", str(export), "-o", str(out)], log)
            elif how == "quantize":
                fused = folder / "qcompile-fp32" / "model.onnx"
                run([*qcompile, "quantize", str(fused), *args, "--calib", CALIBRATION[model], "-o", str(out)], log)
            else:
                from qcompile.models import smollm2

                run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(smollm2.hf_folder()),
                     "-o", str(out.parent), "-e", "cpu", "-c", str(workdir / "builder-cache"), *args], log)
        built.append({"model": model, "row": label, "path": str(out),
                      "mb": sum(p.stat().st_size for p in out.parent.glob("model.onnx*")) / 1e6})
    return built


def peak_rss(path: str, prompt: int, threads: int) -> float:
    """Peak RSS (MB) of a fresh process that loads the model and greedily generates 32 tokens."""
    code = ("import resource, sys, numpy as np\n"
            "from qcompile.decode_bench import DecodeSettings, ort_loop, prompt_tokens\n"
            f"s = DecodeSettings(prompt={prompt}, new_tokens=32, threads={threads})\n"
            f"with ort_loop({path!r}, s) as gen: gen(prompt_tokens(s, 1000), 32)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def perplexity(path: str) -> float:
    code = (f"from qcompile.models import smollm2\nprint(smollm2.evaluate({path!r})['perplexity'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], loops: list[str]) -> str:
    head = "| model | row | " + " | ".join(f"{loop}: prefill ms | {loop}: decode tok/s" for loop in loops)
    head += " | perplexity | MB | KV bytes/token | peak RSS MB | greedy = FP32 export |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = []
        for loop in loops:
            t = r.get(loop)
            cells += [f"{t['prefill_ms']:.0f}", f"{t['decode_tokens_per_s']:.1f}"] if t else ["—", "—"]
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") else "—"
        timed = r.get("genai") or r.get("ort") or {}
        same, per_token = timed.get("tokens_match_first"), timed.get("kv_bytes_per_token")
        out.append(f"| {r['model']} | {r['row']} | " + " | ".join(cells) +
                   f" | {ppl} | {r['mb']:.0f} | {'—' if per_token is None else f'{per_token:,}'} | "
                   f"{r['peak_rss_mb']:.0f} | {'yes' if same else 'no'} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gpt_synth")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loops", default="genai,ort")
    parser.add_argument("--only", default="", help="rows whose label contains one of these (and FP32 export)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    from qcompile.decode_bench import DecodeSettings, decode_models
    from qcompile.targets.ort_cpu.kernel_probe import cpu_signature

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-decode-"))
    loops = [loop for loop in args.loops.split(",") if loop]
    only = [x for x in args.only.split(",") if x]
    settings = DecodeSettings(prompt=args.prompt, new_tokens=args.new, rounds=args.rounds, threads=args.threads)
    results = []
    for model in args.models.split(","):
        rows = [r for r in ROWS[model] if not only or r[0] == "FP32 export" or any(o in r[0] for o in only)]
        built = build(model, rows, workdir)
        for row in built:
            row["peak_rss_mb"] = peak_rss(row["path"], args.prompt, args.threads)
            if model == "smollm2":
                row["perplexity"] = perplexity(row["path"])
            print(f"  {model} {row['row']}: {row['mb']:.0f} MB, PPL {row.get('perplexity', '—')}", flush=True)
        for loop in loops:
            try:
                report = decode_models([r["path"] for r in built], settings, labels=[r["row"] for r in built],
                                       loops=[loop] * len(built))
            except Exception as exc:  # a loop that cannot run these models is a result, not the tool's failure
                print(f"  {model}: the {loop} loop failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            for row, result in zip(built, report["results"]):
                row[loop] = result
        results += built
    print(f"\n{cpu_signature()}; prompt {args.prompt}, {args.new} greedy new tokens, batch 1, {args.threads} threads, "
          f"{args.rounds} interleaved rounds (medians)\n")
    print(markdown(results, loops))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
