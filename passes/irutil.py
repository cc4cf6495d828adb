"""Small graph helpers shared by the quantization passes."""

from __future__ import annotations

import mmap

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """Register ``array`` as a new initializer (name made unique); ``dtype`` for packed types (INT4...)."""
    unique, i = name, 0
    while unique in graph.initializers:
        i += 1
        unique = f"{name}_{i}"
    tensor = ir.Tensor(array, dtype=dtype, name=unique) if dtype is not None else ir.tensor(array, name=unique)
    value = ir.Value(name=unique, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def drop_resident(tensor: ir.TensorProtocol | None) -> None:
    """Drop a memory-mapped tensor's pages from the process's resident set (madvise DONTNEED).

    The mapping stays valid, also under arrays and sessions that still use it: pages are read back
    from the file (page cache) when next touched. No-op for in-memory tensors."""
    raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.ExternalTensor) else None
    if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        raw.madvise(mmap.MADV_DONTNEED)


def weight_kn(node: ir.Node) -> np.ndarray | None:
    """The constant 2-D weight of a MatMul/Gemm as [K, N] (input channels first), else None."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    if node.inputs[1].const_value is None:
        return None
    w = node.inputs[1].const_value.numpy()
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        return w.T if node.attributes.get_int("transB", 0) else w
    return w
