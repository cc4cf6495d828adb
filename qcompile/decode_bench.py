"""Decode benchmark of KV-cache decoders, side by side: prefill latency, decode tokens/s, memory.

Each model greedily generates ``new_tokens`` after the same ``prompt`` (batch 1), in rounds that
interleave the models (round r runs every model once), after one warm-up generation each. Per
model: the median prefill (the prompt's one call) in ms, the median decode rate
``(new_tokens - 1) / sum(step times)`` in tokens/s, the KV cache's bytes per token and at the end,
and the greedy tokens (of the first round), compared with the first model's.

Two loops run a model: ``ort`` — qcompile's own step loop on an ONNX Runtime session (``threads``
intra-op threads; spin-waiting off unless ``spin_wait``), feeding each ``present`` back as ``past``;
``genai`` — ONNX Runtime GenAI's generation loop (``og.Model(folder)``), for a model whose folder
holds a ``genai_config.json`` (the builder's models, and what qcompile writes beside a decoder);
its session options cannot turn spin-waiting off, so it runs with ORT's default (on). Compare
models within one loop.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from qcompile import decoder, execute, modelio, specs
from qcompile.errors import DependencyError, InputSpecError
from qcompile.runtimes import RuntimeOptions

LOOPS = ("ort", "genai")
GENAI_CONFIG = decoder.GENAI_CONFIG


@dataclass(frozen=True)
class DecodeSettings:
    prompt: int = 128
    new_tokens: int = 128
    rounds: int = 3
    threads: int | None = None
    target: str = "ort-cpu"
    seed: int = 0
    spin_wait: bool = False


Generate = Callable[[np.ndarray, int], decoder.Generation]


@contextlib.contextmanager
def ort_loop(path: str | Path, settings: DecodeSettings) -> Iterator[Generate]:
    sig = decoder.signature_of(path)
    options = RuntimeOptions(threads=settings.threads, spin_wait=settings.spin_wait)
    with execute.loaded(str(path), settings.target, options) as runtime:
        yield lambda prompt, new: decoder.greedy(runtime.run, sig, prompt, new)


@contextlib.contextmanager
def genai_loop(path: str | Path, settings: DecodeSettings) -> Iterator[Generate]:
    """ONNX Runtime GenAI's greedy loop on the model's folder (its genai_config.json)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise DependencyError("the genai loop needs onnxruntime-genai",
                              fix="pip install --no-deps onnxruntime-genai (see README: setup)") from None
    folder = Path(path).parent
    if not (folder / GENAI_CONFIG).is_file():
        raise InputSpecError("no genai_config.json beside the model", where=str(folder),
                             fix="write the model with qcompile (it writes one) or use --loop ort")
    config = og.Config(str(folder))
    if settings.threads:
        # GenAI's session options cannot turn ORT's spin-waiting off: its loop runs with ORT's default (on)
        threads = {"intra_op_num_threads": settings.threads}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)

    def generate(prompt: np.ndarray, new: int) -> decoder.Generation:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt.astype(np.int32))
        generator.generate_next_token()
        result = decoder.Generation([int(generator.get_next_tokens()[0])], time.perf_counter() - start)
        while len(result.tokens) < new and not generator.is_done():
            start = time.perf_counter()
            generator.generate_next_token()
            result.step_s.append(time.perf_counter() - start)
            result.tokens.append(int(generator.get_next_tokens()[0]))
        return result

    yield generate


LOOP_FACTORIES = {"ort": ort_loop, "genai": genai_loop}


def prompt_tokens(settings: DecodeSettings, vocab: int | None) -> np.ndarray:
    rng = np.random.default_rng(settings.seed)
    return rng.integers(1, min(vocab or 1000, 1000), size=(1, settings.prompt), dtype=np.int64)


def decode_models(paths: Sequence[str | Path], settings: DecodeSettings, labels: Sequence[str] | None = None,
                  loops: Sequence[str] | None = None, prompt: np.ndarray | None = None) -> dict:
    """Every model (with its loop: ``loops[i]``, default ort) generating in interleaved rounds."""
    labels = list(labels or [str(p) for p in paths])
    loops = list(loops or ["ort"] * len(paths))
    for loop in loops:
        if loop not in LOOPS:
            raise InputSpecError(f"unknown decode loop {loop!r}", fix=f"use one of: {', '.join(LOOPS)}")
    sigs = [decoder.signature_of(p) for p in paths]
    if prompt is None:
        prompt = prompt_tokens(settings, specs.input_specs(modelio.load(paths[0], check=False))[0].int_high)
    runs: dict[str, list[decoder.Generation]] = {label: [] for label in labels}
    with contextlib.ExitStack() as stack:
        generators = [stack.enter_context(LOOP_FACTORIES[loop](path, settings)) for path, loop in zip(paths, loops)]
        for generate in generators:
            generate(prompt, min(8, settings.new_tokens))  # warm-up: allocations, kernel choice
        for _ in range(settings.rounds):
            for label, generate in zip(labels, generators):
                runs[label].append(generate(prompt, settings.new_tokens))
    first_tokens = runs[labels[0]][0].tokens
    results = []
    for label, path, loop, sig in zip(labels, paths, loops, sigs):
        gens = runs[label]
        per_token = sig.bytes_per_token()
        results.append({
            "name": label, "path": str(path), "loop": loop,
            "prefill_ms": statistics.median(g.prefill_s for g in gens) * 1000.0,
            "decode_tokens_per_s": statistics.median(g.decode_tokens_per_s for g in gens),
            "kv_bytes_per_token": per_token,
            "kv_bytes_at_end": None if per_token is None else per_token * (settings.prompt + settings.new_tokens),
            "tokens": gens[0].tokens,
            "tokens_match_first": gens[0].tokens == first_tokens,
        })
    return {"prompt": settings.prompt, "new_tokens": settings.new_tokens, "rounds": settings.rounds,
            "threads": settings.threads, "target": settings.target, "baseline": labels[0], "results": results}
