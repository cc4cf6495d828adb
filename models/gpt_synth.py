"""A GPT-style decoder of configurable width and depth, random weights: scale and speed tests.

Pre-LayerNorm blocks: x + Attn(LN(x)) (causal, ``heads`` heads), then x + MLP(LN(x)) with a 4x
GELU MLP; learned positions; untied LM head. (input_ids int64 [batch, seq]) -> logits.
Parameters ~ 2*vocab*width + depth*12*width^2: width 768, depth 12, vocab 50304 gives ~163 M
(the issue's "~168 M" scale); the zoo default is small so that tests stay fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompile.models import causal_lm
from qcompile.models.base import FeedReader, ZooEntry, require, torch_export
from qcompile.models.vision import no_metric

DEFAULTS = {"width": 256, "depth": 2, "heads": 4, "vocab": 8192, "max_seq": 1024, "cache": False}


def build(width: int, depth: int, heads: int, vocab: int, max_seq: int, seed: int = 0):
    torch = require("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def forward(self, x, mask):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(width, dim=-1)
            q, k, v = (z.reshape(b, t, heads, width // heads).transpose(1, 2) for z in (q, k, v))
            scores = (q @ k.transpose(-1, -2)) * (1.0 / (width // heads) ** 0.5) + mask
            attn = torch.softmax(scores, dim=-1) @ v
            x = x + self.proj(attn.transpose(1, 2).reshape(b, t, width))
            return x + self.mlp(self.ln2(x))

        def cached(self, x, bias, past_k, past_v):
            """The block over new tokens x attending to the cache and themselves: (y, k_all, v_all)."""
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(width, dim=-1)
            q, k, v = (z.reshape(b, t, heads, width // heads).transpose(1, 2) for z in (q, k, v))
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            scores = (q @ k.transpose(-1, -2)) * (1.0 / (width // heads) ** 0.5) + bias
            attn = torch.softmax(scores, dim=-1) @ v
            x = x + self.proj(attn.transpose(1, 2).reshape(b, t, width))
            return x + self.mlp(self.ln2(x)), k, v

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, width)
            self.pos = nn.Embedding(max_seq, width)
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.ln = nn.LayerNorm(width)
            self.head = nn.Linear(width, vocab, bias=False)

        def forward(self, input_ids):
            t = input_ids.shape[1]
            positions = torch.arange(t, device=input_ids.device)
            x = self.tok(input_ids) + self.pos(positions)[None]
            mask = torch.triu(torch.full((t, t), -1e4), diagonal=1)
            for block in self.blocks:
                x = block(x, mask)
            return self.head(self.ln(x))

        def cached(self, input_ids, attention_mask, position_ids, *past):
            """KV-cache form: causal over past + new tokens, padding (mask 0) excluded, -1e4 as -inf."""
            t, past_len = input_ids.shape[1], past[0].shape[2]
            x = self.tok(input_ids) + self.pos(position_ids)
            keys = torch.arange(past_len + t, device=input_ids.device)
            queries = torch.arange(t, device=input_ids.device) + past_len
            causal = (keys[None, :] > queries[:, None]).to(x.dtype) * -1e4
            padding = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
            bias = causal[None, None] + padding
            present = []
            for i, block in enumerate(self.blocks):
                x, k, v = block.cached(x, bias, past[2 * i], past[2 * i + 1])
                present += [k, v]
            return (self.head(self.ln(x)), *present)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = GPT()
        for p in net.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
    return net.eval()


def export(path: Path, cache: bool = False, **options) -> None:
    """(input_ids) -> logits, or (``cache``) the KV-cache form of models/causal_lm.py."""
    torch = require("torch")
    config = {key: value for key, value in {**DEFAULTS, **options}.items() if key != "cache"}
    net = build(**config)
    if cache:
        heads, width = config["heads"], config["width"]

        class CacheForm(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, position_ids, *past):
                return self.inner.cached(input_ids, attention_mask, position_ids, *past)

        facts = {"type": "gpt2", "num_attention_heads": heads, "num_key_value_heads": heads,
                 "num_hidden_layers": config["depth"], "hidden_size": width, "head_size": width // heads,
                 "vocab_size": config["vocab"], "context_length": config["max_seq"],
                 "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
        causal_lm.export_cached(CacheForm(net), path, layers=config["depth"], kv_heads=heads,
                                head_dim=width // heads, vocab=config["vocab"], facts=facts)
        return
    ids = torch.zeros(1, 8, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    torch_export(net, (ids,), path, ["input_ids"], ["logits"], axes)


def random_tokens(n: int, seq: int = 128, vocab: int = DEFAULTS["vocab"], seed: int = 0) -> FeedReader:
    rng = np.random.default_rng(seed)
    return FeedReader({"input_ids": rng.integers(0, vocab, size=(1, seq), dtype=np.int64)} for _ in range(n))


def param_count(width: int, depth: int, vocab: int, max_seq: int, **_) -> int:
    block = 12 * width * width + 13 * width
    return 2 * vocab * width + max_seq * width + depth * block + 2 * width


ENTRY = ZooEntry(
    name="gpt_synth",
    version="1",
    description="GPT-style decoder, configurable width/depth — RANDOM WEIGHTS, scale and speed only",
    real_weights=False,
    task="none (speed and cost only)",
    export=export,
    calibration=random_tokens,
    evaluate=no_metric,
    bench_dims={"batch": 1, "sequence": 128},
    default_options=DEFAULTS,
)
