"""``genai_config.json`` beside a KV-cache decoder, so ONNX Runtime GenAI runs it unchanged.

The config is the input folder's own when it has one (ONNX Runtime GenAI's builder wrote it, or
the user), with ``filename`` pointed at the written model and the input/output names and cache
mode set from the graph; otherwise it is generated from the graph (layers, KV heads, head size,
vocabulary) and the decoder facts a qcompile export records (``qcompile.decoder`` metadata: model
type, attention heads, hidden size, context length, token ids). Tokenizer files are copied
from the input's folder or the recorded tokenizer folder when present.

``past_present_share_buffer`` is true where every ``present`` comes from ``GroupQueryAttention``
(the fused graph: it writes the new tokens into a max-length past buffer in place, so GenAI's loop
copies no cache per step), false for a graph whose ``present`` is a Concat of past and new (the
export as it is). qcompile's own step loop feeds a growing past either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qcompile import decoder, modelio, specs

CONFIG = decoder.GENAI_CONFIG
DECODER_METADATA = "qcompile.decoder"
#: Model types whose ONNX Runtime GenAI decoder reads the Hugging Face cache I/O above; any other
#: decoder (GPT-2's own type expects other inputs) is written as "llama", GenAI's generic decoder.
GENAI_TYPES = frozenset({"llama", "mistral", "phi3", "qwen2", "gemma", "granite", "olmo", "nemotron"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


def facts(model: ir.Model) -> dict[str, Any]:
    raw = model.metadata_props.get(DECODER_METADATA)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def _vocab(model: ir.Model) -> int | None:
    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    dim = None if logits is None or logits.shape is None else logits.shape[-1]
    return dim if isinstance(dim, int) else None


def _shares_buffer(model: ir.Model) -> bool:
    """Every ``present`` is written by GroupQueryAttention, which takes a past buffer of the maximum
    length and writes the new tokens into it in place (GenAI's shared-buffer mode)."""
    presents = [v for v in model.graph.outputs if v.name.startswith("present.")]
    return bool(presents) and all(
        v.producer() is not None and v.producer().op_type == "GroupQueryAttention"
        and v.producer().domain == "com.microsoft" for v in presents)


def config_for(model: ir.Model, source_folder: Path | None, filename: str) -> dict | None:
    """The genai config for ``model`` written as ``filename``; None when it has no KV cache."""
    sig = decoder.signature(specs.input_specs(model))
    if sig is None:
        return None
    source = None if source_folder is None else source_folder / CONFIG
    if source is not None and source.is_file():
        config = json.loads(source.read_text())
    else:
        known = facts(model)
        heads = known.get("num_attention_heads") or sig.kv_heads
        config = {
            "model": {
                "type": known.get("type") if known.get("type") in GENAI_TYPES else "llama",
                "vocab_size": known.get("vocab_size") or _vocab(model),
                "context_length": known.get("context_length", 2048),
                "bos_token_id": known.get("bos_token_id", 1), "eos_token_id": known.get("eos_token_id", 2),
                "pad_token_id": known.get("pad_token_id", known.get("eos_token_id", 2)),
                "decoder": {
                    "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "head_size": known.get("head_size") or sig.head_dim,
                    "hidden_size": known.get("hidden_size") or (heads or 0) * (sig.head_dim or 0),
                    "num_attention_heads": heads, "num_key_value_heads": sig.kv_heads,
                    "num_hidden_layers": sig.layers,
                },
            },
            "search": {"do_sample": False, "max_length": known.get("context_length", 2048), "num_beams": 1,
                       "num_return_sequences": 1, "top_k": 1, "top_p": 1.0, "temperature": 1.0,
                       "repetition_penalty": 1.0, "past_present_share_buffer": False},
        }
    dec = config["model"]["decoder"]
    dec["filename"] = filename
    names = {v.name for v in model.graph.inputs}
    inputs = {"input_ids": decoder.IDS, "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    inputs.update({key: key for key in (decoder.MASK, decoder.POSITIONS) if key in names})
    dec["inputs"] = inputs
    dec["outputs"] = {"logits": "logits", "present_key_names": "present.%d.key",
                      "present_value_names": "present.%d.value"}
    search = config.setdefault("search", {})
    search["past_present_share_buffer"] = _shares_buffer(model)
    return config


def write_beside(model: ir.Model, output: str | Path, source: str | Path | None = None) -> Path | None:
    """Write genai_config.json (and known tokenizer files) into ``output``'s folder for a cache
    decoder; None (nothing written) for any other model."""
    output = Path(output)
    source_folder = None if source is None else Path(source).parent
    config = config_for(model, source_folder, output.name)
    if config is None:
        return None
    folder = output.parent
    path = modelio.write_text(folder / CONFIG, json.dumps(config, indent=4) + "\n")
    tokenizer = facts(model).get("tokenizer_folder")
    for origin in (source_folder, Path(tokenizer) if tokenizer else None):
        if origin is None or origin.resolve() == folder.resolve():
            continue
        for name in TOKENIZER_FILES:
            if (origin / name).is_file() and not (folder / name).exists():
                modelio.write_text(folder / name, (origin / name).read_bytes())
    return path
