"""The Thrift compact protocol, as far as Parquet's page headers and footers need it.

A struct is a list of ``(field id, type, value)`` in field-id order; a list value is ``ThriftList``. This
is exactly what Apache Thrift's C++ ``TCompactProtocol`` (which Arrow's Parquet writer uses) writes,
so a struct decoded from pyarrow's bytes and encoded again gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BOOL_TRUE, BOOL_FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(1, 13)
Field = tuple[int, int, Any]
"""``(field id, compact type, value)``: a struct is a list of these."""


@dataclass(frozen=True)
class ThriftList:
    """A list value: element type and elements."""

    element_type: int
    items: list[Any]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def encode_struct(fields: list[Field]) -> bytes:
    """The compact encoding of a struct (fields in ascending id order)."""
    out, last = bytearray(), 0
    for field_id, kind, value in fields:
        if kind in (BOOL_TRUE, BOOL_FALSE):
            kind = BOOL_TRUE if value else BOOL_FALSE
        delta = field_id - last
        if 0 < delta <= 15:
            out.append(delta << 4 | kind)
        else:
            out.append(kind)
            out += _varint(_zigzag(field_id))
        if kind not in (BOOL_TRUE, BOOL_FALSE):
            out += _encode_value(kind, value)
        last = field_id
    out.append(0)
    return bytes(out)


def _encode_value(kind: int, value: Any) -> bytes:
    if kind in (I16, I32, I64):
        return _varint(_zigzag(value))
    if kind == BYTE:
        return bytes([value & 0xFF])
    if kind == BINARY:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return _varint(len(data)) + data
    if kind == STRUCT:
        return encode_struct(value)
    if kind == LIST:
        size, element = len(value.items), value.element_type
        head = bytes([size << 4 | element]) if size < 15 else bytes([0xF0 | element]) + _varint(size)
        return head + b"".join(_encode_value(element, item) for item in value.items)
    raise ValueError(f"thrift compact type {kind} not supported")


def decode_struct(data: bytes | memoryview, position: int = 0) -> tuple[list[Field], int]:
    """``(fields, position after the struct)`` of the struct encoded at ``position``."""
    fields: list[Field] = []
    last = 0
    while True:
        head = data[position]
        position += 1
        if head == 0:
            return fields, position
        kind, delta = head & 0x0F, head >> 4
        if delta:
            field_id = last + delta
        else:
            raw, position = _read_varint(data, position)
            field_id = _unzigzag(raw)
        if kind in (BOOL_TRUE, BOOL_FALSE):
            value: Any = kind == BOOL_TRUE
        else:
            value, position = _decode_value(data, position, kind)
        fields.append((field_id, kind, value))
        last = field_id


def _read_varint(data: bytes | memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def _decode_value(data: bytes | memoryview, position: int, kind: int) -> tuple[Any, int]:
    if kind in (I16, I32, I64):
        raw, position = _read_varint(data, position)
        return _unzigzag(raw), position
    if kind == BYTE:
        return data[position], position + 1
    if kind == BINARY:
        size, position = _read_varint(data, position)
        return bytes(data[position : position + size]), position + size
    if kind == STRUCT:
        return decode_struct(data, position)
    if kind == LIST:
        head = data[position]
        position += 1
        size, element = head >> 4, head & 0x0F
        if size == 15:
            size, position = _read_varint(data, position)
        items = []
        for _ in range(size):
            item, position = _decode_value(data, position, element)
            items.append(item)
        return ThriftList(element, items), position
    raise ValueError(f"thrift compact type {kind} not supported")


def field_value(fields: list[Field], field_id: int, default: Any = None) -> Any:
    """The value of field ``field_id`` of a decoded struct (``default`` when absent)."""
    return next((value for fid, _, value in fields if fid == field_id), default)
