"""Decoders with a KV cache: the signature read off the graph, consistent feeds, greedy generation.

The form Hugging Face / Optimum exports (and ONNX Runtime GenAI's builder) write::

    input_ids       int64 [batch, seq]
    attention_mask  int64 [batch, past + seq]            (optional)
    position_ids    int64 [batch, seq] = past .. past+seq-1   (optional)
    past_key_values.{i}.key|value  [batch, kv_heads, past, head_dim]
      -> logits [batch, seq, vocab], present.{i}.key|value [batch, kv_heads, past + seq, head_dim]

Step t feeds step t-1's ``present`` as its ``past``. A prefill is a step with past = 0 (empty
tensors), so every prompt-only metric (perplexity, calibration) runs on a cache model once its
feed is *completed*: empty past, positions 0..seq-1, a mask of ones. Random feeds get a mask and
positions consistent with the past length they were given, or the model cannot run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from qcompile.errors import InputSpecError

if TYPE_CHECKING:
    from qcompile.specs import InputSpec

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT_NAME = "present.{layer}.{kind}"
IDS, MASK, POSITIONS = "input_ids", "attention_mask", "position_ids"
GENAI_CONFIG = "genai_config.json"
#: Cache axes: [batch, kv_heads, length, head_dim].
LENGTH_AXIS = 2

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class CacheSignature:
    """The cache inputs of a decoder: ``layers`` (key, value) pairs and their per-token shape."""

    layers: int
    kv_heads: int | None
    head_dim: int | None
    dtype: np.dtype
    inputs: frozenset[str]

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [PRESENT_NAME.format(layer=i, kind=kind) for i in range(self.layers) for kind in ("key", "value")]

    def bytes_per_token(self) -> int | None:
        """KV-cache bytes one token adds (all layers, batch 1): 2 * layers * kv_heads * head_dim * itemsize."""
        if self.kv_heads is None or self.head_dim is None:
            return None
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def past_length(self, feed: Mapping[str, np.ndarray]) -> int:
        first = feed.get(self.past_names[0])
        return 0 if first is None else int(np.shape(first)[LENGTH_AXIS])

    def empty_past(self, batch: int, *, head_dim: int | None = None, kv_heads: int | None = None) -> Feed:
        heads, dim = kv_heads or self.kv_heads, head_dim or self.head_dim
        if heads is None or dim is None:
            raise ValueError("the cache's kv_heads/head_dim are symbolic; pass them")
        return {name: np.zeros((batch, heads, 0, dim), dtype=self.dtype) for name in self.past_names}

    def complete(self, feed: Mapping[str, np.ndarray]) -> Feed:
        """``feed`` with what a prompt-only feed lacks: an empty past, positions past..past+seq-1 and
        a mask of ones over past + seq. Inputs the feed has are kept."""
        out = dict(feed)
        ids = out.get(IDS)
        if ids is None:
            return out
        batch, seq = ids.shape[0], ids.shape[1]
        if not any(name in out for name in self.past_names) and self.kv_heads and self.head_dim:
            out.update(self.empty_past(batch))
        past = self.past_length(out)
        if MASK in self.inputs and MASK not in out:
            out[MASK] = np.ones((batch, past + seq), dtype=np.int64)
        if POSITIONS in self.inputs and POSITIONS not in out:
            out[POSITIONS] = positions(out.get(MASK), batch, past, seq)
        return out

    def fit(self, feed: Mapping[str, np.ndarray]) -> Feed:
        """A random feed made consistent: mask of ones over past + seq, positions after the past."""
        out = dict(feed)
        ids = out.get(IDS)
        if ids is None:
            return out
        batch, seq, past = ids.shape[0], ids.shape[1], self.past_length(out)
        if MASK in self.inputs:
            out[MASK] = np.ones((batch, past + seq), dtype=out.get(MASK, np.ones(1, np.int64)).dtype)
        if POSITIONS in self.inputs:
            out[POSITIONS] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
        return out


def positions(mask: np.ndarray | None, batch: int, past: int, seq: int) -> np.ndarray:
    """Position ids of the new tokens: the running count of attended tokens (left padding skips
    positions), or past..past+seq-1 without a mask."""
    if mask is None:
        return np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
    counted = np.cumsum(mask.astype(np.int64), axis=1) - 1
    return np.maximum(counted[:, -seq:], 0)


def signature(input_specs: Sequence[InputSpec]) -> CacheSignature | None:
    """The cache signature when the inputs are a decoder's with a KV cache, else None."""
    by_name = {spec.name: spec for spec in input_specs}
    pairs: dict[int, set[str]] = {}
    for name in by_name:
        match = PAST.match(name)
        if match:
            pairs.setdefault(int(match.group(1)), set()).add(match.group(2))
    if not pairs or IDS not in by_name:
        return None
    layers = max(pairs) + 1
    if sorted(pairs) != list(range(layers)) or any(kinds != {"key", "value"} for kinds in pairs.values()):
        return None
    first = by_name["past_key_values.0.key"]
    shape = first.shape

    def static(axis: int) -> int | None:
        return shape[axis] if len(shape) == 4 and isinstance(shape[axis], int) else None

    return CacheSignature(layers, static(1), static(3), np.dtype(first.dtype), frozenset(by_name))


def signature_of(path: str | Path) -> CacheSignature:
    """The cache signature of a model file (symbolic kv_heads / head_dim filled from a
    genai_config.json beside it), or InputSpecError (exit 2) when the model has no KV cache."""
    from qcompile import modelio, specs

    sig = signature(specs.input_specs(modelio.load(path, check=False)))
    if sig is None:
        raise InputSpecError("the model has no KV cache (inputs past_key_values.{i}.key|value)", where=str(path),
                             fix="export it with a cache, e.g. `qcompile zoo export smollm2 --option cache=true`")
    if sig.head_dim is not None and sig.kv_heads is not None:
        return sig
    config_path = Path(path).parent / GENAI_CONFIG
    if not config_path.is_file():
        raise InputSpecError("the KV cache's head count or size is symbolic and no genai_config.json says it",
                             where=str(path), fix="give the cache inputs static head dims")
    dec = json.loads(config_path.read_text())["model"]["decoder"]
    return dataclasses.replace(sig, kv_heads=sig.kv_heads or int(dec["num_key_value_heads"]),
                               head_dim=sig.head_dim or int(dec["head_size"]))


def complete(input_specs: Sequence[InputSpec], feed: Mapping[str, np.ndarray]) -> Feed:
    """``feed`` completed for a cache decoder (see :meth:`CacheSignature.complete`); unchanged otherwise."""
    sig = signature(input_specs)
    return sig.complete(feed) if sig else dict(feed)


@dataclass
class Generation:
    """A greedy generation: the new tokens and the time of each model call (seconds)."""

    tokens: list[int]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the decode steps (every new token after the prefill's)."""
        total = sum(self.step_s)
        return len(self.step_s) / total if total > 0 else float("nan")


def greedy(
    run: Callable[[Feed], Mapping[str, np.ndarray]],
    sig: CacheSignature,
    prompt: np.ndarray,
    new_tokens: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> Generation:
    """Greedy decoding through a cache model: one prefill over ``prompt`` [1, seq], then one step
    per further token, each step feeding the last ``present`` back as ``past``.

    ``run(feed)`` returns the outputs by name (``logits`` and every ``present.*``)."""
    prompt = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
    feed = sig.complete({IDS: prompt})
    start = clock()
    outputs = run(feed)
    prefill = clock() - start
    token = int(np.argmax(outputs["logits"][0, -1]))
    result = Generation([token], prefill)
    length = prompt.shape[1]
    for _ in range(new_tokens - 1):
        step = step_feed(sig, token, outputs, length)
        start = clock()
        outputs = run(step)
        result.step_s.append(clock() - start)
        token = int(np.argmax(outputs["logits"][0, -1]))
        result.tokens.append(token)
        length += 1
    return result


def step_feed(sig: CacheSignature, token: int, outputs: Mapping[str, np.ndarray], length: int) -> Feed:
    """One decode step's feed (batch 1): ``token`` at position ``length``, the last step's ``present``
    as ``past``, a mask over the ``length + 1`` tokens."""
    step: Feed = {IDS: np.array([[token]], dtype=np.int64)}
    step.update({past: outputs[present] for past, present in zip(sig.past_names, sig.present_names)})
    if MASK in sig.inputs:
        step[MASK] = np.ones((1, length + 1), dtype=np.int64)
    if POSITIONS in sig.inputs:
        step[POSITIONS] = np.array([[length]], dtype=np.int64)
    return step


def describe_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    """Feed shapes for a message, a KV cache's 2 x layers inputs folded into one entry."""
    past = [name for name in shapes if PAST.match(name)]
    rest = {name: list(shape) for name, shape in shapes.items() if name not in past}
    text = ", ".join(f"{name} {shape}" for name, shape in rest.items())
    if past:
        text += f", {len(past)} cache inputs {list(shapes[past[0]])}"
    return text
