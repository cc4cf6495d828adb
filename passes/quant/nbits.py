"""Block-wise weight-only quantization of MatMul weights (W8A16 / W4A16).

For W [K, N] (MatMul's B) cut into blocks of ``block_size`` rows along K, per output column n:

    symmetric  (GGUF Q4_0 style):  d = v / -2^(b-1),  v the block's value of largest |.|;
                                    code = clamp(round(w / d), -2^(b-1), 2^(b-1) - 1) + 2^(b-1),  zp = 2^(b-1)
    asymmetric:                    d = (max - min) / (2^b - 1),  zp = clamp(round(-min / d), 0, 2^b - 1),
                                    code = clamp(round(w / d) + zp, 0, 2^b - 1)
    dequantised:                   w ~ d * (code - zp)

Lowered either as ORT's ``com.microsoft.MatMulNBits`` (B packed [N, K/block, block*b/8] low bits
first, scales [N * K/block], zero points packed likewise) or as a standard blocked
``DequantizeLinear`` (opset 21, int4/uint4 or int8/uint8 along axis 0, ``block_size``) feeding MatMul.
Codes are computed by RTN here, or handed in precomputed (GPTQ, from the core's calibration).

Embeddings (``include_embeddings``): a Gather from a constant table E [V, D] is quantized the same
way, in blocks along D per row (symmetric), and lowered as ORT's ``com.microsoft.GatherBlockQuantized``
(the packed table [V, D*b/8], scales [V, D/block]; only the gathered rows are dequantized) or as a
blocked ``DequantizeLinear`` (axis 1) feeding the Gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.passes.irutil import add_initializer

Format = Literal["matmulnbits", "dq"]


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = 4
    block_size: int = 128
    symmetric: bool = True
    format: Format = "matmulnbits"
    include_lm_head: bool = False
    include_embeddings: bool = False  # Gather tables, always symmetric
    accuracy_level: int | None = None  # MatMulNBits: 0 float compute, 4 int8 compute of A; None: 0 here,
                                       # the fastest on the CPU in qcompile.weight_only.quantize_weights


@dataclass
class BlockQuant:
    """codes [N, k_blocks, block] (unsigned), scales [N, k_blocks], zero points [N, k_blocks]."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    bits: int
    symmetric: bool

    def dequantize(self) -> np.ndarray:
        """W [K, N] as the runtime reconstructs it (numpy reference)."""
        w = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]
        return w.reshape(w.shape[0], -1)[:, : self.k].T.copy()


def block_params(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block; ``blocks`` is [..., block]."""
    half = 2 ** (bits - 1)
    if symmetric:
        idx = np.argmax(np.abs(blocks), axis=-1)
        extreme = np.take_along_axis(blocks, idx[..., None], axis=-1)[..., 0]
        scale = extreme / -half
        zero = np.full(scale.shape, half, dtype=np.float32)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / (2**bits - 1)
        safe = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.round(-lo / safe), 0, 2**bits - 1).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return scale, zero


def quantize_codes(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 2**bits - 1).astype(np.uint8)


#: Range shrink factors tried by :func:`searched_block_params` (1.0 is plain RTN's range).
SHRINK_GRID = tuple(np.round(np.arange(1.0, 0.59, -0.025), 3))


def searched_block_params(blocks: np.ndarray, bits: int, symmetric: bool,
                          importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Block parameters whose range is shrunk (clipping outliers) where that lowers the block's
    squared rounding error, weighted per element by ``importance`` (e.g. diag(H), [block])."""
    weight = np.ones(blocks.shape[-1]) if importance is None else importance
    best_scale, best_zero = block_params(blocks, bits, symmetric)
    best_err = np.full(best_scale.shape, np.inf)
    for p in SHRINK_GRID:
        scale, zero = block_params(blocks * np.float32(p), bits, symmetric)
        deq = (quantize_codes(blocks, scale, zero, bits).astype(np.float32) - zero[..., None]) * scale[..., None]
        err = ((blocks - deq) ** 2 * weight).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero.astype(np.float32)


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool, importance: np.ndarray | None = None) -> BlockQuant:
    """Round-to-nearest block quantization of W [K, N]. With ``importance`` ([K], e.g. E[x_k^2] of
    the input), each block's range is searched (:func:`searched_block_params`) to minimise the
    importance-weighted rounding and clipping error instead of spanning the block's extremes."""
    k, n = w.shape
    blocks_k = -(-k // block_size)
    padded = np.zeros((blocks_k * block_size, n), dtype=np.float32)
    padded[:k] = w
    blocks = padded.T.reshape(n, blocks_k, block_size)
    if importance is None:
        scale, zero = block_params(blocks, bits, symmetric)
    else:
        weight = np.zeros(blocks_k * block_size)
        weight[:k] = importance
        scale, zero = searched_block_params(blocks, bits, symmetric, weight.reshape(blocks_k, block_size))
    return BlockQuant(quantize_codes(blocks, scale, zero, bits), scale, zero.astype(np.uint8), k, bits, symmetric)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, low bits first (bits in {2, 4, 8})."""
    if bits == 8:
        return codes.astype(np.uint8)
    per_byte = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint16)
    out = np.zeros(c.shape[:-1], dtype=np.uint16)
    for i in range(per_byte):
        out |= c[..., i] << (bits * i)
    return out.astype(np.uint8)


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
        if table.const_value is None or table.dtype != ir.DataType.FLOAT or table.shape is None or table.shape.rank() != 2:
            continue
        if table.shape[1] * config.bits % 8:
            continue
        found.append(node)
    return found


class WeightOnlyPass(ir.passes.InPlacePass):
    """Replace MatMul weights by block-quantized ones (RTN unless codes are given per weight)."""

    name = "weight-only"

    def __init__(self, config: WeightOnlyConfig, precomputed: Mapping[str, BlockQuant] | None = None) -> None:
        super().__init__()
        self.config = config
        self.precomputed = precomputed or {}
        self.quantized: list[str] = []  # MatMul nodes
        self.embeddings: list[str] = []  # Gather nodes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        if cfg.format == "dq" and model.opset_imports.get("", 0) < 21:
            raise ValueError("blocked DequantizeLinear needs opset 21: convert the model first")
        graph = model.graph
        common_passes.NameFixPass()(model)  # new nodes are named after the old ones
        ort = cfg.format == "matmulnbits"
        jobs = [(node, node.inputs[1], self._matmul_codes, self._to_matmulnbits if ort else self._to_blocked_dq,
                 self.quantized) for node in candidates(model, cfg)]
        jobs += [(node, node.inputs[0], self._row_codes, self._to_gather_block_quantized if ort else self._to_blocked_dq_gather,
                  self.embeddings) for node in embedding_candidates(model, cfg)]
        for node, weight, codes_of, lower, record in jobs:
            lower(graph, node, codes_of(weight), weight.name.replace("/", "_").replace(":", "_"))
            record.append(node.name)
        if cfg.format == "matmulnbits" and (self.quantized or self.embeddings):
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, bool(self.quantized or self.embeddings))

    def _matmul_codes(self, weight: ir.Value) -> BlockQuant:
        cfg = self.config
        return self.precomputed.get(weight.name) or rtn(weight.const_value.numpy(), cfg.bits, cfg.block_size, cfg.symmetric)

    def _row_codes(self, table: ir.Value) -> BlockQuant:
        """An embedding table [V, D] in symmetric blocks along D per row (as W [K=D, N=V])."""
        return rtn(table.const_value.numpy().T, self.config.bits, self.config.block_size, symmetric=True)

    def _to_matmulnbits(self, graph: ir.Graph, node: ir.Node, bq: BlockQuant, base: str) -> None:
        cfg = self.config
        n, k_blocks, _ = bq.codes.shape
        b = add_initializer(graph, f"{base}_q{cfg.bits}", pack(bq.codes, cfg.bits))
        scales = add_initializer(graph, f"{base}_scales", bq.scales.reshape(-1).astype(np.float32))
        inputs = [node.inputs[0], b, scales]
        if not cfg.symmetric:
            zp = bq.zero_points
            if cfg.bits < 8:
                per_byte = 8 // cfg.bits
                padded = np.full((n, -(-k_blocks // per_byte) * per_byte), 0, dtype=np.uint8)
                padded[:, :k_blocks] = zp
                zp = pack(padded, cfg.bits)
            inputs.append(add_initializer(graph, f"{base}_zero_points", zp.reshape(-1)))
        new = ir.node(
            "MatMulNBits", inputs, domain="com.microsoft", name=f"{node.name}_MatMulNBits",
            attributes={"K": bq.k, "N": n, "bits": cfg.bits, "block_size": cfg.block_size,
                        "accuracy_level": cfg.accuracy_level or 0},
        )
        # the new output takes the old one's name, type and shape (it may be a graph output)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)

    def _to_blocked_dq(self, graph: ir.Graph, node: ir.Node, bq: BlockQuant, base: str) -> None:
        cfg = self.config
        n, k_blocks, block = bq.codes.shape
        codes = bq.codes.reshape(n, k_blocks * block)[:, : bq.k].T  # [K, N]
        half = 2 ** (cfg.bits - 1)
        if cfg.symmetric:  # signed storage, zero point 0
            signed = (codes.astype(np.int16) - half).astype(np.int8)
            dtype = ir.DataType.INT4 if cfg.bits == 4 else ir.DataType.INT8
            q = add_initializer(graph, f"{base}_q{cfg.bits}", signed, dtype)
            zp_array, zp_dtype = np.zeros((k_blocks, n), dtype=np.int8), dtype
        else:
            dtype = ir.DataType.UINT4 if cfg.bits == 4 else ir.DataType.UINT8
            q = add_initializer(graph, f"{base}_q{cfg.bits}", codes.astype(np.uint8), dtype)
            zp_array, zp_dtype = bq.zero_points.T.astype(np.uint8).copy(), dtype
        scales = add_initializer(graph, f"{base}_scales", bq.scales.T.astype(np.float32).copy())
        zero = add_initializer(graph, f"{base}_zero_points", zp_array, zp_dtype)
        dq = ir.node("DequantizeLinear", [q, scales, zero], name=f"{node.name}_DequantizeLinear",
                     attributes={"axis": 0, "block_size": cfg.block_size})
        dq.outputs[0].name = f"{base}_dequantized"
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])

    def _to_gather_block_quantized(self, graph: ir.Graph, node: ir.Node, bq: BlockQuant, base: str) -> None:
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

    def _to_blocked_dq_gather(self, graph: ir.Graph, node: ir.Node, bq: BlockQuant, base: str) -> None:
        cfg = self.config
        rows, k_blocks, block = bq.codes.shape
        signed = (bq.codes.reshape(rows, k_blocks * block)[:, : bq.k].astype(np.int16) - 2 ** (cfg.bits - 1)).astype(np.int8)
        dtype = ir.DataType.INT4 if cfg.bits == 4 else ir.DataType.INT8
        q = add_initializer(graph, f"{base}_q{cfg.bits}", signed, dtype)
        scales = add_initializer(graph, f"{base}_scales", bq.scales.astype(np.float32))
        zero = add_initializer(graph, f"{base}_zero_points", np.zeros(bq.scales.shape, dtype=np.int8), dtype)
        dq = ir.node("DequantizeLinear", [q, scales, zero], name=f"{node.name}_DequantizeLinear",
                     attributes={"axis": 1, "block_size": cfg.block_size})
        dq.outputs[0].name = f"{base}_dequantized"
        graph.insert_before(node, dq)
        node.replace_input_with(0, dq.outputs[0])
