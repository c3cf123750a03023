import numpy as np
import pytest
from bundle_writer import crc32c as table_crc32c  # the test writer's bytewise table CRC

from enformer_vep import crc32c as crc_module
from enformer_vep.crc32c import crc32c, mask, unmask


def bitwise_crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C straight from the definition, one bit at a time."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"123456789", 0xE3069283),
        (b"", 0),
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
    ],
)
def test_known_vectors(data, expected):
    assert crc32c(data) == expected
    assert bitwise_crc32c(data) == expected


def test_table_reference_matches_bitwise():
    data = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    assert table_crc32c(data) == bitwise_crc32c(data)


# lanes grow with the length up to 16384 lanes of 4 bytes: cover both sides of those steps
LENGTHS = [0, 1, 2, 3, 4, 5, 7, 63, 64, 65, 127, 128, 129, 255, 256, 257, 4095, 4096, 4097,
           65535, 65536, 65537, 100_003, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3_000_017]


@pytest.mark.parametrize("n", LENGTHS)
def test_matches_reference(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32c(data) == table_crc32c(data)


def test_blocks_carry_the_running_crc(monkeypatch):
    # shrink the block so one call spans many blocks, the last one partial
    monkeypatch.setattr(crc_module, "_BLOCK", 4096)
    data = np.random.default_rng(1).integers(0, 256, 5 * 4096 + 123, dtype=np.uint8).tobytes()
    assert crc32c(data) == table_crc32c(data)


def test_input_types():
    array = np.random.default_rng(2).standard_normal((37, 11)).astype(np.float32)
    raw = array.tobytes()
    expected = table_crc32c(raw)
    assert crc32c(array) == expected
    assert crc32c(memoryview(raw)) == expected
    assert crc32c(bytearray(raw)) == expected
    strided = np.asfortranarray(array)
    assert crc32c(strided) == expected  # memory order of the logical array, not of the buffer
    assert crc32c(array[:, ::2]) == table_crc32c(array[:, ::2].tobytes())


@pytest.mark.parametrize("split", [0, 1, 5, 4096, 9999])
def test_continues_running_crc(split):
    data = np.random.default_rng(3).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    assert crc32c(data[split:], crc32c(data[:split])) == crc32c(data) == table_crc32c(data)
    assert crc32c(data[split:], 0x12345678) == table_crc32c(data[split:], 0x12345678)


def test_mask_known_values():
    # mask(c) = rotate_right(c, 15) + 0xa282ead8 (mod 2**32), worked by hand:
    assert mask(0) == 0xA282EAD8
    assert mask(1) == 0x00020000 + 0xA282EAD8 == 0xA284EAD8
    assert mask(0x80000000) == 0x00010000 + 0xA282EAD8 == 0xA283EAD8
    assert mask(0xFFFFFFFF) == 0xA282EAD7  # 0xffffffff + delta wraps around
    # 0xe3069283: high 17 bits 0x1c60d move down, low 15 bits 0x1283 move to the top: 0x2507c60d
    assert mask(0xE3069283) == (0x2507C60D + 0xA282EAD8) & 0xFFFFFFFF == 0xC78AB0E5


def test_mask_round_trip():
    for value in np.random.default_rng(4).integers(0, 1 << 32, 1000, dtype=np.uint64).tolist() + [0, 0xFFFFFFFF]:
        assert unmask(mask(value)) == value
        assert mask(unmask(value)) == value
