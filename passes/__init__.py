"""Graph passes, by name. Every pass is an onnx-ir pass; names are what the CLI's --passes takes.

``DEFAULT_PIPELINE`` is the FP32 optimization qcompile runs by default: canonicalise, fold, fuse,
clean up, in an order where each step exposes work for the next.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from qcompile.passes.graph.cleanup import (
    cse,
    dead_code,
    dedup_initializers,
    default_attributes,
    identity,
    lift_constants,
    no_op,
    topo_sort,
)
from qcompile.passes.graph.folding import constant_folding, fold_weights
from qcompile.passes.graph.fuse_attention import fuse_attention
from qcompile.passes.graph.fuse_batchnorm import fuse_batchnorm
from qcompile.passes.graph.fuse_gelu import fuse_gelu
from qcompile.passes.graph.fuse_gemm import fuse_gemm
from qcompile.passes.graph.fuse_layernorm import fuse_layernorm
from qcompile.passes.graph.fuse_skip_norm import fuse_skip_layernorm, fuse_skip_norm
from qcompile.passes.graph.shapes import clear_shapes, shape_inference

PASSES: dict[str, Callable[[], ir.passes.PassBase]] = {
    "default-attributes": default_attributes,
    "lift-constants": lift_constants,
    "shape-inference": shape_inference,
    "constant-folding": constant_folding,
    "fold-weights": fold_weights,
    "identity": identity,
    "no-op": no_op,
    "cse": cse,
    "dedup-initializers": dedup_initializers,
    "fuse-batchnorm": fuse_batchnorm,
    "fuse-gemm": fuse_gemm,
    "fuse-layernorm": fuse_layernorm,
    "fuse-gelu": fuse_gelu,
    "fuse-attention": fuse_attention,
    "fuse-skip-norm": fuse_skip_norm,
    "fuse-skip-layernorm": fuse_skip_layernorm,
    "dead-code": dead_code,
    "topo-sort": topo_sort,
    "clear-shapes": clear_shapes,
}

DEFAULT_PIPELINE: tuple[str, ...] = (
    "default-attributes",
    "lift-constants",
    "shape-inference",
    "constant-folding",
    "identity",
    "no-op",
    "dedup-initializers",  # before cse: nodes that differ only in duplicate constants then merge
    "cse",
    "fuse-batchnorm",
    "fuse-layernorm",
    "fuse-gelu",
    "fuse-attention",
    "fuse-skip-norm",
    "fuse-gemm",
    "dead-code",
    "topo-sort",
)

#: The relative L2 error each fusion's numerics justify, where it is more than an exact rewrite's 1e-5.
#: A fused kernel evaluates the same function with another float evaluation order or another
#: approximation (ORT's Gelu/LayerNormalization/Gemm kernels; BatchNorm scales folded into weights
#: rounded once instead of applied after the conv): each output element moves by a few ulps
#: (~1e-7 relative), and a deep network amplifies that to 1e-5 – 1e-4 at its output. A semantic
#: change — a wrong constant, axis or branch — is 1e-2 or more, so 1e-4 still catches every one.
FUSION_REL_L2 = 1e-4
PASS_BOUNDS: dict[str, float] = {
    "fuse-batchnorm": FUSION_REL_L2,
    "fuse-layernorm": FUSION_REL_L2,
    "fuse-gelu": FUSION_REL_L2,
    "fuse-gemm": FUSION_REL_L2,
    "fuse-skip-norm": FUSION_REL_L2,
    "fuse-skip-layernorm": FUSION_REL_L2,
    "fuse-attention": FUSION_REL_L2,
}

#: Passes that change annotations only (value shapes and types), never what the graph computes:
#: the pass manager verifies them exactly by comparing the graph's structure, without a run.
ANNOTATION_ONLY: frozenset[str] = frozenset({"shape-inference", "clear-shapes"})

#: Passes that write ONNX Runtime's contrib ops (com.microsoft) below the opset where a standard op
#: exists: only ONNX Runtime targets run them (a GPU compiler's ONNX parser has no such ops).
CONTRIB_PASSES: frozenset[str] = frozenset({"fuse-gelu", "fuse-skip-norm", "fuse-skip-layernorm", "fuse-attention"})

#: The pipeline for ONNX Runtime's GPU providers: the default one (ORT CPU's) plus the contrib fusions
#: whose CPU kernels run slower than the ops they replace — SkipLayerNormalization, 3.7-5.5x slower than
#: Add + LayerNormalization at 128 rows on ORT 1.32's CPU (tools/bench_skip_norm.py); ORT fuses it for GPUs only.
_AFTER_SKIP_NORM = DEFAULT_PIPELINE.index("fuse-skip-norm") + 1
ORT_GPU_PIPELINE: tuple[str, ...] = (*DEFAULT_PIPELINE[:_AFTER_SKIP_NORM], "fuse-skip-layernorm",
                                     *DEFAULT_PIPELINE[_AFTER_SKIP_NORM:])

def quantization_pipeline(passes: tuple[str, ...]) -> tuple[str, ...]:
    """A target's passes as a quantizer runs them: with ``fold-weights`` after constant folding, so
    weights that a constant subgraph computes reach the quantizer as constants."""
    at = passes.index("constant-folding") + 1 if "constant-folding" in passes else 0
    return (*passes[:at], "fold-weights", *passes[at:])


#: Run once after the default pipeline reaches its fixed point.
FINAL_PASSES: tuple[str, ...] = ("clear-shapes",)


def make_pass(name: str) -> ir.passes.PassBase:
    """A fresh pass by name; KeyError lists the known names."""
    try:
        factory = PASSES[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(PASSES)}") from None
    made = factory()
    if name in PASS_BOUNDS:
        made.rel_l2_bound = PASS_BOUNDS[name]
    if name in ANNOTATION_ONLY:
        made.annotates_only = True
    return made


__all__ = ["CONTRIB_PASSES", "ORT_GPU_PIPELINE", "DEFAULT_PIPELINE", "FINAL_PASSES", "PASSES", "make_pass"]
