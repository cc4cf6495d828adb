"""Block-wise weight-only quantization of MatMul weights (W8A16 / W4A16).

For W [K, N] (MatMul's B) cut into blocks of ``block_size`` rows along K, per output column n:

    symmetric  (GGUF Q4_0 style):  d = v / -2^(b-1),  v the block's value of largest |.|;
                                    code = clamp(round(w / d), -2^(b-1), 2^(b-1) - 1) + 2^(b-1),  zp = 2^(b-1)
    asymmetric:                    d = (max - min) / (2^b - 1),  zp = clamp(round(-min / d), 0, 2^b - 1),
                                    code = clamp(round(w / d) + zp, 0, 2^b - 1)
    dequantised:                   w ~ d * (code - zp)

Lowered either as ORT's ``com.microsoft.MatMulNBits`` (B packed [N, K/block, block*b/8] low bits
first, scales [N, K/block], zero points packed likewise) or as a standard blocked
``DequantizeLinear`` (opset 21, int4/uint4 or int8/uint8 along axis 0, ``block_size``) feeding MatMul.
Codes come from the caller, one weight at a time (qcompile.quant.algorithms: RTN, GPTQ, AWQ).

Embeddings (``include_embeddings``): a Gather from a constant table E [V, D] is quantized the same
way, in blocks along D per row (symmetric), and lowered as ORT's ``com.microsoft.GatherBlockQuantized``
(the packed table [V, D*b/8], scales [V, D/block]; only the gathered rows are dequantized) or as a
blocked ``DequantizeLinear`` (axis 1) feeding the Gather. A table tied to a quantized LM head
(E = W^T) is not stored twice: its Gather reads the head's packed codes and scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.passes.irutil import add_initializer
from qcompile.quant.dtypes import pack
from qcompile.quant.spec import BlockCodes

Format = Literal["matmulnbits", "dq"]
CodesFn = Callable[[str, str, np.ndarray, int, int], BlockCodes]  # (kind, name, w, bits, block) -> codes


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = 4
    block_size: int = 128
    symmetric: bool = True
    format: Format = "matmulnbits"
    include_lm_head: bool = False
    include_embeddings: bool = False  # Gather tables (symmetric, unless tied to an asymmetric head)
    accuracy_level: int | None = None  # MatMulNBits: 0 float compute, 4 int8 compute of A; None: 0 here,
                                       # the fastest on the CPU in qcompile.weight_only.quantize_weights
    lm_head_bits: int | None = None  # the LM head (and a table tied to it) in other bits, e.g. 8 under W4
    lm_head_block_size: int | None = None  # ... and in other blocks, e.g. 32 under a block-128 recipe

    def bits_for(self, node: ir.Node) -> int:
        """The bits of one MatMul's weight: ``lm_head_bits`` for the LM head when set."""
        return self.lm_head_bits if self.lm_head_bits and is_lm_head(node) else self.bits

    def block_for(self, node: ir.Node) -> int:
        """The block size of one MatMul's weight: ``lm_head_block_size`` for the LM head when set."""
        return self.lm_head_block_size if self.lm_head_block_size and is_lm_head(node) else self.block_size


def is_lm_head(node: ir.Node) -> bool:
    out = node.outputs[0]
    return out.is_graph_output() or any(u.op_type in ("Reshape", "Identity") and u.outputs[0].is_graph_output()
                                        for u, _ in out.uses())


def candidates(model: ir.Model, config: WeightOnlyConfig) -> list[ir.Node]:
    """MatMul nodes with a constant float 2-D weight, K a multiple of 16 (LM head only if asked)."""
    found = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.inputs[1] is None or node.inputs[1].const_value is None:
            continue
        w = node.inputs[1]
        if w.dtype != ir.DataType.FLOAT or w.shape is None or w.shape.rank() != 2 or w.shape[0] % 16:
            continue
        if is_lm_head(node) and not config.include_lm_head:
            continue
        found.append(node)
    return found


def embedding_candidates(model: ir.Model, config: WeightOnlyConfig) -> list[ir.Node]:
    """Gathers of rows (axis 0) from a constant float 2-D table whose rows pack into whole bytes."""
    if not config.include_embeddings:
        return []
    found = []
    for node in model.graph:
        if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0 or node.inputs[0] is None:
            continue
        table = node.inputs[0]
        if (table.const_value is None or table.dtype != ir.DataType.FLOAT or table.shape is None
                or table.shape.rank() != 2):
            continue
        if table.shape[1] * config.bits % 8:
            continue
        found.append(node)
    return found


def tied_heads(heads: list[ir.Node], gathers: list[ir.Node]) -> dict[int, tuple[ir.Node, ir.Node]]:
    """Gathers whose table E [V, D] is an LM head MatMul's weight transposed (W = E^T: tied
    embeddings), by id: {id(gather): (gather, head)}."""
    tied = {}
    for gather in gathers:
        table = gather.inputs[0]
        for head in heads:
            w = head.inputs[1]
            if not is_lm_head(head) or list(w.shape) != list(table.shape)[::-1]:
                continue
            if np.array_equal(w.const_value.numpy().T, table.const_value.numpy()):
                tied[id(gather)] = (gather, head)
                break
    return tied


class WeightOnlyPass(ir.passes.InPlacePass):
    """Replace MatMul weights (and Gather tables) by block-quantized ones, codes from ``codes``."""

    name = "weight-only"

    def __init__(self, config: WeightOnlyConfig, codes: CodesFn) -> None:
        """``codes(kind, name, w, bits)``: the block codes of weight ``name`` (``kind`` "matmul": W [K, N];
        "embedding": a table seen as [D, V], symmetric blocks along D), computed by the caller
        (qcompile.quant: RTN, GPTQ or AWQ) one weight at a time."""
        super().__init__()
        self.config = config
        self.codes = codes
        self.quantized: list[str] = []  # MatMul nodes
        self.embeddings: list[str] = []  # Gather nodes
        self._lowered: dict[int, ir.Node] = {}  # id(MatMul) -> its MatMulNBits

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        if cfg.format == "dq" and model.opset_imports.get("", 0) < 21:
            raise ValueError("blocked DequantizeLinear needs opset 21: convert the model first")
        graph = model.graph
        common_passes.NameFixPass()(model)  # new nodes are named after the old ones
        ort = cfg.format == "matmulnbits"
        jobs = [(node, node.inputs[1], self._matmul_codes, self._to_matmulnbits if ort else self._to_blocked_dq,
                 self.quantized) for node in candidates(model, cfg)]
        gathers = embedding_candidates(model, cfg)
        tied = tied_heads([job[0] for job in jobs], gathers) if ort else {}
        jobs += [(node, node.inputs[0], self._row_codes,
                  self._to_gather_block_quantized if ort else self._to_blocked_dq_gather,
                  self.embeddings) for node in gathers if id(node) not in tied]
        for node, weight, codes_of, lower, record in jobs:
            lower(graph, node, codes_of(node, weight), weight.name.replace("/", "_").replace(":", "_"))
            record.append(node.name)
        for gather, head in tied.values():
            self._share_with_head(graph, gather, self._lowered[id(head)])
            self.embeddings.append(gather.name)
        if cfg.format == "matmulnbits" and (self.quantized or self.embeddings):
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, bool(self.quantized or self.embeddings))

    def _matmul_codes(self, node: ir.Node, weight: ir.Value) -> BlockCodes:
        return self.codes("matmul", weight.name, weight.const_value.numpy(), self.config.bits_for(node),
                          self.config.block_for(node))

    def _row_codes(self, node: ir.Node, table: ir.Value) -> BlockCodes:
        return self.codes("embedding", table.name, table.const_value.numpy().T, self.config.bits)

    def _to_matmulnbits(self, graph: ir.Graph, node: ir.Node, bq: BlockCodes, base: str) -> None:
        cfg = self.config
        bits = cfg.bits_for(node)
        n, k_blocks, _ = bq.codes.shape
        b = add_initializer(graph, f"{base}_q{bits}", pack(bq.codes, bits))
        scales = add_initializer(graph, f"{base}_scales", bq.scales.reshape(n, k_blocks).astype(np.float32))
        inputs = [node.inputs[0], b, scales]
        if not cfg.symmetric:
            zp = bq.zero_points
            if bits < 8:
                per_byte = 8 // bits
                padded = np.full((n, -(-k_blocks // per_byte) * per_byte), 0, dtype=np.uint8)
                padded[:, :k_blocks] = zp
                zp = pack(padded, bits)
            inputs.append(add_initializer(graph, f"{base}_zero_points", zp.reshape(-1)))
        new = ir.node(
            "MatMulNBits", inputs, domain="com.microsoft", name=f"{node.name}_MatMulNBits",
            attributes={"K": bq.k, "N": n, "bits": bits, "block_size": bq.codes.shape[2],
                        "accuracy_level": cfg.accuracy_level or 0},
        )
        # the new output takes the old one's name, type and shape (it may be a graph output)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        self._lowered[id(node)] = new

    def _share_with_head(self, graph: ir.Graph, gather: ir.Node, head: ir.Node) -> None:
        """A table tied to the LM head (E = W^T) gathers from the head's MatMulNBits codes: its packed
        B [V, K/block, block*b/8] seen as [V, K/block * block*b/8] (one copy on disk, as ONNX Runtime
        GenAI's builder shares them), the same scales [V, K/block] and (asymmetric) the same packed
        zero points, [V * ceil(K/block * b/8)] seen as [V, ceil(K/block * b/8)]. Rows padded to whole blocks
        (K not a multiple of the block) come out padded, so their padding is sliced off."""
        b, scales = head.inputs[1], head.inputs[2]
        rows, k_blocks, blob = b.shape
        width, block = int(head.attributes.get_int("K")), int(head.attributes.get_int("block_size"))
        shape = add_initializer(graph, f"{b.name}_rows", np.array([rows, k_blocks * blob], dtype=np.int64))
        reshape = ir.node("Reshape", [b, shape], name=f"{gather.name}_tied_rows")
        inputs, nodes = [reshape.outputs[0], gather.inputs[1], scales], [reshape]
        if len(head.inputs) > 3 and head.inputs[3] is not None:  # asymmetric: the head's packed zero points too
            zp_shape = add_initializer(graph, f"{b.name}_zero_point_rows", np.array([rows, -1], dtype=np.int64))
            zp = ir.node("Reshape", [head.inputs[3], zp_shape], name=f"{gather.name}_tied_zero_points")
            inputs.append(zp.outputs[0])
            nodes.append(zp)
        new = ir.node(
            "GatherBlockQuantized", inputs, domain="com.microsoft",
            name=f"{gather.name}_GatherBlockQuantized",
            attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block,
                        "bits": head.attributes.get_int("bits")},
        )
        nodes, out = [*nodes, new], new.outputs[0]
        if width != k_blocks * block:
            starts, ends, axes = (add_initializer(graph, f"{gather.name}_{n}", np.array([v], dtype=np.int64))
                                  for n, v in (("start", 0), ("end", width), ("axis", -1)))
            cut = ir.node("Slice", [out, starts, ends, axes], name=f"{gather.name}_unpad")
            nodes.append(cut)
            out = cut.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, gather, [gather], nodes, gather.outputs, [out])

    def _to_blocked_dq(self, graph: ir.Graph, node: ir.Node, bq: BlockCodes, base: str) -> None:
        cfg = self.config
        bits = cfg.bits_for(node)
        n, k_blocks, block = bq.codes.shape
        codes = bq.codes.reshape(n, k_blocks * block)[:, : bq.k].T  # [K, N]
        half = 2 ** (bits - 1)
        if cfg.symmetric:  # signed storage, zero point 0
            signed = (codes.astype(np.int16) - half).astype(np.int8)
            dtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
            q = add_initializer(graph, f"{base}_q{bits}", signed, dtype)
            zp_array, zp_dtype = np.zeros((k_blocks, n), dtype=np.int8), dtype
        else:
            dtype = ir.DataType.UINT4 if bits == 4 else ir.DataType.UINT8
            q = add_initializer(graph, f"{base}_q{bits}", codes.astype(np.uint8), dtype)
            zp_array, zp_dtype = bq.zero_points.T.astype(np.uint8).copy(), dtype
        scales = add_initializer(graph, f"{base}_scales", bq.scales.T.astype(np.float32).copy())
        zero = add_initializer(graph, f"{base}_zero_points", zp_array, zp_dtype)
        dq = ir.node("DequantizeLinear", [q, scales, zero], name=f"{node.name}_DequantizeLinear",
                     attributes={"axis": 0, "block_size": block})
        dq.outputs[0].name = f"{base}_dequantized"
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])

    def _to_gather_block_quantized(self, graph: ir.Graph, node: ir.Node, bq: BlockCodes, base: str) -> None:
        cfg = self.config
        rows, k_blocks, block = bq.codes.shape
        codes = bq.codes.reshape(rows, k_blocks * block)[:, : bq.k]  # [V, D], zero point 2^(b-1): ORT's default
        data = add_initializer(graph, f"{base}_q{cfg.bits}", pack(codes, cfg.bits))
        scales = add_initializer(graph, f"{base}_scales", bq.scales.astype(np.float32))
        new = ir.node(
            "GatherBlockQuantized", [data, node.inputs[1], scales], domain="com.microsoft",
            name=f"{node.name}_GatherBlockQuantized",
            attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": cfg.block_size, "bits": cfg.bits},
        )
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)

    def _to_blocked_dq_gather(self, graph: ir.Graph, node: ir.Node, bq: BlockCodes, base: str) -> None:
        cfg = self.config
        rows, k_blocks, block = bq.codes.shape
        signed = (bq.codes.reshape(rows, k_blocks * block)[:, : bq.k].astype(np.int16)
                  - 2 ** (cfg.bits - 1)).astype(np.int8)
        dtype = ir.DataType.INT4 if cfg.bits == 4 else ir.DataType.INT8
        q = add_initializer(graph, f"{base}_q{cfg.bits}", signed, dtype)
        scales = add_initializer(graph, f"{base}_scales", bq.scales.astype(np.float32))
        zero = add_initializer(graph, f"{base}_zero_points", np.zeros(bq.scales.shape, dtype=np.int8), dtype)
        dq = ir.node("DequantizeLinear", [q, scales, zero], name=f"{node.name}_DequantizeLinear",
                     attributes={"axis": 1, "block_size": cfg.block_size})
        dq.outputs[0].name = f"{base}_dequantized"
        graph.insert_before(node, dq)
        node.replace_input_with(0, dq.outputs[0])
