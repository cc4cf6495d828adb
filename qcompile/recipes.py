"""Named quantization recipes: presets that expand into the pipeline's settings, savable as TOML.

    int8               static INT8 (W8A8) for the target, MSE calibration, 1 % accuracy budget
    fp8                static FP8 E4M3 (W8A8, s = amax/448, percentile ranges), 1 % accuracy budget
    fp16               no quantization: the mixed-precision pass writes FP16 (``high_precision``)
    w8a8-smoothquant   the same after SmoothQuant (alpha searched per layer unless given)
    w8-weight-only     INT8 weights, block 128, RTN, activations float (W8A16)
    w4-weight-only     INT4 weights, block 128, GPTQ, activations float (W4A16)

A recipe file holds the fields of :class:`Recipe` as ``key = value`` lines (TOML); loading it and
running it reproduces the run. ``high_precision`` (fp32 | fp16 | bf16; unset: the target's default,
fp16 on GPUs) is what the part that is not quantized runs in, for every kind.

What a static (W8A8) recipe keeps float is chosen by its ``accuracy_budget`` (qcompile/budget.py):
everything quantizable is planned, then layers fall back until the end metric on held-out data is
at most that much worse than FP32 (perplexity for a causal LM, else output cosine). Where there is
no held-out data to measure it on (random calibration data, a calibration set too small to split:
qcompile.budget.split_calibration), or the target's float part is not FP32, the per-node SQNR guard
``min_sqnr_db`` decides instead; asking for the guard (``--min-sqnr``) turns the budget off.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from qcompile.errors import InputSpecError, UnknownNameError
from qcompile.kv_cache import KV_CACHES, KvCache
from qcompile.passes.quant.nbits import Format
from qcompile.quant.observers import Method
from qcompile.targets import HIGH_PRECISIONS, HighPrecision

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Kind = Literal["static-int8", "weight-only", "float"]
StaticDType = Literal["int8", "fp8"]
Algorithm = Literal["rtn", "gptq", "awq"]
Bits = Literal[4, 8]
BlockSize = Literal[16, 32, 64, 128, 256]

#: The option lists, one source each (the CLI's choices and the recipe's validation read these).
KINDS: tuple[str, ...] = get_args(Kind)
METHODS: tuple[str, ...] = get_args(Method)
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
FORMATS: tuple[str, ...] = get_args(Format)
BITS: tuple[int, ...] = get_args(Bits)
BLOCK_SIZES: tuple[int, ...] = get_args(BlockSize)
STATIC_DTYPES: tuple[str, ...] = get_args(StaticDType)
#: MatMul/Gemm nodes whose INT8 output SQNR falls below this stay float (~4 % relative L2 error).
DEFAULT_MIN_SQNR_DB = 28.0
#: Static recipes: the end metric on held-out data at most 1 % worse than FP32 (qcompile/budget.py).
DEFAULT_ACCURACY_BUDGET = 0.01


#: Settings a recipe can turn off: None, written "off" in TOML (absent means the default, which is on).
OFF_KEYS = ("min_sqnr_db", "accuracy_budget")


@dataclass(frozen=True)
class Recipe:
    """Every setting of a quantization run."""

    name: str = "int8"
    kind: Kind = "static-int8"
    # static (W8A8)
    dtype: StaticDType = "int8"  # activations and weights: INT8, or FP8 E4M3 (opset 19)
    method: Method = "mse"
    per_channel: bool = True
    smoothquant: float | str | None = None  # alpha in [0, 1], "auto", or None
    min_sqnr_db: float | None = DEFAULT_MIN_SQNR_DB  # the guard: where there is no budget, or no data for it
    accuracy_budget: float | None = DEFAULT_ACCURACY_BUDGET  # relative drop of the end metric on held-out data
    quantize_attention: bool = False  # activation x activation MatMuls (Q·Kᵀ, scores·V) in INT8 too
    # weight-only
    bits: Bits = 8
    block_size: BlockSize = 128
    symmetric: bool = True
    algorithm: Algorithm = "rtn"
    format: Format = "matmulnbits"
    include_lm_head: bool = False
    include_embeddings: bool = False
    lm_head_bits: Bits | None = None  # the LM head (and a table tied to it) in other bits than the rest
    lm_head_block_size: BlockSize | None = None  # ... and in other blocks than the rest
    accuracy_level: int | None = None  # MatMulNBits; None: the faster on this CPU (measured)
    # every kind
    kv_cache: KvCache = "fp32"  # a fused decoder's KV cache: fp32 | fp16 | int8 (qcompile.kv_cache)
    samples: int = 64
    target: str = "ort-cpu"  # qcompile.targets
    high_precision: HighPrecision | None = None  # what is not quantized runs in; None: the target's default
    exclude: tuple[str, ...] = ()  # node names, op types or name patterns kept float

    def with_(self, **changes: Any) -> "Recipe":
        """A copy with the non-None ``changes`` applied."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def choosing_float(self, *, min_sqnr_db: Any = ..., accuracy_budget: Any = ...) -> "Recipe":
        """A copy that chooses what stays float as asked (``...``: as it is; None: off). Asking for
        the guard alone turns the budget off: the two are alternatives, not layers."""
        if min_sqnr_db is not ... and accuracy_budget is ...:
            accuracy_budget = None
        asked = {"min_sqnr_db": min_sqnr_db, "accuracy_budget": accuracy_budget}
        return dataclasses.replace(self, **{k: v for k, v in asked.items() if v is not ...})

    def validate(self) -> "Recipe":
        problems = []
        for key, allowed in (("kind", KINDS), ("bits", BITS), ("block_size", BLOCK_SIZES), ("algorithm", ALGORITHMS),
                             ("format", FORMATS), ("method", METHODS), ("dtype", STATIC_DTYPES),
                             ("kv_cache", KV_CACHES)):
            if getattr(self, key) not in allowed:
                problems.append(f"{key} {getattr(self, key)!r} ({' | '.join(map(str, allowed))})")
        for key, allowed in (("lm_head_bits", BITS), ("lm_head_block_size", BLOCK_SIZES)):
            if getattr(self, key) not in (None, *allowed):
                problems.append(f"{key} {getattr(self, key)!r} ({' | '.join(map(str, allowed))})")
        if self.accuracy_budget is not None and not self.accuracy_budget >= 0:
            problems.append(f"accuracy_budget {self.accuracy_budget!r} (a relative drop >= 0, e.g. 0.01)")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            problems.append(f"accuracy_level {self.accuracy_level!r} (0..4)")
        sq = self.smoothquant
        if sq is not None and sq != "auto" and not (isinstance(sq, (int, float)) and 0 <= sq <= 1):
            problems.append(f"smoothquant {sq!r} (alpha in [0, 1] or 'auto')")
        if self.high_precision not in (None, *HIGH_PRECISIONS):
            problems.append(f"high_precision {self.high_precision!r} ({' | '.join(HIGH_PRECISIONS)})")
        from qcompile import targets

        if self.target not in targets.names():
            problems.append(f"target {self.target!r} ({' | '.join(targets.names())})")
        if problems:
            raise InputSpecError(f"invalid recipe {self.name!r}: " + "; ".join(problems),
                                 fix="fix the recipe file or flags")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.kind == "static-int8" or (self.kind == "weight-only" and self.algorithm in ("gptq", "awq"))

    def precision(self, target_default: str = "fp32") -> str:
        """What the recipe runs, in a target's terms (qcompile.targets.PRECISIONS)."""
        if self.kind == "float":
            return self.high_precision or target_default
        if self.kind == "weight-only":
            return f"int{self.bits}"
        return self.dtype

    def to_toml(self) -> str:
        lines = ["# qcompile quantization recipe"]
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in OFF_KEYS:
                value = "off"  # absent would mean the default, which is on
            elif value is None:
                continue  # TOML has no null: absent means None
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = "[" + ", ".join(_toml_string(v) for v in value) + "]"
            elif isinstance(value, (int, float)):
                text = repr(value)
            else:
                text = _toml_string(value)
            lines.append(f"{f.name} = {text}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, where: str = "recipe") -> "Recipe":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InputSpecError(f"cannot parse recipe: {exc}", where=where,
                                 fix="write it as key = value lines") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputSpecError(f"unknown recipe key {unknown[0]!r}", where=where,
                                 fix=f"keys: {', '.join(sorted(known))}")
        defaults = {f.name: None for f in fields(cls) if f.name in ("smoothquant", "accuracy_level", "high_precision")}
        for key in OFF_KEYS:
            if data.get(key) == "off":
                data[key] = None
            elif key in data and (isinstance(data[key], bool) or not isinstance(data[key], (int, float))):
                raise InputSpecError(f"recipe key {key!r} must be a number or \"off\"", where=where,
                                     fix=f'write {key} = 0.01, or {key} = "off"')
        if data.get("kind", "static-int8") != "static-int8":
            if data.get("accuracy_budget") is not None:
                raise InputSpecError(f"recipe key 'accuracy_budget' applies to static recipes only, not "
                                     f"kind {data['kind']!r}", where=where,
                                     fix='remove it (or write accuracy_budget = "off"), or use kind = "static-int8"')
            data["accuracy_budget"] = None  # the dataclass default is a static recipe's
        if "exclude" in data:
            if not isinstance(data["exclude"], list) or not all(isinstance(x, str) for x in data["exclude"]):
                raise InputSpecError("recipe key 'exclude' must be a list of strings", where=where,
                                     fix='write exclude = ["NodeName", "Softmax"]')
            data["exclude"] = tuple(data["exclude"])
        return cls(**{**defaults, **data}).validate()

    def save(self, path: str | Path) -> None:
        """Write the recipe as TOML, atomically (a temp file beside it, then a rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_toml())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise InputSpecError("recipe file not found", where=str(path), fix="check the path")
        return cls.from_toml(path.read_text(), where=str(path))


PRESETS: dict[str, Recipe] = {
    "int8": Recipe(),
    # the guard's level is measured, not derived: docs/benchmarks.md has the guard rows of tools/bench_llm.py
    # its guard, where no budget can be measured, is LLM-grade: under 34 dB output SQNR (~2 % relative error)
    "w8a8-smoothquant": Recipe(name="w8a8-smoothquant", smoothquant="auto", min_sqnr_db=34.0),
    # FP8 ranges: the 99.999th percentile of |x|. Measured on tensorrt placement (docs/benchmarks.md):
    # min-max lets rare outliers stretch s = amax/448 until small values fall into E4M3's subnormals
    # (SmolLM2 PPL 15.56), mse's clipping is tuned to the uniform INT8 grid (15.55), percentile 15.42
    # with 180 MatMuls in FP8; MiniLM keeps the same 35 either way (R@1 0.396, cosine 0.9977)
    "fp8": Recipe(name="fp8", dtype="fp8", method="percentile"),
    "fp16": Recipe(name="fp16", kind="float", high_precision="fp16", min_sqnr_db=None, accuracy_budget=None),
    "w8-weight-only": Recipe(name="w8-weight-only", kind="weight-only", bits=8, block_size=128, algorithm="rtn",
                             accuracy_budget=None),
    "w4-weight-only": Recipe(name="w4-weight-only", kind="weight-only", bits=4, block_size=128, algorithm="gptq",
                             samples=32, accuracy_budget=None),
}


#: A precision asked for without a recipe: the preset it starts from (qcompile.targets.PRECISIONS)
PRECISION_PRESETS = {"fp32": "fp16", "fp16": "fp16", "bf16": "fp16", "int8": "int8", "fp8": "fp8",
                     "int4": "w4-weight-only"}


def with_precision(recipe: Recipe, precision: str | None) -> Recipe:
    """``recipe`` made to run ``precision`` (None: as it is): a float precision makes it the float
    recipe in that type, int8/fp8 a static one of that element type (fp8: the fp8 preset's ranges), int4 a
    4-bit weight-only one; target, exclusions and high precision carry over."""
    if precision is None:
        return recipe
    if precision in HIGH_PRECISIONS:
        return dataclasses.replace(recipe, kind="float", high_precision=precision)
    carried = {"target": recipe.target, "exclude": recipe.exclude, "high_precision": recipe.high_precision}
    if precision == "int4":
        if recipe.kind == "weight-only" and recipe.bits == 4:
            return recipe
        return dataclasses.replace(preset("w4-weight-only"), **carried)
    if recipe.kind != "static-int8":
        recipe = dataclasses.replace(preset("int8"), **carried)
    method = PRESETS["fp8"].method if precision == "fp8" and recipe.dtype != "fp8" else recipe.method
    return dataclasses.replace(recipe, dtype=precision, method=method)


def preset(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownNameError(f"unknown recipe {name!r}", fix=f"choose from: {', '.join(PRESETS)}") from None


def _toml_string(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_recipe(model, recipe: Recipe, reader=None, *, target: str | None = None, exclude=(), verify_options=None,
               guard_runs=None):
    """Run ``recipe`` on ``model`` (path or ir.Model) through :class:`qcompile.pipeline.Pipeline`.

    ``target`` and ``exclude`` override (extend) the recipe's; ``verify_options`` (a VerifyOptions):
    the feeds the float model is verified on and the quantized model compared with it on."""
    from qcompile.pipeline import Pipeline

    if exclude:
        recipe = dataclasses.replace(recipe, exclude=tuple(dict.fromkeys([*recipe.exclude, *exclude])))
    return Pipeline(recipe, target).run(model, reader, verify_options=verify_options, guard_runs=guard_runs)
