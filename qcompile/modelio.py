"""Model I/O on onnx-ir: validated loading, atomic saving, external data, opset conversion.

Protobuf is touched only here, at the edges. Weights stored as external data stay memory-mapped by
onnx-ir, and so do the inline weights of large files (their bytes are referenced in place, see
qcompile/wire.py); large models are written tensor by tensor, never through one protobuf message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qcompile import interrupts, opaque
from qcompile.errors import (
    ExternalDataError,
    InvalidModelError,
    ModelLoadError,
    OutputPathError,
)
from qcompile.passes.irutil import drop_resident
from qcompile.runtimes import SharedWeightsModel
from qcompile.wire import WireFormatError, map_inline_weights

log = logging.getLogger(__name__)

#: Models whose initializers add up to more than this are saved with external data by default.
AUTO_EXTERNAL_BYTES = 256 * 1024 * 1024
#: Files at least this large have their inline weights memory-mapped instead of parsed into memory.
MAP_INLINE_MIN_FILE_BYTES = 64 * 1024 * 1024
#: Protobuf's hard limit for one message; a model above it can only exist with external data.
PROTOBUF_LIMIT = 2**31 - 1


def load(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load an ONNX model into onnx-ir, validating it on the way in.

    External data is memory-mapped, never copied. Raises :class:`ModelLoadError` for a file that is
    missing, empty or not ONNX, :class:`ExternalDataError` for external data that is missing or
    escapes the model's folder, and :class:`InvalidModelError` when ``check`` and the ONNX checker
    rejects the graph.
    """
    path = Path(path)
    proto, anchor = _read_proto(path)
    _check_structure(proto, anchor)
    if check:
        _run_checker(proto, path)
    tail = opaque.split_map_tail(proto, path)  # what onnx-ir cannot represent stays opaque
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(anchor.parent.resolve()))
    model.meta["qcompile.source_path"] = str(path.resolve())
    if tail is not None:
        model.meta[opaque.META_KEY] = tail
    return model


def _read_proto(path: Path) -> tuple[onnx.ModelProto, Path]:
    """The model's proto, and the path its external data locations are relative to (the file's
    real path where its inline weights were memory-mapped: a symlinked model maps its target)."""
    if not path.exists():
        raise ModelLoadError("model file not found", where=str(path), fix="check the path and try again")
    if path.is_dir():
        raise ModelLoadError("expected an .onnx file, got a folder", where=str(path),
                             fix="name the model file inside it")
    stat = path.stat()
    if stat.st_size == 0:
        raise ModelLoadError("model file is empty (0 bytes)", where=str(path), fix="re-export the model")
    # onnx-ir refuses to map a file with several hard links; such files are parsed as usual.
    if stat.st_size >= MAP_INLINE_MIN_FILE_BYTES and stat.st_nlink == 1:
        real = path.resolve()
        try:
            proto, mapped, external = map_inline_weights(real)
        except (WireFormatError, DecodeError, RuntimeError):
            pass  # the parse below reports what is wrong
        else:
            # External data of a symlinked model lies next to the link, mapped weights in the target.
            if not external or real.parent == path.parent.resolve():
                log.debug("%s: %d inline initializers memory-mapped", path, mapped)
                return _require_model(proto, path), real
    try:
        proto = onnx.load(str(path), format="protobuf", load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:  # RecursionError is a RuntimeError
        text = str(exc).lower().replace("_", "")
        if isinstance(exc, RecursionError) or "maxdepth" in text or "levels of nesting" in text:
            raise _too_deep(
                path, "messages deeper than protobuf parses (100 levels, about 30 nested subgraphs)") from None
        raise ModelLoadError(
            f"not a valid ONNX protobuf ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'parse failed'})",
            where=str(path),
            fix="the file may be truncated or not ONNX; re-export it",
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file: {exc.strerror}", where=str(path),
                             fix="check permissions") from None
    return _require_model(proto, path), path


def _require_model(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(
            "file parsed but holds no ONNX model (no ir_version, graph or opset_import)",
            where=str(path),
            fix="pass a binary .onnx file written by an ONNX exporter",
        )
    return proto


#: Subgraphs (If/Loop/Scan bodies) nested more deeply than this are refused. Exported models nest a
#: few levels; protobuf itself stops parsing at 100 message levels (about 30 nested Ifs), and every
#: walk over a graph (the checker, onnx-ir, the passes) recurses once per level.
MAX_SUBGRAPH_DEPTH = 16


def _too_deep(path: Path, how: str) -> ModelLoadError:
    return ModelLoadError(
        f"model nests {how}", where=str(path),
        fix=f"qcompile accepts at most {MAX_SUBGRAPH_DEPTH} levels of subgraphs; "
            "flatten the control flow in the exporter",
    )


def _graphs(proto: onnx.ModelProto, path: Path) -> Iterator[onnx.GraphProto | onnx.FunctionProto]:
    """The main graph, the local functions and every subgraph in them, walked without recursion;
    refuses nesting deeper than :data:`MAX_SUBGRAPH_DEPTH`."""
    stack: list[tuple[onnx.GraphProto | onnx.FunctionProto, int]] = [(proto.graph, 0)]
    stack.extend((function, 0) for function in proto.functions)
    while stack:
        graph, depth = stack.pop()
        if depth > MAX_SUBGRAPH_DEPTH:
            raise _too_deep(path, f"subgraphs (If/Loop/Scan bodies) more than {MAX_SUBGRAPH_DEPTH} levels deep")
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append((attr.g, depth + 1))
                stack.extend((sub, depth + 1) for sub in attr.graphs)


def _tensors(graph: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.TensorProto]:
    """The dense tensors a graph holds itself: initializers and tensor attributes (not subgraphs')."""
    if isinstance(graph, onnx.GraphProto):
        yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
            for tensor in sparse:
                yield tensor.values
                yield tensor.indices


def _elements(tensor: onnx.TensorProto, where: str) -> int:
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise InvalidModelError(f"tensor {tensor.name!r} has a negative dimension {list(tensor.dims)}", where=where,
                                    fix="the file is corrupt or its exporter is broken; re-export the model")
        count *= dim  # Python ints: no overflow, whatever the dims claim
    return count


def _bits(tensor: onnx.TensorProto) -> int | None:
    try:
        return ir.DataType(tensor.data_type).bitwidth
    except (TypeError, ValueError):
        return None  # strings, or a type the checker reports


#: The repeated field each element type stores its values in, when not in raw_data.
_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.COMPLEX64: "float_data",
    onnx.TensorProto.DOUBLE: "double_data", onnx.TensorProto.COMPLEX128: "double_data",
    onnx.TensorProto.INT64: "int64_data", onnx.TensorProto.UINT32: "uint64_data",
    onnx.TensorProto.UINT64: "uint64_data", onnx.TensorProto.STRING: "string_data",
}
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _describe(tensor: onnx.TensorProto, count: int) -> str:
    dims = list(tensor.dims)
    shown = str(dims) if len(dims) <= 8 else f"{dims[:8]}…"
    return f"tensor {tensor.name!r} declares dims {shown} ({count:,} elements"


def _check_tensor(tensor: onnx.TensorProto, where: str, base: Path) -> None:
    """Refuse a tensor whose dims disagree with the data it holds, before any of it is read:
    whatever the dims claim, nothing larger than the bytes in the file is ever allocated."""
    count = _elements(tensor, where)
    bits = _bits(tensor)
    exact = bits is not None and (bits % 8 == 0 or bits in (2, 4))
    nbytes = -(-count * bits // 8) if exact else None
    fix = "the file is corrupt or its exporter is broken; re-export the model"
    external = tensor.data_location == onnx.TensorProto.EXTERNAL
    raw = len(tensor.raw_data) if tensor.HasField("raw_data") else 0  # one transient copy, at most the file's bytes
    held = [name for name in _DATA_FIELDS if (raw if name == "raw_data" else len(getattr(tensor, name)))]
    if external:
        if held:
            raise InvalidModelError(f"tensor {tensor.name!r} holds both external and inline data ({held[0]})",
                                    where=where, fix=fix)
        _check_external(tensor, f"tensor {tensor.name!r} of {where}", base, nbytes, count)
        return
    if len(held) > 1:
        raise InvalidModelError(f"tensor {tensor.name!r} holds its data in two fields ({held[0]}, {held[1]})",
                                where=where, fix=fix)
    if not held:
        if count:
            raise InvalidModelError(f"{_describe(tensor, count)}) but holds no data", where=where, fix=fix)
        return
    if held[0] == "raw_data":
        if tensor.data_type == onnx.TensorProto.STRING:
            raise InvalidModelError(f"string tensor {tensor.name!r} holds raw_data", where=where, fix=fix)
        if nbytes is not None and raw != nbytes:
            raise InvalidModelError(
                f"{_describe(tensor, count)}, {nbytes:,} bytes) but holds {raw:,} bytes",
                where=where, fix=fix)
        return
    if bits is None and tensor.data_type != onnx.TensorProto.STRING:
        return  # an unknown element type: the checker names it
    field_name = _TYPED_FIELDS.get(tensor.data_type, "int32_data")
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        wanted = 2 * count
    elif bits is not None and bits < 8:
        wanted = nbytes if exact else None  # sub-byte values packed into bytes, one per int32
    else:
        wanted = count
    have = len(getattr(tensor, field_name))
    if held[0] != field_name or (wanted is not None and have != wanted):
        raise InvalidModelError(
            f"{_describe(tensor, count)}) but holds {len(getattr(tensor, held[0])):,} values in {held[0]}",
            where=where, fix=fix)


def _check_external(tensor: onnx.TensorProto, where: str, base: Path, nbytes: int | None, count: int) -> None:
    """External data: a relative location inside the model's folder (symbolic links are followed,
    and must stay inside it too), a regular file, and exactly the bytes the dims need."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location or os.path.isabs(location) or "\0" in location:
        raise ExternalDataError(
            f"external data location {location!r} is absolute or empty", where=where,
            fix="external data must be a relative path inside the model's folder; re-save the model",
        )
    target = (base / location).resolve()
    if base != target and base not in target.parents:
        raise ExternalDataError(
            f"external data location {location!r} escapes the model's folder", where=where,
            fix="move the data file next to the model and re-save it; qcompile never reads outside the model's folder",
        )
    if not target.exists():
        raise ExternalDataError(f"external data file {location!r} not found", where=where,
                                fix="copy the data file next to the model")
    if not target.is_file():
        raise ExternalDataError(f"external data {location!r} is not a regular file", where=where,
                                fix="point the tensor at a data file next to the model")
    numbers = {}
    for key in ("offset", "length"):
        text = info.get(key)
        if text in (None, ""):
            continue
        try:
            numbers[key] = int(text)
        except ValueError:
            numbers[key] = -1
        if numbers[key] < 0:
            raise ExternalDataError(f"external data {key} {text!r} is not a non-negative integer", where=where,
                                    fix="the file is corrupt or its exporter is broken; re-export the model")
    offset, length = numbers.get("offset", 0), numbers.get("length")
    if nbytes is not None and length is not None and length != nbytes:
        raise InvalidModelError(
            f"{_describe(tensor, count)}, {nbytes:,} bytes) but its external data is {length:,} bytes long",
            where=where, fix="the file is corrupt or its exporter is broken; re-export the model")
    needed = length if length is not None else nbytes
    if needed is not None and offset + needed > target.stat().st_size:
        raise ExternalDataError(
            f"external data file {location!r} is shorter than the tensor needs", where=where,
            fix="the data file is truncated; re-export the model",
        )


def _check_structure(proto: onnx.ModelProto, model_path: Path) -> None:
    """Before anything is read or allocated: subgraph depth, each tensor's size against its data,
    and external data locations (see :func:`_check_external`)."""
    base = model_path.parent.resolve()
    for tensor in proto.graph.sparse_initializer:
        raise InvalidModelError(
            f"sparse initializer {(tensor.values.name or '?')!r} is not supported", where=str(model_path),
            fix="store it as a dense initializer",
        )
    for graph in _graphs(proto, model_path):
        for tensor in _tensors(graph):
            _check_tensor(tensor, str(model_path), base)


def _externals_as_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The checker resolves external data against the working directory, not the model's folder.

    Locations are validated by :func:`_check_external`; for the checker, each external
    initializer becomes a typed graph input instead (equivalent for every structural check).
    """
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    names = {t.name for t in external}
    kept = [t for t in copy.graph.initializer if t.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    declared = {i.name for i in copy.graph.input}
    for tensor in external:
        if tensor.name not in declared:
            copy.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return copy


def _run_checker(proto: onnx.ModelProto, path: Path, full: bool = False) -> None:
    try:
        onnx.checker.check_model(_externals_as_inputs(proto), full_check=full)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "checker failed")
        raise InvalidModelError(
            f"model fails the ONNX checker: {first}", where=str(path),
            fix="fix the exporter or the graph; qcompile only accepts valid ONNX",
        ) from None


def custom_domains(model: ir.Model) -> list[str]:
    """The operator domains of ``model``'s nodes (subgraphs included) outside the ONNX standard's."""
    return sorted({n.domain for n in ir.traversal.RecursiveGraphIterator(model.graph)} - {"", "ai.onnx"})


def check(model: ir.Model, *, full: bool = False, standard_only: bool = False) -> None:
    """Run the ONNX checker on an in-memory model (large tensors are not copied into the proto).

    ``full``: the checker's strictest mode (strict shape inference too); ``standard_only``: every
    node in the ONNX standard's domain (no com.microsoft or custom ops)."""
    with _inlined(model, share=True):
        proto = ir.serde.serialize_model(model)
    where = Path(model.meta.get("qcompile.source_path") or "<in-memory model>")
    _run_checker(proto, where, full=full)
    if standard_only:
        domains = custom_domains(model)
        if domains:
            raise InvalidModelError(f"model uses non-standard operator domains {domains}", where=str(where),
                                    fix="this target accepts only the ONNX standard's operators")


def initializer_bytes(model: ir.Model) -> int:
    """Bytes held by the main graph's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _is_mapped_inline(tensor: ir.ExternalTensor, model: ir.Model) -> bool:
    """A tensor memory-mapped from the model file's own inline bytes (not separate external data)."""
    source = model.meta.get("qcompile.source_path")
    return bool(source) and _same_file(Path(tensor.path), Path(source))


def in_memory_weight_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers that are held in memory (not memory-mapped)."""
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )


def has_external_data(model: ir.Model) -> bool:
    """Whether the model reads weights from a separate data file."""
    return any(
        isinstance(v.const_value, ir.ExternalTensor) and not _is_mapped_inline(v.const_value, model)
        for v in model.graph.initializers.values()
    )


def drop_resident_weights(model: ir.Model) -> None:
    """Drop the resident pages of the model's memory-mapped initializers (see
    :func:`~qcompile.passes.irutil.drop_resident`): they are read back from the file when needed."""
    for value in model.graph.initializers.values():
        drop_resident(value.const_value)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _referenced_data_files(model: ir.Model) -> set[Path]:
    files = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.path).resolve())
    return files


#: Initializers at least this large are handed by reference to runtimes that accept it.
SHARE_MIN_BYTES = 64 * 1024
_PLACEHOLDER = "qcompile-shared-weights.placeholder"


def _shareable(tensor: ir.TensorProtocol | None) -> bool:
    """Whether the tensor is large and of a plain numpy type (else it is serialized)."""
    if tensor is None or tensor.nbytes < SHARE_MIN_BYTES or tensor.dtype.bitwidth % 8:
        return False
    return np.dtype(tensor.dtype.numpy()).kind in "biuf"  # not bfloat16, float8: ORT takes them from numpy


@contextlib.contextmanager
def _inlined(model: ir.Model, *, share: bool = False) -> Iterator[dict[str, ir.TensorProtocol]]:
    """Temporarily hold external tensors in memory so that serializing writes them inline.

    ``share``: large tensors of plain numpy types become placeholder references instead, and are
    yielded as name -> tensor (see :class:`SharedWeightsModel`)."""
    swapped, shared = [], {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if share and _shareable(tensor):
            shared[value.name] = tensor
            replacement = ir.ExternalTensor(_PLACEHOLDER, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                            name=value.name)
        elif isinstance(tensor, ir.ExternalTensor):
            replacement = ir.Tensor(tensor.numpy(), name=tensor.name)
        else:
            continue
        swapped.append((value, tensor))
        value.const_value = replacement
    try:
        yield shared
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold_bytes: int = 1024,
) -> Path:
    """Write ``model`` to ``path`` atomically (temp files in the same folder, then rename).

    ``external_data`` None decides by size: weights go to ``<name>.data`` when the initializers add
    up to more than 256 MiB or the model already kept them outside. Tensors smaller than
    ``size_threshold_bytes`` stay inline. Refuses to overwrite the model's own source file or any
    data file it still reads from. Returns the path written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError("output path is a folder", where=str(path), fix="name a .onnx file")
    parent = path.parent.resolve()
    if not parent.is_dir():
        raise OutputPathError("output folder does not exist", where=str(parent), fix="create it first")
    source = model.meta.get("qcompile.source_path")
    if source and (Path(source).resolve() == path.resolve() or _same_file(Path(source), path)):
        raise OutputPathError("refusing to overwrite the input model", where=str(path),
                              fix="choose another output path")
    data_name = f"{path.name}.data"
    data_path = parent / data_name
    if data_path.resolve() in _referenced_data_files(model):
        raise OutputPathError(
            "refusing to overwrite external data the model is still reading", where=str(data_path),
            fix="choose another output name",
        )
    if external_data is None:
        external_data = has_external_data(model) or initializer_bytes(model) > AUTO_EXTERNAL_BYTES
    # A TemporaryDirectory is removed however the block ends: an error, KeyboardInterrupt, SIGTERM
    # (see qcompile/interrupts.py), or, if interrupted before the block is entered, at exit.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".tmp", dir=parent,
                                     ignore_cleanup_errors=True) as tmp:
        tmp_dir = Path(tmp)
        tmp_model = tmp_dir / path.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=size_threshold_bytes)
        else:
            if initializer_bytes(model) > PROTOBUF_LIMIT:
                raise OutputPathError(
                    "model is larger than 2 GB and cannot be stored in one protobuf", where=str(path),
                    fix="save with external data",
                )
            with _inlined(model):
                ir.save(model, tmp_model)
        if opaque.META_KEY in model.meta:
            proto = onnx.load(str(tmp_model), load_external_data=False)
            opaque.attach_tail(proto, model.meta[opaque.META_KEY])
            onnx.save(proto, str(tmp_model))
        tmp_data = tmp_dir / data_name
        with interrupts.deferred():  # the data and the model that reads it are committed together
            if tmp_data.exists():
                os.replace(tmp_data, data_path)
            elif data_path.exists() and not external_data:
                log.info("leaving unrelated file %s in place", data_path)
            os.replace(tmp_model, path)
    return path


def write_text(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write a small file (a report, a log, JUnit XML) atomically: a temp file beside it, then a rename."""
    path = Path(path)
    parent = path.parent.resolve()
    if path.is_dir() or not parent.is_dir():
        raise OutputPathError("cannot write a file here" if path.is_dir() else "output folder does not exist",
                              where=str(path), fix="name a file in an existing folder")
    data = text.encode("utf-8") if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets; a report is read by others
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        with interrupts.deferred():
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def convert_opset(model: ir.Model, target_opset: int) -> ir.Model:
    """Convert the default-domain opset of ``model`` to ``target_opset`` (in place)."""
    from onnxscript import version_converter

    current = model.opset_imports.get("", None)
    if current == target_opset:
        return model
    try:
        version_converter.convert_version(model, target_version=target_opset, fallback=True)
    except Exception as exc:  # the converter raises many types; all mean "cannot convert"
        raise InvalidModelError(
            f"cannot convert opset {current} to {target_opset}: {exc}", where="version converter",
            fix="pick a target opset the model's ops support",
        ) from None
    return model


def _names_used(node: onnx.NodeProto) -> Iterator[str]:
    """A node's inputs, and every name read inside its subgraphs (outer-scope values included)."""
    yield from node.input
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in graph.node:
                yield from _names_used(inner)


def prune_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes and initializers that no graph output depends on (and the graph inputs that
    only gave such an initializer its overridable default); returns nodes removed."""
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(name and name in needed for name in node.output):
            live.append(node)
            needed.update(_names_used(node))
    removed = len(graph.node) - len(live)
    if removed:
        del graph.node[:]
        graph.node.extend(reversed(live))
    initializers = [t for t in graph.initializer if t.name in needed]
    if len(initializers) != len(graph.initializer):
        dropped = {t.name for t in graph.initializer} - {t.name for t in initializers}
        del graph.initializer[:]
        graph.initializer.extend(initializers)
        inputs = [i for i in graph.input if i.name not in dropped]
        if len(inputs) != len(graph.input):
            del graph.input[:]
            graph.input.extend(inputs)
    return removed


@contextlib.contextmanager
def runnable(
    model: ir.Model, *, inline_limit: int = AUTO_EXTERNAL_BYTES, share_weights: bool = False
) -> Iterator[str | bytes | SharedWeightsModel]:
    """Yield something a runtime can load; nodes that no output needs are left out.

    ``share_weights``: a :class:`SharedWeightsModel` whose large initializers are the model's own
    arrays (memory-mapped ones stay mapped): nothing is copied or written. Otherwise protobuf bytes
    for small models, or a temporary file (removed afterwards) for models with external data or
    more than ``inline_limit`` bytes of weights, so nothing is forced through one protobuf message.
    """
    if share_weights or (not has_external_data(model) and initializer_bytes(model) <= inline_limit):
        with _inlined(model, share=share_weights) as shared:
            proto = ir.serde.serialize_model(model)
        prune_dead_nodes(proto.graph)
        if not share_weights:
            yield proto.SerializeToString()
            return
        kept = {t.name for t in proto.graph.initializer}
        arrays = {name: tensor.numpy() for name, tensor in shared.items() if name in kept}
        yield SharedWeightsModel(proto.SerializeToString(), arrays, _PLACEHOLDER)
        return
    with tempfile.TemporaryDirectory(prefix="qcompile-run-") as tmp:
        target = Path(tmp) / "model.onnx"
        ir.save(model, target, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield str(target)
