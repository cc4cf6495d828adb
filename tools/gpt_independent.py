"""A GPT-shaped decoder written directly in ONNX (onnx.helper + numpy), independent of the zoo.

    python tools/gpt_independent.py OUT.onnx [--width 1024] [--layers 12] [--vocab 8192] [--heads 16]
                                    [--max-seq 256] [--external] [--calib OUT.npz --samples 32 --seq 128]

It shares no code with ``models/gpt_synth.py`` (which is a torch module exported by TorchScript) and
is built differently on purpose, the way another exporter would write the same architecture:

    x = wte[ids] + wpe[0:t]                                 Gather, Range over Shape(ids)[1]
    per layer (pre-LN):
        h = LayerNormalization(x)                           the opset-17 op, not a decomposition
        q, k, v = h Wq + bq, h Wk + bk, h Wv + bv           three MatMuls (no fused QKV)
        a = softmax(q kᵀ / √d_h + mask) v                   mask = (1 - tril(1)) · -1e9, built once
        x = x + a Wo + bo
        x = x + gelu_tanh(LN(x) W1 + b1) W2 + b2            GELU as its tanh approximation, spelled out
    logits = LN(x) Wlm                                      untied head, no bias

Weights are seeded N(0, 0.02²) (LayerNorm γ = 1, β = 0), inline in one file (protobuf limit 2 GB) or,
with ``--external``, in ``OUT.onnx.data``. Parameters ≈ 12·L·d² + 2·V·d + T·d: width 1024, 12
layers, vocabulary 8192, 256 positions give 168.2 M (673 MB of FP32 weights). ``--calib`` writes
seeded random tokens, stacked as ``input_ids`` [samples, 1, seq] (``qcompile quantize --calib``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def parameter_count(width: int, layers: int, vocab: int, max_seq: int) -> int:
    per_layer = 12 * width * width + 13 * width  # Wq Wk Wv Wo W1 W2, their biases, two LayerNorms
    return layers * per_layer + 2 * vocab * width + max_seq * width + 2 * width


def build(width: int = 1024, layers: int = 12, vocab: int = 8192, heads: int = 16, max_seq: int = 256,
          seed: int = 0) -> onnx.ModelProto:
    """The model as a proto, weights inline."""
    if width % heads:
        raise SystemExit(f"width {width} is not a multiple of heads {heads}")
    head_dim = width // heads
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int, fill: float | None = None) -> str:
        if fill is None:
            array = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
        else:
            array = np.full(shape, fill, dtype=np.float32)
        inits.append(numpy_helper.from_array(array, name))
        return name

    def const(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"n{len(nodes)}_{op}", **attrs))
        return output

    def linear(x: str, prefix: str, d_in: int, d_out: int, bias: bool = True) -> str:
        y = node("MatMul", [x, weight(f"{prefix}.weight", d_in, d_out)], f"{prefix}.mm")
        return node("Add", [y, weight(f"{prefix}.bias", d_out, fill=0.0)], f"{prefix}.out") if bias else y

    def layer_norm(x: str, prefix: str) -> str:
        return node("LayerNormalization", [x, weight(f"{prefix}.gamma", width, fill=1.0),
                                           weight(f"{prefix}.beta", width, fill=0.0)],
                    f"{prefix}.out", axis=-1, epsilon=1e-5)

    # Embeddings: token table gathered by id, positions 0..t-1 from the input's own shape.
    const("c.zero", np.array(0, np.int64))
    const("c.one", np.array(1, np.int64))
    shape = node("Shape", ["input_ids"], "ids.shape")
    seq = node("Gather", [shape, "c.one"], "ids.seq", axis=0)
    positions = node("Range", ["c.zero", seq, "c.one"], "positions")
    tok = node("Gather", [weight("wte", vocab, width), "input_ids"], "tok_emb", axis=0)
    pos = node("Gather", [weight("wpe", max_seq, width), positions], "pos_emb", axis=0)
    x = node("Add", [tok, pos], "embed")

    # Additive causal mask [t, t]: 0 on and below the diagonal, -1e9 above.
    seq1 = node("Unsqueeze", [seq, "const_axes0"], "ids.seq1")
    const("const_axes0", np.array([0], np.int64))
    square = node("Concat", [seq1, seq1], "mask.shape", axis=0)
    ones = node("ConstantOfShape", [square], "mask.ones", value=numpy_helper.from_array(np.ones(1, np.float32)))
    lower = node("Trilu", [ones], "mask.lower", upper=0)
    const("c.onef", np.array(1.0, np.float32))
    const("c.neg", np.array(-1e9, np.float32))
    above = node("Sub", ["c.onef", lower], "mask.above")
    mask = node("Mul", [above, "c.neg"], "mask")

    const("c.split_heads", np.array([0, 0, heads, head_dim], np.int64))
    const("c.merge_heads", np.array([0, 0, width], np.int64))
    const("c.scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    const("c.half", np.array(0.5, np.float32))
    const("c.gelu_a", np.array(math.sqrt(2.0 / math.pi), np.float32))
    const("c.gelu_b", np.array(0.044715, np.float32))
    const("c.three", np.array(3.0, np.float32))
    for i in range(layers):
        p = f"h{i}"
        h = layer_norm(x, f"{p}.ln1")
        q, k, v = (linear(h, f"{p}.attn.{n}", width, width) for n in "qkv")
        q = node("Transpose", [node("Reshape", [q, "c.split_heads"], f"{p}.q4")], f"{p}.qh", perm=[0, 2, 1, 3])
        kt = node("Transpose", [node("Reshape", [k, "c.split_heads"], f"{p}.k4")], f"{p}.kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [v, "c.split_heads"], f"{p}.v4")], f"{p}.vh", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, kt], f"{p}.qk"), "c.scale"], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}.masked")], f"{p}.probs", axis=-1)
        ctx = node("MatMul", [probs, v], f"{p}.ctx")
        ctx = node("Reshape", [node("Transpose", [ctx], f"{p}.ctx_t", perm=[0, 2, 1, 3]), "c.merge_heads"],
                   f"{p}.ctx_merged")
        x = node("Add", [x, linear(ctx, f"{p}.attn.o", width, width)], f"{p}.res1")
        u = linear(layer_norm(x, f"{p}.ln2"), f"{p}.mlp.fc", width, 4 * width)
        cube = node("Pow", [u, "c.three"], f"{p}.gelu.cube")
        inner = node("Add", [u, node("Mul", [cube, "c.gelu_b"], f"{p}.gelu.bc")], f"{p}.gelu.inner")
        t = node("Tanh", [node("Mul", [inner, "c.gelu_a"], f"{p}.gelu.arg")], f"{p}.gelu.tanh")
        gate = node("Mul", [node("Add", [t, "c.onef"], f"{p}.gelu.one_plus"), "c.half"], f"{p}.gelu.gate")
        g = node("Mul", [u, gate], f"{p}.gelu.out")
        x = node("Add", [x, linear(g, f"{p}.mlp.proj", 4 * width, width)], f"{p}.res2")
    logits = linear(layer_norm(x, "lnf"), "lm_head", width, vocab, bias=False)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))

    graph = helper.make_graph(
        nodes, "gpt_independent",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gpt_independent")
    model.ir_version = 8
    return model


def write(path: str | Path, *, external: bool = False, **options) -> Path:
    """Build and save the model (checked); returns the path."""
    path = Path(path)
    model = build(**options)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(path))
    return path


def write_calibration(path: str | Path, samples: int = 32, seq: int = 128, vocab: int = 8192, seed: int = 1) -> Path:
    """Seeded random tokens, stacked as input_ids [samples, 1, seq]."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=(samples, 1, seq), dtype=np.int64)
    np.savez(path, input_ids=ids)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--max-seq", type=int, default=256)
    parser.add_argument("--external", action="store_true", help="weights in OUTPUT.data")
    parser.add_argument("--calib", default=None, help="also write calibration tokens to this .npz")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    if not 1 <= args.seq <= args.max_seq:
        raise SystemExit(f"--seq {args.seq} must be within 1..--max-seq {args.max_seq}")
    path = write(args.output, external=args.external, width=args.width, layers=args.layers, vocab=args.vocab,
                 heads=args.heads, max_seq=args.max_seq)
    count = parameter_count(args.width, args.layers, args.vocab, args.max_seq)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    print(f"{path}: {count / 1e6:.1f} M parameters, {size / 1e6:.0f} MB")
    if args.calib:
        write_calibration(args.calib, args.samples, args.seq, args.vocab)
        print(f"{args.calib}: {args.samples} x {args.seq} tokens")


if __name__ == "__main__":
    main()
