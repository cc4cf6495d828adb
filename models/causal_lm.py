"""Decoder exports with a KV cache, named as Hugging Face / Optimum exports name them.

    (input_ids [b, s], attention_mask [b, past+s], position_ids [b, s], past_key_values.{i}.key|value
     [b, kv_heads, past, head_dim]) -> (logits [b, s, vocab], present.{i}.key|value [b, kv_heads, past+s, head_dim])

The trace runs with past = 3 and s = 2 so that neither length is specialised; the exported graph
takes any past (0 for a prefill) and any s. A ``qcompile.decoder`` metadata entry records what a
generation loop needs and the graph cannot say (heads, hidden size, token ids, model type).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qcompile.models.base import require, torch_export

#: Metadata key of the decoder facts (JSON) written into a cache export.
DECODER_METADATA = "qcompile.decoder"
TRACE_PAST, TRACE_SEQ = 3, 2
#: The input names qcompile/decoder.py reads (the Hugging Face / Optimum form).
IDS, MASK, POSITIONS = "input_ids", "attention_mask", "position_ids"


def io_names(layers: int) -> tuple[list[str], list[str]]:
    inputs = [IDS, MASK, POSITIONS] + [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    return inputs, outputs


def dynamic_axes(layers: int) -> dict[str, dict[int, str]]:
    inputs, outputs = io_names(layers)
    axes = {IDS: {0: "batch_size", 1: "sequence_length"}, MASK: {0: "batch_size", 1: "total_sequence_length"},
            POSITIONS: {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in inputs[3:]})
    axes.update({name: {0: "batch_size", 2: "total_sequence_length"} for name in outputs[1:]})
    return axes


def trace_args(layers: int, kv_heads: int, head_dim: int, vocab: int) -> tuple:
    torch = require("torch")
    ids = torch.randint(0, vocab, (1, TRACE_SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, TRACE_PAST + TRACE_SEQ, dtype=torch.int64)
    positions = torch.arange(TRACE_PAST, TRACE_PAST + TRACE_SEQ).unsqueeze(0)
    past = [torch.zeros(1, kv_heads, TRACE_PAST, head_dim) for _ in range(2 * layers)]
    return (ids, mask, positions, *past)


def export_cached(module, path: Path, *, layers: int, kv_heads: int, head_dim: int, vocab: int,
                  facts: dict[str, Any], exporter: str = "torchscript") -> None:
    """Export ``module(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``."""
    inputs, outputs = io_names(layers)
    torch_export(module, trace_args(layers, kv_heads, head_dim, vocab), path, inputs, outputs,
                 dynamic_axes(layers), exporter=exporter)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = DECODER_METADATA, json.dumps(facts, sort_keys=True)
    onnx.save(model, str(path))


def export_hf(model, path: Path, *, exporter: str = "torchscript", tokenizer_folder: Path | None = None) -> None:
    """A Hugging Face causal LM (eager attention) exported with its KV cache, the facts from its config."""
    torch = require("torch")
    transformers = require("transformers")
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    class CacheWrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = transformers.DynamicCache(config=config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    eos = config.eos_token_id if config.eos_token_id is not None else 0
    facts = {"type": config.model_type, "num_attention_heads": heads, "num_key_value_heads": config.num_key_value_heads,
             "num_hidden_layers": layers, "hidden_size": config.hidden_size, "head_size": head_dim,
             "vocab_size": config.vocab_size, "context_length": config.max_position_embeddings,
             "bos_token_id": config.bos_token_id if config.bos_token_id is not None else eos, "eos_token_id": eos,
             "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos}
    if tokenizer_folder is not None:
        facts["tokenizer_folder"] = str(tokenizer_folder)
    export_cached(CacheWrapper(model.eval()), path, layers=layers, kv_heads=config.num_key_value_heads,
                  head_dim=head_dim, vocab=config.vocab_size, facts=facts, exporter=exporter)
