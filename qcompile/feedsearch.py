"""Verification feeds that fit the model: sizes for symbolic dims on which the *original* model runs.

A symbolic dim has no size to read off the graph, and a default that suits one architecture breaks
another (a detector needs H, W multiples of 32; a voice model a minimum audio length). When the user
gave neither sizes nor data, candidate sizes are tried on the original model, in order, and the
first on which it runs is kept:

    image-like inputs ([N, C, H, W] or [N, H, W, C] with C <= 4): H = W in IMAGE_SIZES
    every other symbolic dim past the batch axis (and the only axis of a rank-1 input): SEQ_SIZES

Dims that share a name get one size. If no candidate runs, the user's model cannot be verified on
random data: :class:`InputModelError` (exit 2) says so and how to give sizes or data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from qcompile import decoder, specs
from qcompile.errors import BackendFailedError, InputModelError
from qcompile.specs import InputSpec

IMAGE_SIZES: tuple[int, ...] = (224, 256, 320, 640, 32, 64, 128)
SEQ_SIZES: tuple[int, ...] = (specs.DEFAULT_SEQ, 32, 64, 128, 256, 512, 1024, 8, 1)
#: Candidate shapes tried at most (each is one run of the original model on one feed).
MAX_TRIES = 16

Feed = dict[str, np.ndarray]


def spatial_axes(spec: InputSpec) -> tuple[int, ...]:
    """The symbolic H, W axes of an image-like input, or () when it is not one."""
    shape = spec.shape
    if len(shape) != 4 or not np.issubdtype(spec.dtype, np.floating) or decoder.PAST.match(spec.name):
        return ()  # a KV cache [B, kv_heads, past, head_dim] is no image
    for channel_axis, spatial in ((1, (2, 3)), (3, (1, 2))):
        channels = shape[channel_axis]
        if isinstance(channels, int) and 1 <= channels <= 4 and any(not isinstance(shape[a], int) for a in spatial):
            return spatial
    return ()


def symbolic(spec: InputSpec) -> bool:
    return any(not isinstance(dim, int) for dim in spec.shape)


@dataclass(frozen=True)
class Candidate:
    """One assignment of sizes: an image side for spatial dims, a length for the others."""

    image: int | None
    seq: int | None

    def shapes(self, input_specs: Sequence[InputSpec], batch: int) -> dict[str, tuple[int, ...]]:
        """Concrete shapes per input; dims with one name get one size (the first input's)."""
        named: dict[str, int] = {}
        shapes = {}
        for spec in input_specs:
            spatial = spatial_axes(spec)
            out = []
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, int):
                    out.append(dim)
                    continue
                if dim is not None and dim in named:
                    out.append(named[dim])
                    continue
                if axis in spatial:
                    size = self.image or specs.DEFAULT_SEQ
                elif axis == 0 and len(spec.shape) > 1:
                    size = batch
                else:
                    size = self.seq or specs.DEFAULT_SEQ
                if dim is not None:
                    named[dim] = size
                out.append(size)
            shapes[spec.name] = tuple(out)
        return shapes

    def describe(self) -> str:
        parts = [f"image {self.image}x{self.image}"] if self.image else []
        return ", ".join(parts + ([f"length {self.seq}"] if self.seq else [])) or "static shapes"


def candidates(input_specs: Sequence[InputSpec]) -> list[Candidate]:
    """Candidate size assignments, most plausible first, at most MAX_TRIES."""
    has_image = any(spatial_axes(s) for s in input_specs)
    has_seq = any(
        not isinstance(dim, int) and axis not in spatial_axes(s) and (axis > 0 or len(s.shape) == 1)
        for s in input_specs for axis, dim in enumerate(s.shape)
    )
    images = IMAGE_SIZES if has_image else (None,)
    seqs = SEQ_SIZES if has_seq else (None,)
    out = [Candidate(image, seq) for seq in seqs for image in images]
    return out[:MAX_TRIES]


def fitting_feeds(
    input_specs: Sequence[InputSpec],
    run: Callable[[Feed], object],
    *,
    samples: int = 2,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    batch: int | None = None,
    seq: int | None = None,
) -> tuple[list[Feed], str]:
    """Seeded random feeds on which ``run`` (the original model) succeeds, and how they were sized.

    Sizes the user gave (``dims``, ``batch``, ``seq``) are used as given, with no search."""
    input_specs = list(input_specs)
    user_sized = bool(dims) or batch is not None or seq is not None
    if user_sized or not any(symbolic(s) for s in input_specs):
        feeds = [specs.random_feed(input_specs, seed=seed + i, dims=dims, batch=batch, seq=seq) for i in range(samples)]
        _run_original(run, feeds[0], "the sizes given" if user_sized else "its static shapes")
        return feeds, "given sizes" if user_sized else "static shapes"
    tried, last_error = [], ""
    for candidate in candidates(input_specs):
        shapes = candidate.shapes(input_specs, batch=specs.DEFAULT_BATCH)
        first = specs.random_feed(input_specs, seed=seed, shapes=shapes)
        tried.append(candidate.describe())
        try:
            run(first)
        except BackendFailedError as exc:
            last_error = exc.what
            continue
        rest = [specs.random_feed(input_specs, seed=seed + i, shapes=shapes) for i in range(1, samples)]
        return [first, *rest], candidate.describe()
    raise InputModelError(
        f"the original model did not run on random feeds of any size tried ({'; '.join(tried)}); "
        f"last error: {_first_line(last_error)}",
        fix="give the sizes of its symbolic dims with --dim NAME=N, or real inputs with --data FILE.npz",
    )


def _run_original(run: Callable[[Feed], object], feed: Feed, how: str) -> None:
    try:
        run(feed)
    except BackendFailedError as exc:
        raise InputModelError(
            f"the original model did not run on random feeds of {how}: {_first_line(exc.what)}",
            fix="give other sizes with --dim NAME=N, or real inputs with --data FILE.npz",
        ) from None


def _first_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
