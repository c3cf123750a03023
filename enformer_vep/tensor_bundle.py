"""Read TensorFlow tensor bundles (TF2 checkpoints, SavedModel ``variables/``) without TensorFlow.

A bundle with prefix ``P`` is an index ``P.index`` (a LevelDB-format table mapping tensor keys
to ``BundleEntryProto`` records, plus a ``BundleHeaderProto`` under the empty key) and data
shards ``P.data-SSSSS-of-NNNNN`` holding the raw little-endian tensor bytes. Every index block
and every tensor is checked against its CRC-32C before it is used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .crc32c import crc32c, unmask
from .errors import WeightsError

__all__ = ["TensorBundle"]

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two padded BlockHandles + 8-byte magic
_BLOCK_TRAILER_SIZE = 5  # compression type byte + masked CRC-32C
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VARIABLE_ATTRIBUTE = "VARIABLE_VALUE"

# TensorFlow DataType enum -> (name, numpy dtype of the stored bytes)
_DTYPES = {
    1: ("float32", np.dtype("<f4")),
    2: ("float64", np.dtype("<f8")),
    3: ("int32", np.dtype("<i4")),
    4: ("uint8", np.dtype("u1")),
    5: ("int16", np.dtype("<i2")),
    6: ("int8", np.dtype("i1")),
    7: ("string", np.dtype(object)),
    8: ("complex64", np.dtype("<c8")),
    9: ("int64", np.dtype("<i8")),
    10: ("bool", np.dtype("?")),
    14: ("bfloat16", np.dtype("<u2")),  # numpy has no bfloat16: the raw bit patterns
    17: ("uint16", np.dtype("<u2")),
    18: ("complex128", np.dtype("<c16")),
    19: ("float16", np.dtype("<f2")),
    22: ("uint32", np.dtype("<u4")),
    23: ("uint64", np.dtype("<u8")),
}
_DT_STRING = 7


class _Malformed(Exception):
    """Bad bytes found while decoding; the caller adds the file name."""


# --- protobuf wire format and LevelDB varints ---------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _signed(value: int) -> int:
    """Two's-complement int64 from a varint (protobuf int32/int64 fields)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes):
    """Yield (field number, value) of a protobuf message: int for varint/fixed, bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise _Malformed("truncated protobuf field")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _Malformed("truncated protobuf field")
            value = buf[pos : pos + length]
            pos += length
        else:
            raise _Malformed(f"unsupported protobuf wire type {wire}")
        yield tag >> 3, value


# --- LevelDB table (the .index file) --------------------------------------------------------


def _block_handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    """(offset, size, position after) of a BlockHandle."""
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _read_block(table: bytes, offset: int, size: int) -> bytes:
    """Contents of the block at [offset, offset + size), checked against its trailer."""
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(table) - _FOOTER_SIZE:
        raise _Malformed(f"block at offset {offset} (size {size}) extends past the end of the table; truncated?")
    compression = table[end]
    if compression != 0:
        raise _Malformed(f"block at offset {offset} is compressed (type {compression}); only uncompressed is supported")
    stored = int.from_bytes(table[end + 1 : end + 5], "little")
    if crc32c(table[offset : end + 1]) != unmask(stored):
        raise _Malformed(f"CRC mismatch in block at offset {offset}; the index is corrupt")
    return table[offset:end]


def _block_entries(block: bytes):
    """Yield (key, value) of a table block, undoing the prefix compression of keys."""
    if len(block) < 4:
        raise _Malformed("block too short")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise _Malformed("block restart array is larger than the block")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise _Malformed("malformed block entry")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _table_entries(table: bytes) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a LevelDB table, in stored order."""
    if len(table) < _FOOTER_SIZE:
        raise _Malformed(f"file is only {len(table)} bytes; truncated or not a tensor bundle index")
    if int.from_bytes(table[-8:], "little") != _TABLE_MAGIC:
        raise _Malformed("bad magic number; truncated or not a TensorFlow tensor bundle index")
    footer = table[-_FOOTER_SIZE:]
    _, _, pos = _block_handle(footer)  # metaindex: TensorFlow bundles keep nothing there
    index_offset, index_size, _ = _block_handle(footer, pos)
    entries = []
    for _, handle in _block_entries(_read_block(table, index_offset, index_size)):
        offset, size, _ = _block_handle(handle)
        entries.extend(_block_entries(_read_block(table, offset, size)))
    return entries


# --- bundle records -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...] | None  # None: unknown rank
    shard: int
    offset: int
    size: int
    crc: int  # masked CRC-32C of the stored bytes
    sliced: bool


def _parse_shape(buf: bytes) -> tuple[int, ...] | None:
    dims = []
    for number, value in _fields(buf):
        if number == 2:
            dims.append(next((_signed(v) for n, v in _fields(value) if n == 1), 0))
        elif number == 3 and value:
            return None
    return tuple(dims)


def _parse_entry(buf: bytes) -> _Entry:
    fields = {"dtype": 0, "shape": (), "shard": 0, "offset": 0, "size": 0, "crc": 0, "sliced": False}
    for number, value in _fields(buf):
        if number == 1:
            fields["dtype"] = value
        elif number == 2:
            fields["shape"] = _parse_shape(value)
        elif number in (3, 4, 5):
            fields[{3: "shard", 4: "offset", 5: "size"}[number]] = _signed(value)
        elif number == 6:
            fields["crc"] = value
        elif number == 7:
            fields["sliced"] = True
    return _Entry(**fields)


def _parse_header(buf: bytes) -> tuple[int, int]:
    """(num_shards, endianness) of a BundleHeaderProto; endianness 0 is little-endian."""
    num_shards, endianness = 0, 0
    for number, value in _fields(buf):
        if number == 1:
            num_shards = _signed(value)
        elif number == 2:
            endianness = value
    return num_shards, endianness


def _parse_object_graph(buf: bytes) -> list[tuple[list[tuple[int, str]], dict[str, str]]]:
    """Nodes of a TrackableObjectGraph: ([(child node id, local name)], {attribute name: checkpoint key})."""
    nodes = []
    for number, node in _fields(buf):
        if number != 1:
            continue
        children, attributes = [], {}
        for field, value in _fields(node):
            if field == 1:
                ref = dict(_fields(value))
                children.append((ref.get(1, 0), ref.get(2, b"").decode()))
            elif field == 2:
                attr = dict(_fields(value))
                attributes[attr.get(1, b"").decode()] = attr.get(3, b"").decode()
        nodes.append((children, attributes))
    return nodes


def _string_tensor(buf: bytes, count: int) -> tuple[list[bytes], int]:
    """Decode ``count`` strings stored as varint lengths, masked length CRC, then the bytes.

    Returns the strings and the unmasked CRC-32C TensorFlow records for the tensor: it covers
    each length as a little-endian uint32 (uint64 when it does not fit), not the varint bytes,
    then the 4 stored checksum bytes, then the string bytes.
    """
    pos, lengths, crc = 0, [], 0
    for _ in range(count):
        length, pos = _varint(buf, pos)
        lengths.append(length)
        crc = crc32c(length.to_bytes(4 if length < 1 << 32 else 8, "little"), crc)
    if pos + 4 > len(buf):
        raise _Malformed("string lengths run past the tensor's size")
    if unmask(int.from_bytes(buf[pos : pos + 4], "little")) != crc:
        raise _Malformed("CRC mismatch in the string lengths")
    crc = crc32c(buf[pos : pos + 4], crc)
    pos += 4
    if pos + sum(lengths) != len(buf):
        raise _Malformed("string lengths do not add up to the tensor's size")
    crc = crc32c(buf[pos:], crc)
    strings = []
    for length in lengths:
        strings.append(buf[pos : pos + length])
        pos += length
    return strings, crc


class TensorBundle:
    """Random access to the tensors of one bundle; every read is CRC-verified.

    ``prefix`` is the bundle prefix (``.../variables/variables``) or the path of its ``.index``
    file. Only the index is read on construction; data shards are read tensor by tensor.
    All problems raise :class:`~enformer_vep.errors.WeightsError` naming the file at fault.
    """

    def __init__(self, prefix: str | os.PathLike):
        prefix = os.fspath(prefix)
        if prefix.endswith(".index"):
            prefix = prefix[: -len(".index")]
        self.prefix = prefix
        index_path = prefix + ".index"
        try:
            with open(index_path, "rb") as f:
                table = f.read()
        except FileNotFoundError:
            raise WeightsError(f"missing tensor bundle index file: {index_path}") from None
        except OSError as e:
            raise WeightsError(f"cannot read {index_path}: {e.strerror}") from None

        self._entries: dict[str, _Entry] = {}
        header = None
        try:
            for key, value in _table_entries(table):
                if key == b"":
                    header = _parse_header(value)
                else:
                    self._entries[key.decode("utf-8", "backslashreplace")] = _parse_entry(value)
            if header is None:
                raise _Malformed("no bundle header entry")
        except _Malformed as e:
            raise WeightsError(f"{index_path}: {e}") from None

        num_shards, endianness = header
        if endianness != 0:
            raise WeightsError(f"{index_path}: big-endian tensor bundles are not supported")
        if num_shards < 1:
            raise WeightsError(f"{index_path}: bundle header declares {num_shards} data shards")
        self._shards = [f"{prefix}.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
        for path in self._shards:
            if not os.path.isfile(path):
                packed = next((f"{path}{suffix}" for suffix in (".xz", ".gz", ".bz2")
                               if os.path.isfile(f"{path}{suffix}")), None)
                hint = f" ({packed} is beside it: decompress it first)" if packed else ""
                raise WeightsError(f"missing tensor bundle data file: {path}{hint}")

    def keys(self) -> list[str]:
        """Tensor keys in stored (byte-sorted) order, without the bundle header."""
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key``; () for scalars."""
        return self._entry(key).shape

    def tf_dtype(self, key: str) -> str:
        """TensorFlow dtype name of tensor ``key`` ("float32", "bfloat16", "string", ...)."""
        return _DTYPES[self._entry(key).dtype][0]

    def dtype(self, key: str) -> np.dtype:
        """numpy dtype :meth:`read` returns for ``key``: object for strings, uint16 bit patterns for bfloat16."""
        return _DTYPES[self._entry(key).dtype][1]

    def read(self, key: str) -> np.ndarray:
        """Tensor ``key`` as a new array of :meth:`shape` and :meth:`dtype`; strings come back as bytes objects."""
        entry = self._entry(key)
        if not 0 <= entry.shard < len(self._shards):
            raise WeightsError(f"{self.prefix}.index: tensor '{key}' is in shard {entry.shard} of {len(self._shards)}")
        path = self._shards[entry.shard]
        dtype = _DTYPES[entry.dtype][1]
        count = math.prod(entry.shape)
        if entry.dtype != _DT_STRING and entry.size != count * dtype.itemsize:
            raise WeightsError(
                f"{self.prefix}.index: tensor '{key}' has {entry.size} bytes, "
                f"but shape {entry.shape} of {_DTYPES[entry.dtype][0]} needs {count * dtype.itemsize}"
            )
        file_size = os.path.getsize(path)
        if entry.offset < 0 or entry.size < 0 or entry.offset + entry.size > file_size:
            raise WeightsError(
                f"{path}: truncated: tensor '{key}' needs bytes [{entry.offset}, {entry.offset + entry.size}) "
                f"but the file has {file_size} bytes"
            )

        buf = np.empty(entry.size, np.uint8)
        with open(path, "rb") as f:
            f.seek(entry.offset)
            if f.readinto(buf) != entry.size:
                raise WeightsError(f"{path}: truncated while reading tensor '{key}'")

        if entry.dtype == _DT_STRING:
            try:
                strings, crc = _string_tensor(buf.tobytes(), count)
            except _Malformed as e:
                raise WeightsError(f"{path}: string tensor '{key}': {e}") from None
        else:
            crc = crc32c(buf)
        if crc != unmask(entry.crc):
            raise WeightsError(f"{path}: CRC mismatch in tensor '{key}'; the data file is corrupt")

        if entry.dtype == _DT_STRING:
            out = np.empty(count, dtype=object)
            out[:] = strings
            return out.reshape(entry.shape)
        return buf.view(dtype).reshape(entry.shape)

    def object_paths(self) -> dict[str, str] | None:
        """Map object-graph paths of variables to their keys, e.g.
        ``{"model/_trunk/_layers/0/_layers/0/w": "model/_trunk/_layers/0/_layers/0/w/.ATTRIBUTES/VARIABLE_VALUE"}``.

        Paths join the children's local names from the root object; a variable reachable along
        several paths appears under each. None when the bundle has no object graph (TF1 checkpoints).
        """
        if _OBJECT_GRAPH_KEY not in self._entries:
            return None
        graph = self.read(_OBJECT_GRAPH_KEY).reshape(-1)
        if graph.size != 1:
            raise WeightsError(f"tensor bundle {self.prefix}: {_OBJECT_GRAPH_KEY} is not a scalar string")
        try:
            nodes = _parse_object_graph(graph[0])
        except (_Malformed, UnicodeDecodeError) as e:
            raise WeightsError(f"tensor bundle {self.prefix}: malformed {_OBJECT_GRAPH_KEY}: {e}") from None
        if not nodes:
            return {}

        paths: dict[str, str] = {}
        stack = [(0, "", frozenset([0]))]  # (node id, path, nodes on the path: graphs may be cyclic)
        while stack:
            node, path, seen = stack.pop()
            children, attributes = nodes[node]
            if _VARIABLE_ATTRIBUTE in attributes:
                paths[path] = attributes[_VARIABLE_ATTRIBUTE]
            for child, name in reversed(children):
                if not 0 <= child < len(nodes):
                    raise WeightsError(f"tensor bundle {self.prefix}: the object graph refers to missing node {child}")
                if child not in seen:
                    stack.append((child, f"{path}/{name}" if path else name, seen | {child}))
        return paths

    def _entry(self, key: str) -> _Entry:
        """The index record of ``key``, refusing what :meth:`read` cannot return."""
        entry = self._entries.get(key)
        if entry is None:
            raise WeightsError(f"{self.prefix}.index: no tensor named '{key}'")
        if entry.sliced:
            raise WeightsError(f"{self.prefix}.index: tensor '{key}' is a partitioned (sliced) variable: not supported")
        if entry.dtype not in _DTYPES:
            raise WeightsError(f"{self.prefix}.index: tensor '{key}' has unsupported dtype enum {entry.dtype}")
        if entry.shape is None or any(d < 0 for d in entry.shape):
            raise WeightsError(f"{self.prefix}.index: tensor '{key}' has no fully known shape")
        return entry
