"""Variant windows (docs/spec.md §3.2-3.4) and their encodings.

A VCF record at 1-based ``POS`` gets the 0-based window ``[POS - 196,608, POS + 196,608)``; REF's first base
sits at offset :data:`VARIANT_OFFSET`. Sequences are ``uint8`` ASCII codes, upper case, ``N`` outside the
chromosome.
"""
from __future__ import annotations

import numpy as np

from .genome import Genome

WINDOW = 393_216
HALF = WINDOW // 2
VARIANT_OFFSET = HALF - 1

# ``[256, 4]``: the one-hot row of each byte. Both cases map, so the encoding equals docs/spec.md §3.1's
# "upper-case, then encode" whatever the caller passes.
ONE_HOT_TABLE = np.zeros((256, 4), dtype=np.float32)
ONE_HOT_TABLE[np.frombuffer(b"ACGTacgt", dtype=np.uint8), [0, 1, 2, 3, 0, 1, 2, 3]] = 1
_COMPLEMENT = np.arange(256, dtype=np.uint8)
_COMPLEMENT[np.frombuffer(b"ACGTRYKMBVDHacgtrykmbvdh", dtype=np.uint8)] = np.frombuffer(
    b"TGCAYRMKVBHDtgcayrmkvbhd", dtype=np.uint8)


def window_start(pos: int) -> int:
    """0-based start of the window for 1-based ``pos``."""
    return pos - HALF


def allele_windows(genome: Genome, chrom: str, pos: int, ref: str, alt: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ref_window, alt_window)``, ``uint8 [WINDOW]`` each, for the record ``pos, ref, alt``.

    ALT replaces REF at :data:`VARIANT_OFFSET`; the left flank stays fixed and the right flank (the FASTA from
    ``pos - 1 + len(ref)`` on) is pulled in or pushed out so the length stays ``WINDOW``. REF is not checked
    (see :func:`ref_matches`); only its length is used. One FASTA read per call.
    """
    alt_codes = np.frombuffer(alt.upper().encode("ascii"), dtype=np.uint8)[:WINDOW - VARIANT_OFFSET]
    start = window_start(pos)
    # A deletion pulls up to len(ref) - len(alt) bases from beyond the reference window into the alt window.
    seq = genome.fetch(chrom, start, start + WINDOW + max(0, len(ref) - len(alt)))
    right_start = VARIANT_OFFSET + len(alt_codes)
    alt_window = np.empty(WINDOW, dtype=np.uint8)
    alt_window[:VARIANT_OFFSET] = seq[:VARIANT_OFFSET]
    alt_window[VARIANT_OFFSET:right_start] = alt_codes
    flank = VARIANT_OFFSET + len(ref)
    alt_window[right_start:] = seq[flank:flank + WINDOW - right_start]
    return seq[:WINDOW], alt_window


def ref_matches(genome: Genome, chrom: str, pos: int, ref: str) -> tuple[bool, str]:
    """Whether REF equals the FASTA at 1-based ``pos`` (case-insensitively), and the FASTA bases there
    (upper case, ``N`` past the contig end)."""
    bases = genome.fetch(chrom, pos - 1, pos - 1 + len(ref)).tobytes().decode("latin-1")
    return bases == ref.upper(), bases


def one_hot(codes: np.ndarray) -> np.ndarray:
    """``float32 [..., L, 4]`` (order A, C, G, T) for ASCII codes ``uint8 [..., L]``. Lower-case acgt encode like
    upper case; N and every other byte (IUPAC codes included) give all zeros."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"one_hot expects uint8 ASCII codes, got {codes.dtype}")
    return ONE_HOT_TABLE.take(codes, axis=0)  # take: several times faster than fancy indexing here


def reverse_complement(codes: np.ndarray) -> np.ndarray:
    """Reverse complement ``uint8 [..., L]`` of ASCII codes along the last axis (IUPAC-aware, case kept; N and
    other bytes stay as they are). Returns a new C-contiguous array."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"reverse_complement expects uint8 ASCII codes, got {codes.dtype}")
    return _COMPLEMENT.take(codes[..., ::-1])
