"""Reader for Basenji2 training data (ZLIB-compressed TFRecords of ``tf.train.Example``), without TensorFlow.

Layout of one data set (one organism), as in the Basenji2 / Enformer release
(``gs://basenji_barnyard/data/{human,mouse}``)::

    data_dir/statistics.json            seq_length, target_length, num_targets, {split}_seqs, ...
    data_dir/tfrecords/{split}-{k}.tfr  split = train | valid | test

Each record is a ``tf.train.Example`` with two bytes features: ``sequence`` (numpy bool
``[seq_length, 4]``, one byte per value, ACGT one-hot, all-zero rows for N) and ``target``
(float16 ``[target_length, num_targets]``). Human and mouse are simply two data directories
(5313 and 1643 tracks); the training loop reads one of each and alternates steps (docs/spec.md §8.1).

Layers, each usable on its own:

* :func:`read_records` – TFRecord framing (``uint64 length``, ``uint32 masked_crc32c(length)``,
  ``data``, ``uint32 masked_crc32c(data)``), streamed through :func:`zlib.decompressobj` in
  bounded pieces, both CRCs checked;
* :func:`parse_example` – minimal protobuf decoding of ``tf.train.Example``;
* :func:`read_statistics`, :func:`examples`, :func:`batches` – the data set as numpy / torch.

Every problem with a file (bad CRC, truncated record or stream, corrupt zlib data, malformed
protobuf, missing feature or wrong size) raises :class:`~enformer_vep.errors.InputError` naming
the file and the 0-based record number.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .crc32c import crc32c, mask
from .errors import InputError

__all__ = [
    "SPLITS",
    "read_records",
    "parse_example",
    "read_statistics",
    "tfrecord_files",
    "examples",
    "raw_examples",
    "batches",
]

SPLITS = ("train", "valid", "test")
_READ_CHUNK = 1 << 20  # compressed bytes read from disk at a time
_INFLATE_CHUNK = 4 << 20  # most decompressed bytes produced per decompress() call
_MAX_RECORD = 1 << 34  # a length beyond this is corruption, not data (guards huge allocations)

PathLike = str | Path


# --------------------------------------------------------------------------------------------
# TFRecord framing


class _Stream:
    """Bytes of a file, inflated on the fly (``compression`` 'ZLIB', 'GZIP' or None)."""

    def __init__(self, fh, path: Path, compression: str | None):
        self._fh = fh
        self._path = path
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        if compression is None or compression == "":
            self._wbits = None
        elif compression.upper() == "ZLIB":
            self._wbits = zlib.MAX_WBITS
        elif compression.upper() == "GZIP":
            self._wbits = 16 + zlib.MAX_WBITS
        else:
            raise ValueError(f"compression must be 'ZLIB', 'GZIP' or None, not {compression!r}")
        self._dec = zlib.decompressobj(self._wbits) if self._wbits is not None else None
        self._pending = b""  # compressed input not yet consumed (bounded by max_length)
        self._input_done = False  # the file has been read to its end

    def _fill(self) -> bool:
        """Append more decompressed bytes to the buffer; False at the end of the file."""
        if self._eof:
            return False
        if self._dec is None:
            chunk = self._fh.read(_READ_CHUNK)
            if not chunk:
                self._eof = True
                return False
            self._buf += chunk
            return True
        while True:
            if self._dec.eof:
                # TF writes one stream per file; concatenated streams are read on, as gzip does.
                rest = self._dec.unused_data or self._fh.read(_READ_CHUNK)
                if not rest:
                    self._eof = True
                    return False
                self._dec = zlib.decompressobj(self._wbits)
                self._pending = rest
            if not self._pending:
                self._pending = b"" if self._input_done else self._fh.read(_READ_CHUNK)
                if not self._pending:
                    out = b"" if self._input_done else self._dec.flush()
                    self._input_done = True
                    if out:
                        self._buf += out
                        return True
                    if not self._dec.eof:
                        raise InputError(
                            f"{self._path}: compressed stream is truncated (the file ends inside "
                            "the zlib stream)"
                        )
                    continue
            try:
                out = self._dec.decompress(self._pending, _INFLATE_CHUNK)
            except zlib.error as exc:
                raise InputError(f"{self._path}: corrupt compressed data ({exc})") from None
            self._pending = self._dec.unconsumed_tail
            if out:
                self._buf += out
                return True

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only at the end of the file."""
        while len(self._buf) - self._pos < n:
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            if not self._fill():
                break
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += len(out)
        return out


def read_records(path: PathLike, compression: str | None = "ZLIB", *, check_crc: bool = True) -> Iterator[bytes]:
    """Yield the payload of each record of a TFRecord file.

    ``compression`` is TensorFlow's option: 'ZLIB' (Basenji2 data; the whole file is one zlib
    stream), 'GZIP' or None. Memory stays bounded by the largest record plus a few MiB.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot open TFRecord file {path}: {exc.strerror}") from None
    with fh:
        stream = _Stream(fh, path, compression)
        index = 0
        while True:
            header = stream.read(12)
            if not header:
                return
            where = f"{path}: record {index}"
            if len(header) < 12:
                raise InputError(f"{where} is truncated (header has {len(header)} of 12 bytes)")
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            if check_crc and mask(crc32c(header[:8])) != length_crc:
                raise InputError(f"{where}: length CRC mismatch (corrupt file)")
            if length > _MAX_RECORD:
                raise InputError(f"{where}: implausible record length {length} (corrupt file)")
            body = stream.read(length + 4)
            if len(body) < length + 4:
                raise InputError(
                    f"{where} is truncated ({len(body)} of {length + 4} bytes of data and CRC)"
                )
            data = body[:length]
            if check_crc:
                (data_crc,) = struct.unpack("<I", body[length:])
                if mask(crc32c(data)) != data_crc:
                    raise InputError(f"{where}: data CRC mismatch (corrupt file)")
            yield data
            index += 1


# --------------------------------------------------------------------------------------------
# protobuf: tf.train.Example


class _ProtoError(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise _ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _ProtoError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value): int for varint/fixed, memoryview for length-delimited."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _ProtoError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > end:
                raise _ProtoError("truncated fixed64")
            value = bytes(buf[pos : pos + 8])
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise _ProtoError("truncated length-delimited field")
            value = buf[pos : pos + n]
            pos += n
        elif wire == 5:
            if pos + 4 > end:
                raise _ProtoError("truncated fixed32")
            value = bytes(buf[pos : pos + 4])
            pos += 4
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        yield field, wire, value


def _to_int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _parse_feature(buf: memoryview):
    """Feature: oneof bytes_list = 1, float_list = 2, int64_list = 3 (the last one present wins)."""
    value = None
    for field, wire, payload in _fields(buf):
        if wire != 2 or field not in (1, 2, 3):
            continue
        if field == 1:  # BytesList { repeated bytes value = 1; }
            value = [bytes(v) for f, w, v in _fields(payload) if f == 1 and w == 2]
        elif field == 2:  # FloatList { repeated float value = 1 [packed]; }
            parts = []
            for f, w, v in _fields(payload):
                if f != 1:
                    continue
                if w == 2:
                    if len(v) % 4:
                        raise _ProtoError("packed float list length is not a multiple of 4")
                    parts.append(np.frombuffer(v, "<f4"))
                elif w == 5:
                    parts.append(np.frombuffer(v, "<f4"))
            value = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        else:  # Int64List { repeated int64 value = 1 [packed]; }
            ints: list[int] = []
            for f, w, v in _fields(payload):
                if f != 1:
                    continue
                if w == 2:
                    pos = 0
                    while pos < len(v):
                        x, pos = _varint(v, pos)
                        ints.append(_to_int64(x))
                elif w == 0:
                    ints.append(_to_int64(v))
            value = np.array(ints, np.int64)
    return value


def parse_example(data: bytes) -> dict[str, object]:
    """Decode a serialized ``tf.train.Example`` into ``{name: value}``.

    A bytes feature gives a list of ``bytes``; a float feature a float32 array; an int64 feature
    an int64 array; a feature with no kind set gives None. Raises ValueError on malformed input.
    """
    buf = memoryview(data)
    out: dict[str, object] = {}
    try:
        for field, wire, features in _fields(buf):
            if field != 1 or wire != 2:  # Example { Features features = 1; }
                continue
            for f, w, entry in _fields(features):  # Features { map<string, Feature> feature = 1; }
                if f != 1 or w != 2:
                    continue
                key = ""
                feature = memoryview(b"")
                for ef, ew, ev in _fields(entry):  # map entry { string key = 1; Feature value = 2; }
                    if ef == 1 and ew == 2:
                        key = bytes(ev).decode("utf-8")
                    elif ef == 2 and ew == 2:
                        feature = ev
                out[key] = _parse_feature(feature)
    except UnicodeDecodeError as exc:
        raise ValueError(f"malformed tf.train.Example: feature name is not UTF-8 ({exc})") from None
    except _ProtoError as exc:
        raise ValueError(f"malformed tf.train.Example: {exc}") from None
    return out


# --------------------------------------------------------------------------------------------
# Basenji2 data sets


def read_statistics(data_dir: PathLike) -> dict:
    """``data_dir/statistics.json`` as a dict (needs seq_length, target_length, num_targets)."""
    path = Path(data_dir) / "statistics.json"
    try:
        stats = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    missing = [k for k in ("seq_length", "target_length", "num_targets") if k not in stats]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}")
    stats.setdefault("seq_depth", 4)
    return stats


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def tfrecord_files(data_dir: PathLike, split: str) -> list[Path]:
    """``data_dir/tfrecords/{split}-*.tfr`` in natural order (train-2 before train-10, as basenji's
    natsorted). Raises InputError when there are none."""
    folder = Path(data_dir) / "tfrecords"
    files = sorted(folder.glob(f"{split}-*.tfr"), key=_natural_key)
    if not files:
        raise InputError(f"no TFRecord files {folder / (split + '-*.tfr')}")
    return files


def _decode(example: dict[str, object], stats: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    seq_shape = (int(stats["seq_length"]), int(stats.get("seq_depth", 4)))
    tgt_shape = (int(stats["target_length"]), int(stats["num_targets"]))
    arrays = []
    for name, dtype, shape in (("sequence", np.uint8, seq_shape), ("target", np.float16, tgt_shape)):
        value = example.get(name)
        if not isinstance(value, list) or len(value) != 1:
            raise InputError(f"{where}: feature {name!r} missing or not a single bytes value")
        raw = value[0]
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if len(raw) != expected:
            raise InputError(
                f"{where}: feature {name!r} has {len(raw)} bytes, expected {expected} for "
                f"{np.dtype(dtype).name} {list(shape)} (statistics.json)"
            )
        arrays.append(np.frombuffer(raw, dtype).reshape(shape))
    return arrays[0], arrays[1]


def raw_examples(data_dir: PathLike, split: str, *, check_crc: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Like :func:`examples` but in storage form: (uint8 ``[L, 4]``, float16 ``[896, n]``), read-only."""
    stats = read_statistics(data_dir)
    for path in tfrecord_files(data_dir, split):
        for i, record in enumerate(read_records(path, "ZLIB", check_crc=check_crc)):
            where = f"{path}: record {i}"
            try:
                example = parse_example(record)
            except ValueError as exc:
                raise InputError(f"{where}: {exc}") from None
            yield _decode(example, stats, where)


def examples(data_dir: PathLike, split: str, *, check_crc: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (sequence float32 ``[seq_length, 4]``, target float32 ``[target_length, num_targets]``)
    for every record of ``split`` in file order."""
    for seq, tgt in raw_examples(data_dir, split, check_crc=check_crc):
        yield seq.astype(np.float32), tgt.astype(np.float32)


def _shuffled(items, buffer_size: int, rng: np.random.Generator):
    """TF-style shuffle buffer: keep ``buffer_size`` items, emit a random one as each new one
    arrives, then drain the rest in random order. Every item comes out exactly once."""
    if buffer_size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = int(rng.integers(buffer_size))
        out, buf[j] = buf[j], item
        yield out
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def batches(
    data_dir: PathLike,
    split: str,
    batch_size: int,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    repeat: bool = False,
    drop_last: bool = False,
    check_crc: bool = True,
):
    """Yield torch tensors (x ``[B, seq_length, 4]`` float32, y ``[B, target_length, num_targets]``
    float32).

    ``shuffle_buffer`` > 1 shuffles with a TF-style buffer of that many examples (held in storage
    form: 0.5 MB of sequence plus 1.75 KB per track, ~10 MB per human example), seeded by
    ``seed``: the same seed gives the same order. Each epoch is a full pass in which every example
    appears exactly once; the buffer is drained at the end of each epoch, and with ``repeat``
    epochs continue forever, each shuffled differently (one generator for the whole run).
    Batches never straddle epochs: an epoch's last batch is smaller unless ``drop_last``.
    """
    import torch

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rng = np.random.default_rng(seed)
    read_statistics(data_dir)  # fail early, before the first epoch
    tfrecord_files(data_dir, split)
    while True:
        items = raw_examples(data_dir, split, check_crc=check_crc)
        seqs: list[np.ndarray] = []
        tgts: list[np.ndarray] = []
        emitted = 0
        for seq, tgt in _shuffled(items, shuffle_buffer, rng):
            seqs.append(seq)
            tgts.append(tgt)
            if len(seqs) == batch_size:
                yield _to_torch(torch, seqs, tgts)
                emitted += 1
                seqs, tgts = [], []
        if seqs and not drop_last:
            yield _to_torch(torch, seqs, tgts)
            emitted += 1
        if not repeat:
            return
        if not emitted:
            raise InputError(f"{data_dir}: split {split!r} yields no batch of {batch_size}; cannot repeat")


def _to_torch(torch, seqs, tgts):
    x = torch.from_numpy(np.stack(seqs).astype(np.float32))
    y = torch.from_numpy(np.stack(tgts).astype(np.float32))
    return x, y
