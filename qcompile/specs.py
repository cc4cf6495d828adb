"""Input specs of a model and seeded random feeds built from them.

Symbolic dimensions get defaults: the first dimension is the batch, every other one the sequence
length, unless the user names the dimension explicitly (``dims={"sequence": 128}``).
Integer inputs are drawn from a range that is valid for the model: masks are all ones, token-type
ids zeros, and indices that feed a ``Gather`` stay below the gathered table's first dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx_ir as ir

from qcompile import decoder
from qcompile.errors import InputSpecError

DEFAULT_BATCH = 1
DEFAULT_SEQ = 16
DEFAULT_INT_HIGH = 100


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, and shape (ints, or strings for symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    int_high: int | None = None  # exclusive upper bound for integer inputs, when known

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype), "shape": list(self.shape)}


def _int_bound(value: ir.Value) -> int | None:
    """Exclusive upper bound for an index input, from the tables it gathers from."""
    bounds = []
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
            shape = node.inputs[0].shape
            axis = node.attributes.get_int("axis", 0)
            if shape is not None and isinstance(shape[axis], int):
                bounds.append(shape[axis])
    return min(bounds) if bounds else None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The specs of the model's real inputs (initializers listed as inputs are skipped). A negative
    static dim (paddle2onnx writes -1) means unknown: it is symbolic here."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise InputSpecError(f"input {value.name!r} has no element type",
                                 fix="re-export the model with typed inputs")
        shape = tuple(
            (dim if dim >= 0 else None) if isinstance(dim, int) else (dim.value if dim.value is not None else None)
            for dim in (value.shape or [])
        )
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), shape, _int_bound(value)))
    return specs


def resolve_shape(
    spec: InputSpec, dims: Mapping[str, int] | None = None, batch: int | None = None, seq: int | None = None
) -> tuple[int, ...]:
    """Concrete shape for ``spec``: named overrides first, then batch (axis 0) / seq (other axes)."""
    dims = dims or {}
    out = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            out.append(dim)
        elif dim is not None and dim in dims:
            out.append(int(dims[dim]))
        elif axis == 0:
            out.append(batch or DEFAULT_BATCH)
        else:
            out.append(seq or DEFAULT_SEQ)
    return tuple(out)


def random_feed(
    specs: list[InputSpec],
    *,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    batch: int | None = None,
    seq: int | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """One seeded random feed for ``specs`` (same seed, same feed); ``shapes`` fixes whole shapes by
    input name (as the feed search chooses them)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = shapes[spec.name] if shapes and spec.name in shapes else resolve_shape(spec, dims, batch, seq)
        lname = spec.name.lower()
        if spec.dtype == np.bool_:
            feed[spec.name] = np.ones(shape, dtype=np.bool_)
        elif np.issubdtype(spec.dtype, np.integer):
            if "mask" in lname:
                feed[spec.name] = np.ones(shape, dtype=spec.dtype)
            elif "type" in lname or "segment" in lname:
                feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
            elif "position" in lname and len(shape) >= 1:
                feed[spec.name] = np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
            else:
                high = spec.int_high or DEFAULT_INT_HIGH
                feed[spec.name] = rng.integers(0, high, size=shape, dtype=spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            raise InputSpecError(
                f"cannot make random data for input {spec.name!r} of type {spec.dtype}"
                + (" (text)" if spec.dtype == np.object_ else ""),
                fix="pass real data with --data" + (f" (text as a numpy str array: np.savez(FILE, {spec.name}="
                                                    "np.array([...])))" if spec.dtype == np.object_ else ""),
            )
    sig = decoder.signature(specs)
    return sig.fit(feed) if sig else feed


def validate_feed(specs: list[InputSpec], feed: Mapping[str, np.ndarray], where: str = "feed") -> None:
    """Check names, dtypes and ranks of a feed against the model's inputs. Text for a string input
    comes as a numpy str or bytes array (an .npz never holds object arrays: they would be unpickled)
    and is turned, in place, into the object array of str ONNX Runtime takes."""
    expected = {s.name: s for s in specs}
    missing = [name for name in expected if name not in feed]
    if missing:
        raise InputSpecError(f"{where} lacks input {missing[0]!r}", fix=f"provide arrays named {sorted(expected)}")
    for name, array in feed.items():
        spec = expected.get(name)
        if spec is None:
            raise InputSpecError(f"{where} has unknown input {name!r}",
                                 fix=f"the model's inputs are {sorted(expected)}")
        array = np.asarray(array)
        if spec.dtype == np.object_ and array.dtype.kind in "US" and isinstance(feed, dict):
            array = np.char.decode(array, "utf-8") if array.dtype.kind == "S" else array
            feed[name] = array = array.astype(object)
        if array.dtype != spec.dtype:
            raise InputSpecError(
                f"input {name!r} in {where} has dtype {array.dtype}, the model wants {spec.dtype}",
                fix="cast the data to the model's dtype",
            )
        if spec.shape and array.ndim != len(spec.shape):
            raise InputSpecError(
                f"input {name!r} in {where} has rank {array.ndim}, the model wants {len(spec.shape)}",
                fix=f"reshape it to {list(spec.shape)}",
            )
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and array.shape[axis] != dim:
                raise InputSpecError(
                    f"input {name!r} in {where} has size {array.shape[axis]} on axis {axis}, the model wants {dim}",
                    fix=f"reshape it to {list(spec.shape)}",
                )


def parse_dims(items: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Parse ``NAME=VALUE`` pairs from the CLI into a dims override mapping."""
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) <= 0:
            raise InputSpecError(f"bad --dim {item!r}", fix="write it as NAME=POSITIVE_INT, e.g. --dim sequence=128")
        dims[name.strip()] = int(value)
    return dims
