"""Read an ONNX file's structure without copying its weights: a protobuf wire-format scan.

A model saved inline keeps every initializer's bytes in a ``raw_data`` field. Parsing it with
protobuf copies all of them (and the checker copies them twice more). :func:`map_inline_weights`
instead walks the wire format, notes where each large ``raw_data`` field sits in the file, and
returns a small ModelProto whose initializers point at those bytes as external data in the model
file itself. onnx-ir then memory-maps them like any external data.

Wire format: each field is a varint tag ``(number << 3) | wire_type`` followed by a varint (type 0),
8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5).
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Iterator

import onnx

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_LENGTH_DELIMITED = 2


class WireFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, payload start, field end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        tag, payload = _varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, stop = _varint(buf, payload, end)
        elif wire_type == 1:
            stop = payload + 8
        elif wire_type == _LENGTH_DELIMITED:
            length, payload = _varint(buf, payload, end)
            stop = payload + length
        elif wire_type == 5:
            stop = payload + 4
        else:
            raise WireFormatError(f"unsupported wire type {wire_type}")
        if stop > end or number == 0:
            raise WireFormatError("field runs past the end of its message")
        yield number, wire_type, pos, payload, stop
        pos = stop


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def _external_reference(location: str, offset: int, length: int) -> bytes:
    entries = [("location", location), ("offset", str(offset)), ("length", str(length))]
    refs = b"".join(
        _length_delimited(_TENSOR_EXTERNAL_DATA, _length_delimited(1, k.encode()) + _length_delimited(2, v.encode()))
        for k, v in entries
    )
    return refs + _encode_varint(_TENSOR_DATA_LOCATION << 3) + _encode_varint(onnx.TensorProto.EXTERNAL)


class _AlreadyExternal(Exception):
    pass


def _stripped_tensor(buf, start: int, end: int, location: str, min_bytes: int) -> bytes | None:
    """The TensorProto in buf[start:end] with its raw_data replaced by a reference, or None to keep it."""
    kept, raw = [], None
    for number, _, field_start, payload, stop in _fields(buf, start, end):
        if number in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            raise _AlreadyExternal
        if number == _TENSOR_RAW_DATA:
            raw = (payload, stop - payload)
        else:
            kept.append(bytes(buf[field_start:stop]))
    if raw is None or raw[1] < min_bytes:
        return None
    return b"".join(kept) + _external_reference(location, *raw)


def _rebuilt_graph(buf, start: int, end: int, location: str, min_bytes: int) -> tuple[bytes, int, int]:
    parts, mapped, external = [], 0, 0
    for number, wire_type, field_start, payload, stop in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire_type == _LENGTH_DELIMITED:
            try:
                tensor = _stripped_tensor(buf, payload, stop, location, min_bytes)
            except _AlreadyExternal:
                tensor, external = None, external + 1
            if tensor is not None:
                parts.append(_length_delimited(_GRAPH_INITIALIZER, tensor))
                mapped += 1
                continue
        parts.append(bytes(buf[field_start:stop]))
    return b"".join(parts), mapped, external


def map_inline_weights(path: str | Path, *, min_bytes: int = 1024) -> tuple[onnx.ModelProto, int, int]:
    """The model at ``path`` with each main-graph initializer whose raw_data is at least ``min_bytes``
    turned into an external reference to its own bytes in ``path``; how many were mapped; and how
    many initializers were external data already (left as they are).

    Raises :class:`WireFormatError` when the file is not well-formed protobuf.
    """
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        parts, mapped, external = [], 0, 0
        for number, wire_type, field_start, payload, stop in _fields(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and wire_type == _LENGTH_DELIMITED:
                graph, mapped, external = _rebuilt_graph(buf, payload, stop, path.name, min_bytes)
                parts.append(_length_delimited(_MODEL_GRAPH, graph))
            else:
                parts.append(bytes(buf[field_start:stop]))
    proto = onnx.ModelProto()
    proto.ParseFromString(b"".join(parts))
    return proto, mapped, external
