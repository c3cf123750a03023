"""A minimal TensorFlow tensor-bundle writer for tests, independent of enformer_vep.

It follows TensorFlow's tensor_bundle.cc and LevelDB's table format from their specifications,
with its own protobuf encoder, table builder and bytewise CRC-32C, so that reading what it
writes checks enformer_vep.tensor_bundle against a second implementation.
"""

from __future__ import annotations

import os

import numpy as np

DT_FLOAT, DT_INT32, DT_STRING, DT_INT64, DT_BOOL, DT_BFLOAT16 = 1, 3, 7, 9, 10, 14
_NUMPY_DTYPES = {
    np.dtype("float32"): DT_FLOAT, np.dtype("int32"): DT_INT32, np.dtype("int64"): DT_INT64, np.dtype("bool"): DT_BOOL
}
TABLE_MAGIC = 0xDB4775248B80FB57


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf -------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> ten-byte two's complement
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + value.to_bytes(4, "little")


def _shape_proto(shape) -> bytes:
    return b"".join(field_bytes(2, field_varint(1, d) if d else b"") for d in shape)


def _entry_proto(dtype: int, shape, offset: int, size: int, crc: int) -> bytes:
    # proto3: fields at their default value are left out, as TensorFlow does
    out = field_varint(1, dtype) + field_bytes(2, _shape_proto(shape))
    if offset:
        out += field_varint(4, offset)
    if size:
        out += field_varint(5, size)
    return out + field_fixed32(6, crc)


def object_graph(nodes) -> bytes:
    """TrackableObjectGraph from [(children [(node id, name)], {attribute name: checkpoint key})]."""
    out = b""
    for children, attributes in nodes:
        node = b"".join(field_bytes(1, field_varint(1, i) + field_bytes(2, name.encode())) for i, name in children)
        for name, key in attributes.items():
            # SerializedTensor: name, full_name, checkpoint_key
            tensor = field_bytes(1, name.encode()) + field_bytes(2, key.encode()) + field_bytes(3, key.encode())
            node += field_bytes(2, tensor)
        out += field_bytes(1, node)
    return out


def tree_nodes(paths: dict[str, str]):
    """Object-graph nodes (see object_graph) of a tree whose variables sit at ``paths`` ({path: key})."""
    nodes = [([], {})]
    ids = {"": 0}
    for path, key in paths.items():
        parent = ""
        for name in path.split("/"):
            here = f"{parent}/{name}" if parent else name
            if here not in ids:
                ids[here] = len(nodes)
                nodes.append(([], {}))
                nodes[ids[parent]][0].append((ids[here], name))
            parent = here
        nodes[ids[path]][1]["VARIABLE_VALUE"] = key
    return nodes


# --- LevelDB table --------------------------------------------------------------------------


def _block(entries, restart_interval: int) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + b"".join(r.to_bytes(4, "little") for r in restarts) + len(restarts).to_bytes(4, "little")


def table(entries, block_size: int = 4096, restart_interval: int = 16) -> bytes:
    """LevelDB table bytes for sorted (key, value) pairs, uncompressed."""
    out = bytearray()

    def put(block: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(block))
        out.extend(block + b"\0" + mask(crc32c(block + b"\0")).to_bytes(4, "little"))
        return handle

    index, pending, pending_size = [], [], 0
    for key, value in entries:
        pending.append((key, value))
        pending_size += len(key) + len(value)
        if pending_size >= block_size:
            # the last key of a block separates it from the next one
            index.append((key, put(_block(pending, restart_interval))))
            pending, pending_size = [], 0
    if pending:
        index.append((pending[-1][0], put(_block(pending, restart_interval))))
    meta_handle = put(_block([], restart_interval))
    index_handle = put(_block(index, 1))
    footer = (meta_handle + index_handle).ljust(40, b"\0") + TABLE_MAGIC.to_bytes(8, "little")
    return bytes(out) + footer


# --- bundle ---------------------------------------------------------------------------------


def _string_tensor(values: np.ndarray) -> tuple[bytes, int]:
    """Stored bytes and unmasked CRC of a string tensor, following tensor_bundle.cc's WriteStringTensor."""
    strings = [bytes(s) for s in values.reshape(-1)]
    lengths = b"".join(varint(len(s)) for s in strings)
    crc = 0
    for s in strings:
        crc = crc32c(len(s).to_bytes(4, "little"), crc)
    checksum_bytes = mask(crc).to_bytes(4, "little")
    crc = crc32c(checksum_bytes, crc)
    body = b"".join(strings)
    return lengths + checksum_bytes + body, crc32c(body, crc)


def write_bundle(
    prefix, tensors, *, bfloat16=(), block_size: int = 4096, restart_interval: int = 16, entry_patches=None
) -> dict[str, int]:
    """Write ``tensors`` ({key: array}) as bundle ``prefix`` (.index + .data-00000-of-00001).

    Data is laid out in the dict's order, the index sorted by key. Object arrays hold bytes
    (DT_STRING); keys in ``bfloat16`` hold uint16 bit patterns. ``entry_patches`` ({key: bytes})
    appends raw protobuf fields to an entry; the last value of a field wins, which lets tests
    forge dtypes, sizes or slices. Returns each tensor's offset in the data file.
    """
    prefix = os.fspath(prefix)
    entry_patches = entry_patches or {}
    data, entries, offsets = bytearray(), {}, {}
    for key, value in tensors.items():
        value = np.asarray(value)
        if value.dtype == object:
            stored, crc = _string_tensor(value)
            dtype = DT_STRING
        else:
            stored = value.astype(value.dtype.newbyteorder("<")).tobytes()
            crc = crc32c(stored)
            dtype = DT_BFLOAT16 if key in bfloat16 else _NUMPY_DTYPES[value.dtype]
        entry = _entry_proto(dtype, value.shape, len(data), len(stored), mask(crc))
        entries[key.encode()] = entry + entry_patches.get(key, b"")
        offsets[key] = len(data)
        data += stored

    header = field_varint(1, 1) + field_bytes(3, field_varint(1, 1))  # num_shards=1, version.producer=1
    records = [(b"", header)] + sorted(entries.items())
    with open(prefix + ".index", "wb") as f:
        f.write(table(records, block_size, restart_interval))
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(data)
    return offsets
