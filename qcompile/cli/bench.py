"""`qcompile bench`: models timed side by side."""

from __future__ import annotations

import click
from rich.table import Table

from qcompile import decoder, modelio, specs
from qcompile.cli.common import (
    data_feeds,
    data_option,
    emit_json,
    handle_errors,
    resolve_model,
    stdout,
    with_shape_options,
)
from qcompile.decode_bench import LOOPS


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--target", default="ort-cpu", show_default=True,
              help="Target (its serving runtime: tensorrt, ort-trt, ort-cuda, migraphx, ...) or runtime to time on.")
@with_shape_options
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs first.")
@click.option("--min-time", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Keep timing at least this many seconds.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: runtime's).")
@data_option
@click.option("--decode", "decode", type=click.IntRange(min=1), default=None, metavar="NEW",
              help="KV-cache decoders: greedily generate NEW tokens after a --prompt; report prefill ms and "
                   "decode tokens/s (interleaved rounds: --runs, default 3 here).")
@click.option("--prompt", "prompt", type=click.IntRange(min=1), default=128, show_default=True,
              help="With --decode: prompt length in tokens.")
@click.option("--loop", "loop", type=click.Choice(LOOPS), default="ort", show_default=True,
              help="With --decode: qcompile's step loop on ONNX Runtime, or ONNX Runtime GenAI's (genai_config.json).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON on stdout.")
@handle_errors
def bench(models, target, batch, seq, dims, runs, warmup, min_time, threads, data, decode, prompt, loop, as_json):
    """Time MODELS (paths or zoo:NAME) side by side on the same feed; ratios vs the first."""
    from qcompile.bench import BenchSettings, bench_models

    if decode is not None:
        _bench_decode(models, target, threads, decode, prompt, loop,
                      runs if click.get_current_context().get_parameter_source("runs").name != "DEFAULT" else 3,
                      as_json)
        return
    paths = [resolve_model(m) for m in models]
    settings = BenchSettings(target=target, batch=batch, seq=seq, dims=specs.parse_dims(dims), runs=runs,
                             warmup=warmup, min_time_s=min_time, threads=threads)
    feeds = data_feeds(data, modelio.load(paths[0]), limit=1)
    report = bench_models(paths, settings, labels=list(models), feed=feeds[0] if feeds else None)
    if as_json:
        emit_json(report)
        return
    table = Table("model", "median ms", "p90 ms", "min ms", "mean ± sd ms", "items/s", "speed vs first")
    for r in report["results"]:
        table.add_row(r["name"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['min_ms']:.3f}",
                      f"{r['mean_ms']:.3f} ± {r['stdev_ms']:.3f}", f"{r['throughput']:.1f}",
                      f"{r['speedup_vs_baseline']:.3f}×")
    stdout.print(table)
    shapes = decoder.describe_shapes(report["feed_shapes"])
    stdout.print(f"target {target}; feed {shapes}; {runs} interleaved runs after {warmup} warm-up")


def _bench_decode(models, target, threads, new_tokens, prompt, loop, rounds, as_json) -> None:
    from qcompile.decode_bench import DecodeSettings, decode_models

    paths = [resolve_model(m) for m in models]
    settings = DecodeSettings(prompt=prompt, new_tokens=new_tokens, rounds=rounds, threads=threads, target=target)
    report = decode_models(paths, settings, labels=list(models), loops=[loop] * len(paths))
    if as_json:
        emit_json(report)
        return
    table = Table("model", "prefill ms", "decode tok/s", "KV bytes/token", "tokens = first's")
    for r in report["results"]:
        per_token = r["kv_bytes_per_token"]
        table.add_row(r["name"], f"{r['prefill_ms']:.1f}", f"{r['decode_tokens_per_s']:.1f}",
                      "—" if per_token is None else f"{per_token:,}", "yes" if r["tokens_match_first"] else "NO")
    stdout.print(table)
    stdout.print(f"{loop} loop on {target}; prompt {prompt}, {new_tokens} greedy new tokens, batch 1; "
                 f"{rounds} interleaved rounds after a warm-up (medians)")
