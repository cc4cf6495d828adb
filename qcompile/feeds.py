"""Feeds from files: an .npz whose arrays are named after the model's inputs.

An array whose rank is the input's rank holds one sample; one rank higher holds samples stacked
on a new leading axis. Every feed is validated against the model's inputs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from qcompile import decoder
from qcompile.errors import InputSpecError
from qcompile.specs import InputSpec, validate_feed


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz, refusing before anything is allocated: a file that is not a zip of
    .npy arrays, object arrays (never unpickled), and arrays whose header claims more bytes than
    the archive holds. Arrays come back in native byte order."""
    path = Path(path)
    if not path.is_file():
        raise InputSpecError("data file not found", where=str(path), fix="pass an existing .npz file")
    fix = "write it with numpy.savez, arrays named after the model's inputs"
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_member(archive, info, path)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except InputSpecError:
        raise
    except zipfile.BadZipFile:
        raise InputSpecError("not an .npz file (a zip archive of .npy arrays)", where=str(path), fix=fix) from None
    except (OSError, ValueError, EOFError, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise InputSpecError(f"cannot read .npz: {' '.join(str(exc).split())}", where=str(path), fix=fix) from None
    return {name: a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("=")) for name, a in arrays.items()}


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    if info.is_dir():
        return
    name = info.filename
    if not name.endswith(".npy"):
        raise InputSpecError(f"member {name!r} is not a .npy array", where=str(path),
                             fix="the .npz must hold only arrays (numpy.savez)")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
        header_bytes = member.tell()
    array = name[:-4]
    if dtype.hasobject:
        raise InputSpecError(
            f"array {array!r} holds Python objects (dtype {dtype}); qcompile never unpickles data", where=str(path),
            fix="save plain numeric arrays (e.g. np.asarray(x, dtype=np.float32)) with numpy.savez")
    count = 1
    for dim in shape:
        count *= dim
    declared = count * dtype.itemsize
    if declared > info.file_size - header_bytes:
        raise InputSpecError(
            f"array {array!r} declares shape {list(shape)} ({declared:,} bytes) but holds "
            f"{max(info.file_size - header_bytes, 0):,} bytes", where=str(path),
            fix="the file is truncated or corrupt; rewrite it")


def load_npz_feeds(path: str | Path, input_specs: list[InputSpec],
                   limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds from one .npz (samples stacked or single)."""
    path = Path(path)
    arrays = read_npz(path)
    if not arrays:
        raise InputSpecError("the .npz holds no arrays", where=str(path), fix="save one array per model input")
    by_name = {s.name: s for s in input_specs}
    stacked = None
    for name, array in arrays.items():
        spec = by_name.get(name)
        if spec is None:
            raise InputSpecError(f"array {name!r} is not a model input", where=str(path),
                                 fix=f"name arrays after the inputs: {sorted(by_name)}")
        is_stacked = array.ndim == len(spec.shape) + 1
        if stacked is None:
            stacked = is_stacked
        elif stacked != is_stacked:
            raise InputSpecError("some arrays are stacked samples and some are single samples", where=str(path),
                                 fix="stack every input on a new leading axis, or none")
    if stacked:
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise InputSpecError("stacked arrays have different sample counts", where=str(path),
                                 fix="give every input the same number of samples")
        n = counts.pop()
        if n == 0:
            raise InputSpecError("the .npz holds 0 samples (its stacked arrays are empty)", where=str(path),
                                 fix="stack at least one sample on the leading axis")
        feeds = [{name: np.asarray(a[i]) for name, a in arrays.items()} for i in range(n)]  # 0-d stays an array
    else:
        feeds = [arrays]
    if limit is not None:
        feeds = feeds[:limit]
    feeds = [decoder.complete(input_specs, feed) for feed in feeds]  # a cache decoder's prompt-only samples
    for i, feed in enumerate(feeds):
        validate_feed(input_specs, feed, where=f"sample {i} of {path}")
    return feeds
