"""The v2 protocol's tensors as numpy arrays, and back: the datatypes rnnserve reads and writes.

A tensor's elements travel in the datatype's typed list (gRPC `contents`, REST JSON `data`) or as raw
little-endian bytes (gRPC `raw_input_contents`, REST's binary data extension); BYTES elements as raw
bytes are each a 4-byte little-endian length followed by the element. Both gRPC and REST read and
write through here, so a tensor means the same on either.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from rnnserve.server.core.errors import InvalidArgument

# The fixed-size datatypes a request may name, with the numpy type of their raw bytes; BYTES is variable.
FIXED_DTYPES = {"BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
                "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
                "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
                "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
BYTES = "BYTES"
DATATYPES = (*FIXED_DTYPES, BYTES)
MAX_DIMENSIONS = 8  # more than any tensor here has; bounds the work of reading a shape


@dataclass(frozen=True)
class Tensor:
    """A named tensor: `data` holds its elements in row-major order, shaped `shape` (BYTES: an object array of
    bytes)."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


def element_count(name: str, shape: list[int]) -> int:
    """The elements a tensor of `shape` holds; InvalidArgument naming the tensor for a shape no tensor has."""
    if len(shape) > MAX_DIMENSIONS or any(size < 0 for size in shape):
        raise InvalidArgument(name, f"shape {shape} is not a tensor's: at most {MAX_DIMENSIONS} sizes, none negative")
    return int(np.prod(shape, dtype=np.int64))


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A tensor's elements from raw bytes, checked against its shape."""
    count = element_count(name, shape)
    if datatype == BYTES:
        elements = split_bytes(name, raw)
    else:
        dtype = FIXED_DTYPES[datatype]
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(name, f"{len(raw)} raw bytes, but shape {shape} of {datatype} takes "
                                        f"{count * dtype.itemsize}")
        return np.frombuffer(raw, dtype).reshape(shape)
    return shaped(name, shape, count, objects(elements))


def from_list(name: str, datatype: str, shape: list[int], elements: list) -> np.ndarray:
    """A tensor's elements from a typed list (gRPC contents, JSON data), checked against its shape."""
    count = element_count(name, shape)
    if datatype == BYTES:
        return shaped(name, shape, count, objects(elements))
    try:
        array = np.array(elements, dtype=FIXED_DTYPES[datatype])
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgument(name, f"the data are not {datatype} values") from None
    return shaped(name, shape, count, array.reshape(-1))


def objects(elements: list) -> np.ndarray:
    """A flat object array of `elements` (numpy would make a 2-D array of equal-length strings)."""
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array


def shaped(name: str, shape: list[int], count: int, flat: np.ndarray) -> np.ndarray:
    if flat.size != count:
        raise InvalidArgument(name, f"{flat.size} elements, but shape {shape} holds {count}")
    return flat.reshape(shape)


def split_bytes(name: str, raw: bytes) -> list[bytes]:
    """BYTES elements from their raw form: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(name, "raw BYTES data end inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(name, f"a raw BYTES element of {length} bytes runs past the data's end")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def to_raw(tensor: Tensor) -> bytes:
    """A tensor's elements as raw bytes (little-endian; BYTES length-prefixed)."""
    if tensor.datatype == BYTES:
        return b"".join(struct.pack("<I", len(element)) + element for element in tensor.data.reshape(-1))
    return np.ascontiguousarray(tensor.data, FIXED_DTYPES[tensor.datatype]).tobytes()


def to_list(tensor: Tensor) -> list:
    """A tensor's elements as a flat JSON list (BYTES as text)."""
    if tensor.datatype == BYTES:
        return [element.decode("utf-8", "replace") for element in tensor.data.reshape(-1)]
    return tensor.data.reshape(-1).tolist()
