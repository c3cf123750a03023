"""Variant windows (docs/spec.md §3.4) against an independent string implementation, hand-built cases and encodings."""
import random

import numpy as np
import pytest
from helpers import DATA

from enformer_vep.genome import Genome
from enformer_vep.windows import (
    HALF,
    VARIANT_OFFSET,
    WINDOW,
    allele_windows,
    one_hot,
    ref_matches,
    reverse_complement,
    window_start,
)

GIAB = DATA / "grch38_chr1_giab_hg002"


def read_fasta(path) -> dict:
    seqs, name = {}, None
    with open(path) as f:
        for line in f:
            if line.startswith(">"):
                name = line[1:].split()[0]
                seqs[name] = []
            else:
                seqs[name].append(line.strip())
    return {k: "".join(v).upper() for k, v in seqs.items()}


def padded(seq: str, start: int, end: int) -> str:
    left = "N" * max(0, -start)
    right = "N" * max(0, end - max(len(seq), start))
    return (left + seq[max(0, start):max(0, min(len(seq), end))] + right)[:end - start]


def string_windows(seq: str, pos: int, ref: str, alt: str) -> tuple[str, str]:
    """The plain reading of docs/spec.md §3.2-3.4, written independently of enformer_vep.windows."""
    start = pos - 196_608
    ref_win = padded(seq, start, start + 393_216)
    p0 = pos - 1 - start
    right = padded(seq, pos - 1 + len(ref), pos - 1 + len(ref) + 393_216)
    return ref_win, (ref_win[:p0] + alt.upper() + right)[:393_216]


def as_str(codes: np.ndarray) -> str:
    assert codes.dtype == np.uint8 and codes.shape == (393_216,)
    return codes.tobytes().decode()


def write_fasta(path, seqs: dict, width: int = 60) -> None:
    with open(path, "w") as f:
        for name, seq in seqs.items():
            f.write(f">{name}\n" + "".join(seq[i:i + width] + "\n" for i in range(0, len(seq), width)))


def test_constants():
    assert (WINDOW, HALF, VARIANT_OFFSET) == (393_216, 196_608, 196_607)
    assert window_start(196_608) == 0 and window_start(1) == -196_607


@pytest.fixture(scope="module")
def giab():
    return Genome(GIAB / "reference.fa"), read_fasta(GIAB / "reference.fa")["1"]


def vcf_records():
    with open(GIAB / "input.vcf") as f:
        return [(chrom, int(pos), ref, alt) for chrom, pos, _, ref, alt, *_ in
                (line.rstrip("\n").split("\t") for line in f if not line.startswith("#"))]


def test_all_giab_variants_match_the_string_implementation(giab):
    genome, seq = giab
    records = vcf_records()
    assert len(records) == 100 and {r[0] for r in records} == {"chr1"}
    assert sum(len(alt) > len(ref) for _, _, ref, alt in records) == 6
    assert sum(len(alt) < len(ref) for _, _, ref, alt in records) == 3
    assert sum(pos + HALF > len(seq) for _, pos, _, _ in records) == 95  # every POS > 664,285
    for _, pos, ref, alt in records:
        expected_ref, expected_alt = string_windows(seq, pos, ref, alt)
        ref_win, alt_win = allele_windows(genome, "1", pos, ref, alt)
        assert as_str(ref_win) == expected_ref, pos
        assert as_str(alt_win) == expected_alt, pos
        assert ref_matches(genome, "1", pos, ref) == (True, ref)
        assert expected_ref[VARIANT_OFFSET:VARIANT_OFFSET + len(ref)] == ref


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    rng = random.Random(3)
    seqs = {"big": "".join(rng.choice("ACGT") for _ in range(500_000)),
            "tiny": "".join(rng.choice("ACGT") for _ in range(1_000))}
    path = tmp_path_factory.mktemp("hand") / "hand.fa"
    write_fasta(path, seqs)
    return Genome(path), seqs


def test_snv_lands_at_the_variant_offset(hand):
    genome, seqs = hand
    big = seqs["big"]
    pos = 250_000
    alt = "A" if big[pos - 1] != "A" else "C"
    ref_win, alt_win = allele_windows(genome, "big", pos, big[pos - 1], alt)
    assert as_str(ref_win) == big[53_392:446_608]  # pos - 196,608 .. pos + 196,608
    assert chr(ref_win[196_607]) == big[249_999] and chr(alt_win[196_607]) == alt
    assert np.flatnonzero(ref_win != alt_win).tolist() == [196_607]


def test_deletion_pulls_in_bases_beyond_the_reference_window(hand):
    genome, seqs = hand
    big = seqs["big"]
    pos = 250_000
    ref_win, alt_win = allele_windows(genome, "big", pos, big[249_999:250_009], big[249_999])
    assert as_str(alt_win) == big[53_392:250_000] + big[250_009:446_617]
    assert as_str(ref_win) == big[53_392:446_608]


def test_insertion_pushes_the_right_end_out(hand):
    genome, seqs = hand
    big = seqs["big"]
    ref_win, alt_win = allele_windows(genome, "big", 250_000, big[249_999], big[249_999] + "gattaca")
    assert as_str(alt_win) == big[53_392:250_000] + "GATTACA" + big[250_000:446_601]


def test_insertion_longer_than_the_right_half_is_truncated(hand):
    genome, seqs = hand
    big = seqs["big"]
    inserted = "".join(random.Random(4).choice("ACGT") for _ in range(200_000))
    _, alt_win = allele_windows(genome, "big", 250_000, big[249_999], inserted)
    assert as_str(alt_win) == big[53_392:249_999] + inserted[:196_609]


def test_indels_at_the_contig_end(hand):
    genome, seqs = hand
    big = seqs["big"]
    n = len(big)
    # Insertion after the last base: everything right of the allele is past the end.
    ref_win, alt_win = allele_windows(genome, "big", n, big[-1], big[-1] + "TTT")
    assert as_str(ref_win) == big[n - 196_608:] + "N" * 196_608
    assert as_str(alt_win) == big[n - 196_608:] + "TTT" + "N" * 196_605
    # Deletion of the last two bases.
    ref_win, alt_win = allele_windows(genome, "big", n - 2, big[-3:], big[-3])
    assert as_str(ref_win) == big[n - 196_610:] + "N" * 196_606
    assert as_str(alt_win) == big[n - 196_610:n - 2] + "N" * 196_608


def test_ref_longer_than_alt_by_more_than_the_remaining_contig(hand):
    genome, seqs = hand
    tiny = seqs["tiny"]
    ref = tiny[997:] + "A" * 47  # 50 bases from position 998, 47 of them past the end of the 1,000-bp contig
    ref_win, alt_win = allele_windows(genome, "tiny", 998, ref, "C")
    left = "N" * (196_608 - 998) + tiny[:997]
    assert as_str(ref_win) == left + tiny[997:] + "N" * (393_216 - len(left) - 3)
    assert as_str(alt_win) == left + "C" + "N" * 196_608
    assert ref_matches(genome, "tiny", 998, ref) == (False, tiny[997:] + "N" * 47)


def test_variant_near_position_one_is_left_padded(hand):
    genome, seqs = hand
    big = seqs["big"]
    assert as_str(allele_windows(genome, "big", 1, big[0], "A")[0]) == "N" * 196_607 + big[:196_609]
    ref_win, alt_win = allele_windows(genome, "big", 100, big[99:101], "G")
    assert as_str(ref_win) == "N" * 196_508 + big[:196_708]
    assert as_str(alt_win) == "N" * 196_508 + big[:99] + "G" + big[101:196_709]


def test_contig_shorter_than_the_window(hand):
    genome, seqs = hand
    tiny = seqs["tiny"]
    ref_win, alt_win = allele_windows(genome, "tiny", 500, tiny[499], "AC")
    assert as_str(ref_win) == "N" * 196_108 + tiny + "N" * 196_108
    assert as_str(alt_win) == "N" * 196_108 + tiny[:499] + "AC" + tiny[500:] + "N" * 196_107


def test_hand_cases_match_the_string_implementation(hand):
    genome, seqs = hand
    rng = random.Random(5)
    for name, seq in seqs.items():
        for pos in [1, 2, len(seq) - 1, len(seq), *(rng.randint(1, len(seq)) for _ in range(5))]:
            for ref_len, alt_len in [(1, 1), (1, 4), (6, 1), (3, 2), (2, 30)]:
                ref = padded(seq, pos - 1, pos - 1 + ref_len)
                alt = "".join(rng.choice("ACGT") for _ in range(alt_len))
                ref_win, alt_win = allele_windows(genome, name, pos, ref, alt)
                assert (as_str(ref_win), as_str(alt_win)) == string_windows(seq, pos, ref, alt), (name, pos, ref, alt)


def test_ref_matches(giab):
    genome, seq = giab
    assert ref_matches(genome, "1", 631_859, "cg") == (True, "CG")
    assert ref_matches(genome, "1", 631_859, "CA") == (False, "CG")
    assert ref_matches(genome, "1", 1, "N") == (True, "N")  # the 10-kb gap at the start of chr1
    assert ref_matches(genome, "1", len(seq), seq[-1] + "A") == (False, seq[-1] + "N")


def test_one_hot_hand_written():
    codes = np.frombuffer(b"ACGTNacgtRYKMSWBDHV-.", dtype=np.uint8)
    expected = np.zeros((21, 4), np.float32)
    expected[[0, 5], 0] = expected[[1, 6], 1] = expected[[2, 7], 2] = expected[[3, 8], 3] = 1
    encoded = one_hot(codes)
    assert encoded.dtype == np.float32 and encoded.shape == (21, 4)
    np.testing.assert_array_equal(encoded, expected)


def test_one_hot_batch_dims():
    codes = np.frombuffer(b"ACGTNT", dtype=np.uint8).reshape(2, 1, 3)
    encoded = one_hot(codes)
    assert encoded.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(encoded[1, 0], [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]])
    with pytest.raises(TypeError):
        one_hot(np.array([65, 67]))


def test_reverse_complement():
    def rc(text: bytes) -> bytes:
        return reverse_complement(np.frombuffer(text, dtype=np.uint8)).tobytes()

    assert rc(b"AACGTN") == b"NACGTT"
    assert rc(b"acgtRYn") == b"nRYacgt"
    batch = reverse_complement(np.frombuffer(b"AAGCCT", dtype=np.uint8).reshape(2, 3))
    assert batch.tobytes() == b"CTTAGG" and batch.flags.c_contiguous
