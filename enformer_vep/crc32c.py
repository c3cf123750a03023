"""CRC-32C (Castagnoli), vectorised with numpy, plus LevelDB/TensorFlow checksum masking.

A CRC register is linear over GF(2). Feeding ``n`` zero bytes is a 32x32 GF(2) matrix
``shift_n``, and the register of a message is the xor over its 4-byte words ``w_p`` of
``shift_{4 + bytes after w_p}(w_p)``. So the words are dealt round-robin to thousands of lanes,
whose registers numpy advances side by side (Python loops once per row of lanes), and the lane
registers are then folded pairwise. Zero bytes in front of a message leave a zero register at
zero, so a buffer is front-padded with zeros to fill whole rows.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["crc32c", "mask", "unmask"]

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK_DELTA = 0xA282EAD8
_BLOCK = 32 << 20  # bytes per vectorised pass; bounds the zero-padded copy
_MAX_LANES = 16384  # more lanes stop paying once a row of lane registers leaves the cache
_MIN_LANE_BYTES = 64  # small inputs use fewer lanes: fewer fold steps, little padding
_BITS = np.arange(32, dtype=np.uint32)


def _apply(cols: np.ndarray, v: np.ndarray) -> np.ndarray:
    """GF(2) matrix (cols[j] = image of bit j, (32,)) times each vector of v (any shape)."""
    bits = (v[..., None] >> _BITS) & 1
    return np.bitwise_xor.reduce(np.where(bits == 1, cols, np.uint32(0)), axis=-1)


def _one_zero_bit() -> np.ndarray:
    """Matrix (32,) of columns for feeding one zero bit into the register."""
    v = np.uint32(1) << _BITS
    return (v >> 1) ^ np.where(v & 1 == 1, np.uint32(_POLY), np.uint32(0))


@lru_cache(maxsize=512)
def _shift_matrix(n: int) -> np.ndarray:
    """Matrix (32,) of columns for feeding n >= 1 zero bytes into the register."""
    if n == 1:
        bit = _one_zero_bit()
        m = bit
        for _ in range(7):
            m = _apply(bit, m)
        return m
    half = _shift_matrix(n // 2)
    m = _apply(half, half)
    return _apply(_shift_matrix(1), m) if n % 2 else m


@lru_cache(maxsize=512)
def _shift_tables(n: int, width: int = 8) -> np.ndarray:
    """Lookup tables (32 // width, 2**width) for shift_n, one per ``width``-bit slice of the register."""
    cols = _shift_matrix(n).reshape(32 // width, width)
    values = np.arange(1 << width, dtype=np.uint32)
    bits = (values[:, None] >> np.arange(width, dtype=np.uint32)) & 1  # (2**width, width)
    return np.stack([np.bitwise_xor.reduce(np.where(bits == 1, c, np.uint32(0)), axis=1) for c in cols])


def _shift(n: int, v: np.ndarray) -> np.ndarray:
    """shift_n applied to every register of v (uint32 array)."""
    t = _shift_tables(n)
    return t[0][v & 0xFF] ^ t[1][(v >> 8) & 0xFF] ^ t[2][(v >> 16) & 0xFF] ^ t[3][v >> 24]


def _raw_block(block: np.ndarray) -> int:
    """Register after feeding ``block`` (uint8, (n,), n >= 1) into a zero register."""
    n = block.size
    lanes = 1 << (min(_MAX_LANES, -(-n // _MIN_LANE_BYTES)).bit_length() - 1)
    rows = -(-n // (4 * lanes))
    if rows * lanes * 4 == n:
        words = block.view("<u4").reshape(rows, lanes)
    else:
        padded = np.zeros(rows * lanes * 4, np.uint8)
        padded[padded.size - n :] = block
        words = padded.view("<u4").reshape(rows, lanes)

    # Lane i reads words i, i + lanes, i + 2 * lanes, ...: consecutive words of one lane sit
    # 4 * lanes bytes apart in the message, so each step shifts the lane register by that much.
    # Interleaving keeps every row contiguous (a transposed copy costs more than the CRC itself).
    lo_table, hi_table = _shift_tables(4 * lanes, 16)
    reg = np.zeros(lanes, np.uint32)
    hi_part = np.empty(lanes, np.uint32)
    lo_idx = np.empty(lanes, np.intp)
    hi_idx = np.empty(lanes, np.intp)
    for word in words:
        np.bitwise_and(reg, 0xFFFF, out=lo_idx, casting="unsafe")
        np.right_shift(reg, 16, out=hi_idx, casting="unsafe")
        np.take(lo_table, lo_idx, out=reg)
        np.take(hi_table, hi_idx, out=hi_part)
        reg ^= hi_part
        reg ^= word

    # Lane i's last word is word i of the final row: lane registers combine like the words of a
    # lanes-word message, each then followed by the 4 bytes of its own word.
    span = 4
    while reg.size > 1:
        pairs = reg.reshape(-1, 2)
        reg = _shift(span, pairs[:, 0]) ^ pairs[:, 1]
        span *= 2
    return int(_shift(4, reg)[0])


def _as_bytes(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data``: a bytes-like object, or a numpy array's ``tobytes()`` (C order).

    ``crc`` continues a running checksum, as with ``zlib.crc32``:
    ``crc32c(b, crc32c(a)) == crc32c(a + b)``.
    """
    buf = _as_bytes(data)
    reg = np.array([(crc ^ 0xFFFFFFFF) & 0xFFFFFFFF], np.uint32)
    for start in range(0, buf.size, _BLOCK):
        block = buf[start : start + _BLOCK]
        reg = _shift(block.size, reg) ^ np.uint32(_raw_block(block))
    return int(reg[0]) ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """LevelDB/TensorFlow masked form of a CRC, as stored in SSTables and tensor bundles."""
    crc &= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF
