"""KV-cache decoders: exports, consistent feeds, the attention and skip-norm fusions, cache shapes
across prefill and decode, quantized cache models that generate, genai_config.json, bench --decode."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompile import decoder, modelio, specs
from qcompile.models import cached_export, gpt_synth

TINY_LLAMA = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def session_runner(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


def random_cache_feed(sig: decoder.CacheSignature, past: int, seq: int, seed: int = 0, vocab: int = 512):
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(0, vocab, (1, seq), dtype=np.int64)}
    feed.update({name: rng.standard_normal((1, sig.kv_heads, past, sig.head_dim)).astype(np.float32)
                 for name in sig.past_names})
    return sig.fit(feed)


def qcompile(*args):
    """The CLI as a user runs it, started outside the checkout (whose source folder is not the package)."""
    return subprocess.run([sys.executable, "-m", "qcompile", *map(str, args)], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A Llama-architecture decoder (GQA: 4 heads over 2 KV heads, rotary, RMSNorm, tied head),
    random weights, exported by transformers + torch as users export theirs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qcompile.models import causal_lm

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, attn_implementation="eager"))
    folder = tmp_path_factory.mktemp("tiny-llama")
    causal_lm.export_hf(model, folder / "model.onnx")
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def tiny_llama_fused(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama-fused") / "model.onnx"
    done = qcompile("optimize", tiny_llama, "-o", out)
    assert done.returncode == 0, done.stderr
    return out


def test_signature_and_feeds(tiny_llama):
    sig = decoder.signature(specs.input_specs(modelio.load(tiny_llama)))
    assert (sig.layers, sig.kv_heads, sig.head_dim) == (2, 2, 16)
    assert sig.bytes_per_token() == 2 * 2 * 2 * 16 * 4
    prompt = sig.complete({"input_ids": np.array([[5, 6, 7]])})
    assert prompt["attention_mask"].shape == (1, 3) and prompt["position_ids"].tolist() == [[0, 1, 2]]
    assert all(prompt[name].shape == (1, 2, 0, 16) for name in sig.past_names)
    step = random_cache_feed(sig, past=5, seq=2)
    assert step["attention_mask"].shape == (1, 7) and step["position_ids"].tolist() == [[5, 6]]
    assert decoder.signature(specs.input_specs(modelio.load(cached_export(gpt_synth.ENTRY)))) is None


def test_cache_shapes_across_prefill_and_decode_match_full_recompute(tiny_llama):
    sig = decoder.signature_of(tiny_llama)
    run = session_runner(tiny_llama)
    shapes = []

    def recording(feed):
        outputs = run(feed)
        shapes.append((feed["past_key_values.0.key"].shape[2], outputs["present.0.key"].shape,
                       outputs["logits"].shape))
        return outputs

    prompt = np.arange(10, 22)[None]
    generation = decoder.greedy(recording, sig, prompt, 6)
    assert shapes[0] == (0, (1, 2, 12, 16), (1, 12, 512))
    assert [s[0] for s in shapes[1:]] == [12, 13, 14, 15, 16]
    assert all(s[1] == (1, 2, s[0] + 1, 16) and s[2] == (1, 1, 512) for s in shapes[1:])
    tokens = list(prompt[0])  # the same tokens from prefills alone (no cache reuse)
    for _ in range(6):
        tokens.append(int(run(sig.complete({"input_ids": np.array([tokens])}))["logits"][0, -1].argmax()))
    assert generation.tokens == tokens[12:]


def test_llama_attention_fuses_into_gqa_rotary_and_skip_norm(tiny_llama, tiny_llama_fused):
    before, after = op_counts(tiny_llama), op_counts(tiny_llama_fused)
    assert before["Softmax"] == 2 and after["Softmax"] == 0
    # q, k, v packed into one MatMul per layer, the rope inside the kernel
    assert after["GroupQueryAttention"] == 2 and after["RotaryEmbedding"] == 0
    assert after["MatMul"] == 2 * 5 + 1  # per layer: qkv, o, gate, up, down; and the head
    # 2 layers x 2 norms + the final one, each after a residual add, except the first layer's input norm
    assert after["SkipSimplifiedLayerNormalization"] == 4
    assert sum(after.values()) < sum(before.values()) / 3
    sig = decoder.signature_of(tiny_llama)
    reference, fused = session_runner(tiny_llama), session_runner(tiny_llama_fused)
    for past, seq, offset in ((0, 9, 0), (7, 1, 0), (5, 4, 0), (0, 6, 3), (4, 1, 2)):
        feed = random_cache_feed(sig, past, seq, seed=past)
        feed["position_ids"] = feed["position_ids"] + offset  # position ids are honoured, not assumed
        want, got = reference(feed), fused(feed)
        for name, value in want.items():
            rel = np.linalg.norm(got[name] - value) / np.linalg.norm(value)
            assert rel < 1e-5, (name, past, seq, rel)


@pytest.mark.parametrize("attention,exporter", [("sdpa", "torchscript"), ("eager", "dynamo"), ("sdpa", "dynamo")])
def test_llama_exported_as_users_export_it_fuses_the_same(tmp_path, attention, exporter):
    """transformers' default attention is SDPA and torch's default exporter is dynamo; their exports
    differ from the eager TorchScript one: q and K^T each scaled by sqrt(c), a boolean mask through
    Where, the probabilities NaN-guarded (Where(IsNaN(p), 0, p)), p @ V reshaped to its own shape
    before the transpose (SDPA); K^T through [B*N, T, D] and a mask broadcast through Max (dynamo).
    Each fuses into the same graph, outputs unchanged across prefill and decode steps."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qcompile.models import causal_lm

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, attn_implementation=attention))
    source, out = tmp_path / "export.onnx", tmp_path / "fused.onnx"
    causal_lm.export_hf(model, source, exporter=exporter)
    assert op_counts(source)["Softmax"] == 2 and (op_counts(source)["IsNaN"] == 2) == (attention == "sdpa")
    done = qcompile("optimize", source, "-o", out)
    assert done.returncode == 0, done.stderr
    after = op_counts(out)
    assert after["GroupQueryAttention"] == 2 and after["Softmax"] == 0 and after["IsNaN"] == 0
    assert after["MatMul"] == 2 * 5 + 1
    sig = decoder.signature_of(source)
    reference, fused = session_runner(source), session_runner(out)
    for past, seq in ((0, 9), (7, 1), (5, 4)):
        feed = random_cache_feed(sig, past, seq, seed=past)
        want, got = reference(feed), fused(feed)
        for name, value in want.items():
            assert np.linalg.norm(got[name] - value) / np.linalg.norm(value) < 1e-5, (name, past, seq)


def test_no_cache_export_counts_positions_from_its_input_length():
    """The zoo's plain SmolLM2 export (no cache) computes positions as arange over input_ids'
    length: its rotary subgraph reads input_ids only through Shape. The fused kernel counts
    positions itself (no position input), never taking token ids for positions: real text, whose
    token ids run past the rotary tables (4,096 rows), runs and matches."""
    from qcompile import targets
    from qcompile.models import smollm2
    from qcompile.pipeline import optimize_with_stats

    source = cached_export(smollm2.ENTRY)
    fused = optimize_with_stats(modelio.load(source), verify=False, pipeline=targets.get("ort-cpu").passes).model
    gqa = [n for n in fused.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 30 and all(len(n.inputs) == 9 and "input_ids" not in [v.name for v in n.inputs if v]
                                  for n in gqa)
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/fused.onnx"
        modelio.save(fused, out)
        feed = next(iter(smollm2.calibration(1)))
        assert feed["input_ids"].max() > 4096
        want, got = session_runner(source)(feed)["logits"], session_runner(out)(feed)["logits"]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_gpt_attention_with_learned_positions_fuses(tmp_path):
    source = cached_export(gpt_synth.ENTRY, {"cache": True})
    out = tmp_path / "model.onnx"
    done = qcompile("optimize", source, "-o", out)
    assert done.returncode == 0, done.stderr
    counts = op_counts(out)
    depth = gpt_synth.DEFAULTS["depth"]
    assert counts["GroupQueryAttention"] == depth and counts["Softmax"] == 0 and counts["RotaryEmbedding"] == 0
    # ORT CPU's pipeline keeps Add + LayerNormalization (its SkipLayerNormalization kernel is slower)
    assert counts["SkipLayerNormalization"] == 0 and counts["LayerNormalization"] == 2 * depth + 1
    sig = decoder.signature_of(source)
    # ORT's GPU pipeline fuses each residual Add + LayerNorm; the model runs on CPU just the same
    from qcompile.passes import ORT_GPU_PIPELINE
    from qcompile.pipeline import optimize_with_stats

    gpu = tmp_path / "gpu.onnx"
    modelio.save(optimize_with_stats(modelio.load(source), pipeline=ORT_GPU_PIPELINE, verify=True).model, gpu)
    gpu_counts = op_counts(gpu)
    assert gpu_counts["SkipLayerNormalization"] == 2 * depth + 1 and gpu_counts["LayerNormalization"] == 0
    for past, seq in ((0, 12), (6, 1)):
        feed = random_cache_feed(sig, past, seq, vocab=gpt_synth.DEFAULTS["vocab"])
        want = session_runner(source)(feed)
        for path in (out, gpu):
            got = session_runner(path)(feed)
            assert np.linalg.norm(got["logits"] - want["logits"]) / np.linalg.norm(want["logits"]) < 1e-5


def test_encoder_attention_fuses_as_bidirectional_with_key_padding(minilm_path, tmp_path):
    """An encoder's bias is evaluated, not guessed: bidirectional + padding -> MultiHeadAttention
    (never the causal GroupQueryAttention), outputs unchanged with a padded mask."""
    out = tmp_path / "minilm.onnx"
    done = qcompile("optimize", minilm_path, "-o", out)
    assert done.returncode == 0, done.stderr
    counts = op_counts(out)
    assert counts["MultiHeadAttention"] == 6 and counts["GroupQueryAttention"] == 0 and counts["Softmax"] == 0
    reference, fused = session_runner(minilm_path), session_runner(out)
    mask = np.ones((1, 24), dtype=np.int64)
    mask[0, 17:] = 0
    feed = {"input_ids": np.arange(100, 124)[None], "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
    want, got = reference(feed)["last_hidden_state"][0, :17], fused(feed)["last_hidden_state"][0, :17]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_non_ort_targets_keep_the_standard_graph(tiny_llama, tmp_path):
    out = tmp_path / "model.onnx"
    done = qcompile("quantize", tiny_llama, "--target", "onnx-qdq", "--calib", "random", "-o", out)
    assert done.returncode == 0, done.stderr
    assert not {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} & set(op_counts(out))


@pytest.mark.parametrize("block, head_bits", [(16, 4), (128, 4), (32, 8)])  # K = 64: whole blocks, or one padded
def test_quantized_cache_model_generates_with_tied_table_stored_once(tiny_llama_fused, tmp_path, block, head_bits):
    out = tmp_path / "model.onnx"
    done = qcompile("quantize", tiny_llama_fused, "--recipe", "w4-weight-only", "--algorithm", "rtn",
                    "--block-size", block, "--include-lm-head", "--include-embeddings", "--lm-head-bits", head_bits,
                    "--calib", "random", "-o", out)
    assert done.returncode == 0, done.stderr
    model = onnx.load(str(out), load_external_data=False)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    assert counts["GroupQueryAttention"] == 2 and counts["MatMulNBits"] == 2 * 5 + 1
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node
                if n.op_type == "MatMulNBits" and any(a.name == "N" and a.i == 512 for a in n.attribute))
    assert gather.input[2] == head.input[2]  # the same scales: the head's codes serve the embedding
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in (gather, head)}
    assert set(bits.values()) == {head_bits}
    body = {next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node
            if n.op_type == "MatMulNBits" and n is not head}
    assert body == {4}
    sig = decoder.signature_of(out)
    run = session_runner(out)
    generation = decoder.greedy(run, sig, np.arange(1, 9)[None], 5)
    tokens = list(range(1, 9))
    for _ in range(5):
        tokens.append(int(run(sig.complete({"input_ids": np.array([tokens])}))["logits"][0, -1].argmax()))
    assert generation.tokens == tokens[8:]


def test_genai_config_written_and_the_model_runs_in_onnxruntime_genai(tiny_llama, tiny_llama_fused):
    og = pytest.importorskip("onnxruntime_genai")
    config = json.loads((tiny_llama_fused.parent / "genai_config.json").read_text())
    decoder_config = config["model"]["decoder"]
    assert decoder_config["filename"] == "model.onnx"
    assert (decoder_config["num_key_value_heads"], decoder_config["head_size"]) == (2, 16)
    assert decoder_config["inputs"]["position_ids"] == "position_ids"
    assert config["search"]["past_present_share_buffer"] is True  # GroupQueryAttention writes in place
    export_config = json.loads((tiny_llama.parent / "genai_config.json").read_text()) \
        if (tiny_llama.parent / "genai_config.json").is_file() else None
    assert export_config is None or export_config["search"]["past_present_share_buffer"] is False
    prompt = np.arange(10, 22)[None]
    ours = decoder.greedy(session_runner(tiny_llama), decoder.signature_of(tiny_llama), prompt, 6).tokens
    model = og.Model(str(tiny_llama_fused.parent))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + 6, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs == ours


def test_bench_decode_reports_prefill_decode_and_equal_tokens(tiny_llama, tiny_llama_fused):
    done = qcompile("bench", "--decode", 8, "--prompt", 16, "--runs", 2, "--json", tiny_llama, tiny_llama_fused)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [r["tokens_match_first"] for r in report["results"]] == [True, True]
    for r in report["results"]:
        assert r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 and len(r["tokens"]) == 8
        assert r["kv_bytes_at_end"] == r["kv_bytes_per_token"] * 24


def test_bench_decode_refuses_a_model_without_cache():
    done = qcompile("bench", "--decode", 4, cached_export(gpt_synth.ENTRY))
    assert done.returncode == 2 and "no KV cache" in done.stderr and "Traceback" not in done.stderr


def test_zoo_cache_option_is_a_boolean(tmp_path):
    done = qcompile("zoo", "export", "gpt_synth", "--option", "cache=maybe", "-o", tmp_path / "m.onnx")
    assert done.returncode == 2 and "cache=true" in done.stderr
    done = qcompile("zoo", "export", "gpt_synth", "--option", "cache=true", "-o", tmp_path / "m.onnx")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False  # the export's present is a Concat
    assert config["model"]["type"] == "llama"  # GenAI's generic decoder: its gpt2 type reads other inputs


@pytest.mark.parametrize("kv_cache, itemsize, bound", [("fp16", 2, 1e-3), ("int8", 1, 5e-2)])
def test_kv_cache_in_fp16_or_int8_generates_with_less_memory_per_token(tiny_llama_fused, tmp_path, kv_cache,
                                                                       itemsize, bound):
    """The cache's type changes and nothing else: memory per token falls by 4 / itemsize, the decode
    steps' logits stay near the FP32 cache's, and greedy generation runs with the new cache. Bounds:
    FP16 rounds each cached value within 2^-11 relative (measured 9e-5 on the logits); INT8 within
    1/254 of its channel's range, amplified through this random-weight model's two layers (3.7e-2)."""
    out, reference = tmp_path / "model.onnx", tmp_path / "fp32-cache.onnx"
    args = ["--recipe", "w8-weight-only", "--accuracy-level", "0", "--calib", "random", "--json"]  # float A: no
    # int8 rounding of activations to amplify a small change
    done = qcompile("quantize", tiny_llama_fused, *args, "--kv-cache", kv_cache, "-o", out)
    assert done.returncode == 0, done.stderr
    assert qcompile("quantize", tiny_llama_fused, *args, "-o", reference).returncode == 0
    report = json.loads(done.stdout)["kv_cache"]
    assert report["dtype"] == kv_cache and report["steps"] > 0
    assert report["bytes_per_token_before"] == 2 * 2 * 2 * 16 * 4
    assert report["bytes_per_token"] == report["bytes_per_token_before"] * itemsize // 4
    assert 0 < report["decode_rel_l2"] < bound, report
    sig = decoder.signature_of(out)
    assert sig.dtype == np.dtype({"fp16": np.float16, "int8": np.int8}[kv_cache])
    gqa = [n for n in onnx.load(str(out), load_external_data=False).graph.node if n.op_type == "GroupQueryAttention"]
    if kv_cache == "int8":
        assert all(len(n.input) == 14 and n.input[12] and n.input[13] for n in gqa)
    prompt = np.arange(20, 40)[None]
    got = decoder.greedy(session_runner(out), sig, prompt, 6)
    want = decoder.greedy(session_runner(reference), decoder.signature_of(reference), prompt, 6)
    assert len(got.tokens) == 6 and got.tokens[0] == want.tokens[0]  # the prefill reads the new keys exactly


def test_kv_cache_type_needs_fused_attention(tiny_llama, tmp_path):
    out = tmp_path / "model.onnx"
    done = qcompile("quantize", tiny_llama, "--target", "onnx-qdq", "--recipe", "w8-weight-only", "--calib", "random",
                    "--kv-cache", "fp16", "-o", out)
    assert done.returncode == 2, done.stderr
    assert "not fused" in done.stderr and not out.exists()
