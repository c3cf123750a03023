"""Basenji2 TFRecord reader: an independent writer (own CRC-32C, own protobuf encoding), the real
TensorFlow-written fixture, corruption detection and the shuffle buffer."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_writer import crc32c, field_bytes, mask, varint
from helpers import DATA

from enformer_vep import basenji_data
from enformer_vep.basenji_data import (
    SPLITS,
    batches,
    examples,
    parse_example,
    raw_examples,
    read_records,
    read_statistics,
    tfrecord_files,
)
from enformer_vep.errors import InputError

SAMPLE = DATA / "basenji2_tf_sample"

# ------------------------------------------------------------------------------------------
# Independent writer: CRC-32C and protobuf of tests/bundle_writer.py (a plain bitwise-loop table).


def ref_masked(data: bytes) -> int:
    return mask(crc32c(data))


def pb_feature(value) -> bytes:
    if isinstance(value, bytes):  # Feature.bytes_list = 1 { repeated bytes value = 1 }
        return field_bytes(1, field_bytes(1, value))
    arr = np.asarray(value)
    if arr.dtype.kind == "f":  # Feature.float_list = 2 { packed float value = 1 }
        return field_bytes(2, field_bytes(1, arr.astype("<f4").tobytes()))
    # Feature.int64_list = 3 { packed int64 value = 1 }
    return field_bytes(3, field_bytes(1, b"".join(varint(int(v)) for v in arr)))


def pb_example(features: dict) -> bytes:
    entries = b"".join(field_bytes(1, field_bytes(1, k.encode()) + field_bytes(2, pb_feature(v)))
                       for k, v in features.items())
    return field_bytes(1, entries)  # Example.features = 1 { map<string, Feature> feature = 1 }


def frame(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", ref_masked(length)) + payload + struct.pack("<I", ref_masked(payload))


def write_zlib(path: Path, raw: bytes) -> None:
    comp = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
    with open(path, "wb") as fh:
        for i in range(0, len(raw), 1000):  # streamed in pieces, like TF's writer
            fh.write(comp.compress(raw[i : i + 1000]))
        fh.write(comp.flush())


SEQ_LEN, TGT_LEN, N_TRACKS = 64, 896, 3


def make_example(rng, index: int):
    seq = np.zeros((SEQ_LEN, 4), bool)
    seq[np.arange(SEQ_LEN), rng.integers(0, 4, SEQ_LEN)] = True
    seq[5:9] = False  # a run of N
    tgt = rng.gamma(1.0, 2.0, (TGT_LEN, N_TRACKS)).astype(np.float16)
    tgt[0, 0] = index  # marker: exact in float16 for small ints
    return seq, tgt


def make_dataset(root: Path, files: dict, seed: int = 0):
    """files: {"train-0.tfr": n_records, ...}; returns {file name: [(seq, tgt), ...]}."""
    rng = np.random.default_rng(seed)
    (root / "tfrecords").mkdir(parents=True)
    stats = {"num_targets": N_TRACKS, "seq_length": SEQ_LEN, "target_length": TGT_LEN, "pool_width": 128}
    (root / "statistics.json").write_text(json.dumps(stats))
    written, index = {}, 0
    for name, n in files.items():
        items = []
        for _ in range(n):
            items.append(make_example(rng, index))
            index += 1
        raw = b"".join(frame(pb_example({"target": t.tobytes(), "sequence": s.tobytes()})) for s, t in items)
        write_zlib(root / "tfrecords" / name, raw)
        written[name] = items
    return written


# ------------------------------------------------------------------------------------------


def test_reference_crc_matches_known_vector_and_package():
    from enformer_vep import crc32c as package

    assert crc32c(b"123456789") == 0xE3069283
    data = bytes(range(256)) * 3
    assert crc32c(data) == package.crc32c(data)
    assert ref_masked(data) == package.mask(package.crc32c(data))


def test_independent_writer_round_trip_bit_exact(tmp_path):
    written = make_dataset(tmp_path, {"train-0.tfr": 4})["train-0.tfr"]
    got = list(examples(tmp_path, "train"))
    assert len(got) == 4
    for (seq, tgt), (s, t) in zip(written, got, strict=True):
        assert s.dtype == np.float32 and s.shape == (SEQ_LEN, 4)
        assert t.dtype == np.float32 and t.shape == (TGT_LEN, N_TRACKS)
        np.testing.assert_array_equal(s, seq.astype(np.float32))
        assert np.array_equal(t.astype(np.float16).view(np.uint16), tgt.view(np.uint16))  # bit-exact
    raw = list(raw_examples(tmp_path, "train"))
    assert raw[0][0].dtype == np.uint8 and raw[0][1].dtype == np.float16


def test_read_records_payloads_and_small_stream_pieces(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    payloads = [b"", b"x", rng.bytes(5000), rng.bytes(70000)]
    path = tmp_path / "r.tfr"
    write_zlib(path, b"".join(frame(p) for p in payloads))
    assert list(read_records(path)) == payloads
    # tiny read and inflate pieces exercise the streaming paths; results are unchanged
    monkeypatch.setattr(basenji_data, "_READ_CHUNK", 7)
    monkeypatch.setattr(basenji_data, "_INFLATE_CHUNK", 13)
    assert list(read_records(path)) == payloads


def test_uncompressed_and_gzip_options(tmp_path):
    import gzip

    payloads = [b"abc", bytes(300)]
    raw = b"".join(frame(p) for p in payloads)
    (tmp_path / "plain.tfr").write_bytes(raw)
    (tmp_path / "g.tfr").write_bytes(gzip.compress(raw))
    assert list(read_records(tmp_path / "plain.tfr", None)) == payloads
    assert list(read_records(tmp_path / "g.tfr", "GZIP")) == payloads


def test_parse_example_all_feature_kinds():
    data = pb_example({"b": b"\x00\x01hi", "f": np.array([1.5, -2.25], np.float32), "i": np.array([3, -7, 2**40])})
    ex = parse_example(data)
    assert ex["b"] == [b"\x00\x01hi"]
    np.testing.assert_array_equal(ex["f"], np.array([1.5, -2.25], np.float32))
    np.testing.assert_array_equal(ex["i"], np.array([3, -7, 2**40], np.int64))
    with pytest.raises(ValueError, match="malformed"):
        parse_example(data[:-3])


def _corrupt_dataset(tmp_path, mutate):
    """Three records in train-0.tfr; mutate(raw uncompressed bytes, record offsets) -> new raw."""
    rng = np.random.default_rng(1)
    items = [make_example(rng, i) for i in range(3)]
    records = [frame(pb_example({"sequence": s.tobytes(), "target": t.tobytes()})) for s, t in items]
    offsets = np.cumsum([0] + [len(r) for r in records])
    make_dataset(tmp_path, {})
    write_zlib(tmp_path / "tfrecords" / "train-0.tfr", mutate(bytearray(b"".join(records)), offsets))
    return tmp_path / "tfrecords" / "train-0.tfr"


def test_flipped_data_byte_is_detected(tmp_path):
    def flip(raw, offsets):
        raw[offsets[1] + 12 + 100] ^= 0x04  # inside record 1's data
        return bytes(raw)

    path = _corrupt_dataset(tmp_path, flip)
    got = []
    with pytest.raises(InputError, match=r"train-0\.tfr: record 1: data CRC mismatch"):
        for item in examples(tmp_path, "train"):
            got.append(item)
    assert len(got) == 1  # record 0 came out intact before the error
    assert str(path) in str(pytest.raises(InputError, lambda: list(read_records(path))).value)


def test_flipped_length_byte_is_detected(tmp_path):
    def flip(raw, offsets):
        raw[offsets[2] + 1] ^= 0x01  # record 2's length field
        return bytes(raw)

    _corrupt_dataset(tmp_path, flip)
    with pytest.raises(InputError, match=r"record 2: length CRC mismatch"):
        list(examples(tmp_path, "train"))


def test_truncated_record_is_detected(tmp_path):
    _corrupt_dataset(tmp_path, lambda raw, offsets: bytes(raw[: offsets[2] + 40]))
    with pytest.raises(InputError, match=r"train-0\.tfr: record 2 is truncated"):
        list(examples(tmp_path, "train"))
    _corrupt_dataset(tmp_path / "b", lambda raw, offsets: bytes(raw[: offsets[1] + 5]))
    with pytest.raises(InputError, match=r"record 1 is truncated \(header has 5 of 12 bytes\)"):
        list(examples(tmp_path / "b", "train"))


def test_truncated_and_corrupt_compressed_file_is_detected(tmp_path):
    path = _corrupt_dataset(tmp_path, lambda raw, offsets: bytes(raw))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"train-0\.tfr: compressed stream is truncated"):
        list(examples(tmp_path, "train"))
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(InputError, match=r"train-0\.tfr"):
        list(examples(tmp_path, "train"))


def test_wrong_feature_size_and_missing_files(tmp_path):
    make_dataset(tmp_path, {"train-0.tfr": 1})
    stats = json.loads((tmp_path / "statistics.json").read_text())
    stats["num_targets"] = 4
    (tmp_path / "statistics.json").write_text(json.dumps(stats))
    with pytest.raises(InputError, match=r"record 0: feature 'target' has 5376 bytes, expected 7168"):
        list(examples(tmp_path, "train"))
    with pytest.raises(InputError, match=r"no TFRecord files .*valid-\*\.tfr"):
        list(examples(tmp_path, "valid"))
    with pytest.raises(InputError, match="statistics.json"):
        read_statistics(tmp_path / "nowhere")


def test_real_tensorflow_files_match_expected():
    stats = read_statistics(SAMPLE)
    assert (stats["seq_length"], stats["target_length"], stats["num_targets"]) == (131072, 896, 10)
    with np.load(SAMPLE / "expected.npz") as npz:
        expected = dict(npz)
    seen = set()
    for split in SPLITS:
        got = list(examples(SAMPLE, split))
        assert len(got) == stats[f"{split}_seqs"]
        for i, (seq, tgt) in enumerate(got):
            ref_seq, ref_tgt = expected[f"{split}_{i}_sequence"], expected[f"{split}_{i}_target"]
            assert seq.shape == ref_seq.shape and tgt.shape == ref_tgt.shape
            np.testing.assert_array_equal(seq, ref_seq.astype(np.float32))
            assert np.array_equal(tgt.astype(np.float16).view(np.uint16), ref_tgt.view(np.uint16))
            seen.update([f"{split}_{i}_sequence", f"{split}_{i}_target"])
    assert seen == set(expected)
    # the independent CRC agrees with TensorFlow's stored checksums
    path = SAMPLE / "tfrecords" / "test-0.tfr"
    raw = zlib.decompress(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    assert struct.unpack("<I", raw[8:12])[0] == ref_masked(raw[:8])
    assert struct.unpack("<I", raw[12 + length : 16 + length])[0] == ref_masked(raw[12 : 12 + length])


def test_files_in_natural_order(tmp_path):
    make_dataset(tmp_path, {"train-10.tfr": 1, "train-2.tfr": 1, "train-0.tfr": 1, "valid-0.tfr": 1})
    assert [p.name for p in tfrecord_files(tmp_path, "train")] == ["train-0.tfr", "train-2.tfr", "train-10.tfr"]
    markers = [int(t[0, 0]) for _, t in examples(tmp_path, "train")]
    assert markers == [2, 1, 0]  # written in dict order: train-10 got 0, train-2 got 1, train-0 got 2


def _markers(batch_iter, n_batches):
    out = []
    for _, (_x, y) in zip(range(n_batches), batch_iter, strict=False):
        out.append([int(v) for v in y[:, 0, 0]])
    return out


def test_batches_shapes_and_unshuffled_order(tmp_path):
    written = make_dataset(tmp_path, {"train-0.tfr": 4, "train-1.tfr": 3})
    got = list(batches(tmp_path, "train", 3))
    assert [x.shape[0] for x, _ in got] == [3, 3, 1]
    x, y = got[0]
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert tuple(x.shape) == (3, SEQ_LEN, 4) and tuple(y.shape) == (3, TGT_LEN, N_TRACKS)
    np.testing.assert_array_equal(x[1].numpy(), written["train-0.tfr"][1][0].astype(np.float32))
    assert [int(v) for xb, yb in got for v in yb[:, 0, 0]] == list(range(7))
    assert [x.shape[0] for x, _ in batches(tmp_path, "train", 3, drop_last=True)] == [3, 3]


def test_shuffle_is_deterministic_and_each_example_once_per_epoch(tmp_path):
    make_dataset(tmp_path, {"train-0.tfr": 6, "train-1.tfr": 5})
    n = 11

    def epochs(seed, count):
        it = batches(tmp_path, "train", 4, shuffle_buffer=5, seed=seed, repeat=True)
        flat = [m for b in _markers(it, 3 * count) for m in b]
        return [flat[i * n : (i + 1) * n] for i in range(count)]

    a, b, c = epochs(7, 3), epochs(7, 3), epochs(8, 3)
    assert a == b  # same seed, same order
    assert a != c  # another seed, another order
    for run in (a, c):
        for epoch in run:
            assert sorted(epoch) == list(range(n))  # every example exactly once per epoch
    assert a[0] != list(range(n)) and a[0] != a[1]  # shuffled, and differently each epoch
    # batch sizes within an epoch: 4, 4, 3 (batches never straddle epochs)
    endless = batches(tmp_path, "train", 4, shuffle_buffer=5, repeat=True)
    sizes = [x.shape[0] for _, (x, _) in zip(range(6), endless, strict=False)]
    assert sizes == [4, 4, 3, 4, 4, 3]
    # without repeat: one epoch, then stop
    once = [m for b in _markers(batches(tmp_path, "train", 4, shuffle_buffer=100, seed=1), 100) for m in b]
    assert sorted(once) == list(range(n))
