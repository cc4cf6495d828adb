"""The KV cache of a fused decoder stored in FP16 or INT8 instead of FP32.

ONNX Runtime's ``GroupQueryAttention`` keeps its cache type (``T_CACHE``) apart from the type it
computes in: with FP32 queries it reads and writes an FP16 cache, or an INT8 one with scales
(``k_quant_type`` / ``v_quant_type`` "PER_CHANNEL", ``kv_cache_bit_width`` 8)::

    cache = clamp(round(x / s), -127, 127),  x ~ s * cache,
    s[h, d] = max |x[:, h, :, d]| / 127      per KV head h and channel d, over the calibration prompts

(keys are rotated before they are cached, so the scales are those of the rotated keys). Only the
cache's ``past_key_values.*`` inputs and ``present.*`` outputs change type; memory per token drops
from 2 * layers * kv_heads * head_dim * 4 bytes to * 2 (FP16) or * 1 (INT8).

The change is checked where it matters, on decode steps: each prompt is prefilled without its last
``STEPS`` tokens, which are then fed one step at a time (teacher forcing) through the FP32-cache
model and the converted one; the relative L2 error of the steps' logits is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np
import onnx_ir as ir

from qcompile import decoder, execute, specs
from qcompile.errors import InputSpecError
from qcompile.passes.irutil import add_initializer

KvCache = Literal["fp32", "fp16", "int8"]
#: The cache types, one source (the recipe's validation and the CLI's choices read it).
KV_CACHES: tuple[str, ...] = get_args(KvCache)
STEPS = 8  # teacher-forced decode steps per checked prompt
_DTYPES = {"fp16": (ir.DataType.FLOAT16, np.float16), "int8": (ir.DataType.INT8, np.int8)}


@dataclass(frozen=True)
class CacheChange:
    """What converting the cache did: bytes per token before and after, and the decode-step error."""

    dtype: str
    bytes_per_token_before: int
    bytes_per_token: int
    decode_rel_l2: float
    steps: int

    def note(self) -> str:
        return (f"KV cache in {self.dtype}: {self.bytes_per_token:,} bytes per token (FP32: "
                f"{self.bytes_per_token_before:,}); decode-step logits rel L2 {self.decode_rel_l2:.2e} against "
                f"the FP32 cache over {self.steps} teacher-forced steps")

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "bytes_per_token_before": self.bytes_per_token_before,
                "bytes_per_token": self.bytes_per_token, "decode_rel_l2": self.decode_rel_l2, "steps": self.steps}


def cache_attentions(model: ir.Model) -> list[ir.Node]:
    """The GroupQueryAttention nodes that read a ``past_key_values.*`` graph input, or InputSpecError
    when the model has a cache some other node reads (its attention is not fused)."""
    sig = decoder.signature(specs.input_specs(model))
    if sig is None:
        raise InputSpecError("--kv-cache needs a decoder with a KV cache (inputs past_key_values.{i}.key|value)",
                             fix="export it with a cache, e.g. `qcompile zoo export smollm2 --option cache=true`")
    nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"
             and all(v is not None and v.is_graph_input() for v in n.inputs[3:5])]
    read = {v.name for n in nodes for v in n.inputs[3:5]}
    if set(sig.past_names) - read:
        raise InputSpecError("--kv-cache needs every cache read by a fused GroupQueryAttention; this model's "
                             "attention is not fused", fix="quantize for an ort-* target without --quantize-attention")
    return nodes


def _step_logits(run, sig: decoder.CacheSignature, prompts: Sequence[np.ndarray]) -> tuple[np.ndarray, list]:
    """Logits of the last STEPS tokens of each prompt, fed one step at a time after a prefill of the
    rest; also the prefill outputs' presents (what the cache holds)."""
    logits, presents = [], []
    for prompt in prompts:
        tokens = np.asarray(prompt, dtype=np.int64).reshape(-1)
        prefill = len(tokens) - STEPS
        outputs = run(sig.complete({decoder.IDS: tokens[None, :prefill]}))
        presents.append({name: outputs[name] for name in sig.present_names})
        for i in range(prefill, len(tokens)):
            outputs = run(decoder.step_feed(sig, int(tokens[i]), outputs, i))
            logits.append(outputs["logits"][0, -1].astype(np.float64))
    return np.stack(logits), presents


def channel_scales(presents: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """INT8 scales per cache tensor: max |x| over batch and positions, per (KV head, channel), / 127,
    shaped [1, kv_heads, 1, head_dim] (broadcast over the cache, as GroupQueryAttention takes them)."""
    scales = {}
    for name in presents[0]:
        amax = np.max([np.abs(p[name]).max(axis=(0, 2)) for p in presents], axis=0)
        scales[name] = (np.maximum(amax, 1e-6) / 127.0).astype(np.float32)[None, :, None, :]
    return scales


def convert_cache(model: ir.Model, dtype: KvCache, prompts: Sequence[np.ndarray],
                  target: str = "ort-cpu") -> CacheChange | None:
    """Store ``model``'s KV cache in ``dtype`` (in place); ``prompts`` (token arrays longer than STEPS)
    give the INT8 scales and the check. None for fp32 (nothing to do)."""
    if dtype == "fp32":
        return None
    nodes = cache_attentions(model)
    prompts = [p for p in prompts if np.asarray(p).size > STEPS]
    if not prompts:
        raise InputSpecError(f"--kv-cache {dtype} needs prompts longer than {STEPS} tokens to set and check it",
                             fix="pass --calib with token sequences (e.g. zoo:smollm2), or --data")
    sig = decoder.signature(specs.input_specs(model))
    with execute.loaded(model, target) as runtime:
        reference, presents = _step_logits(runtime.run, sig, prompts)
    ir_type, np_type = _DTYPES[dtype]
    present_of = dict(zip(sig.past_names, sig.present_names))
    scales = channel_scales(presents) if dtype == "int8" else {}
    for node in nodes:
        for index in (3, 4):
            past = node.inputs[index]
            past.dtype = ir_type
            node.outputs[index - 2].dtype = ir_type
        if dtype == "int8":
            k_scale, v_scale = (add_initializer(model.graph, f"{node.name}_{kind}_scale",
                                                scales[present_of[node.inputs[i].name]])
                                for kind, i in (("k", 3), ("v", 4)))
            inputs = list(node.inputs) + [None] * (14 - len(node.inputs))
            inputs[12], inputs[13] = k_scale, v_scale
            _set_inputs(node, inputs)
            for key in ("k_quant_type", "v_quant_type"):
                node.attributes[key] = ir.AttrString(key, "PER_CHANNEL")
            node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 8)
    with execute.loaded(model, target) as runtime:
        got, _ = _step_logits(runtime.run, decoder.signature(specs.input_specs(model)), prompts)
    error = float(np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-30))
    before = sig.bytes_per_token() or 0
    return CacheChange(dtype, before, before * np.dtype(np_type).itemsize // sig.dtype.itemsize, error,
                       len(reference))


def _set_inputs(node: ir.Node, inputs: list[ir.Value | None]) -> None:
    """Give ``node`` the longer input list (onnx-ir nodes take new inputs by index up to their count)."""
    node.resize_inputs(len(inputs))
    for i, value in enumerate(inputs):
        if node.inputs[i] is not value:
            node.replace_input_with(i, value)
