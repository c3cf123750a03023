"""Genomic regions to predict or explain, and the model window centred on each.

A region gets the 393,216-bp window centred on it (the TF-Hub contract, as for variants); the model
uses its central 196,608 bp and predicts 896 bins of 128 bp covering the central 114,688 bp.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import InputError, preview
from .genome import Genome
from .model import BIN_SIZE, HUB_SEQUENCE_LENGTH, SEQUENCE_LENGTH, TARGET_LENGTH
from .variants import CONTIG_END, parse_region, resolve_contig

#: Span of the output bins (114,688 bp) around the region's centre.
BINS_SPAN = TARGET_LENGTH * BIN_SIZE


@dataclass(frozen=True)
class Region:
    """``[start, end)`` on contig ``chrom``, 0-based half-open.

    ``chrom`` is the contig as the user named it ('chr1'), the name every output and label carries;
    ``fasta_chrom`` the FASTA's name for it ('1'), where the sequence is read (default: ``chrom``).
    """

    chrom: str
    start: int
    end: int
    name: str
    fasta_chrom: str = ""

    def __post_init__(self):
        if not self.fasta_chrom:
            object.__setattr__(self, "fasta_chrom", self.chrom)


def bin_starts(centre: int) -> np.ndarray:
    """The 0-based genome start of each output bin, ``int64 [896]``, of the window centred on ``centre``
    (``[centre - 196,608, centre + 196,608)``; a variant at 1-based POS has ``centre = POS``): from
    ``centre - 57,344`` in steps of 128."""
    return centre - BINS_SPAN // 2 + BIN_SIZE * np.arange(TARGET_LENGTH, dtype=np.int64)


def window_for(region: Region) -> tuple[int, np.ndarray]:
    """``(window_start, bin_starts)``: the 0-based start of the 393,216-bp window centred on ``region``
    (centre ``c = (start + end) // 2``, window ``[c - 196,608, c + 196,608)``) and its bins' starts."""
    centre = (region.start + region.end) // 2
    return centre - HUB_SEQUENCE_LENGTH // 2, bin_starts(centre)


def model_input(genome: Genome, region: Region) -> tuple[int, np.ndarray]:
    """``(start, codes uint8 [196,608])``: the central part of the window, the only bases the model
    reads (fetching the flanks it crops away would only cost time); N outside the contig."""
    window_start, _ = window_for(region)
    start = window_start + (HUB_SEQUENCE_LENGTH - SEQUENCE_LENGTH) // 2
    return start, genome.fetch(region.fasta_chrom, start, start + SEQUENCE_LENGTH)


def read_regions(spec: str | os.PathLike, fasta_contigs: Mapping[str, int]) -> list[Region]:
    """Regions from ``spec``: a BED file path (0-based half-open, tab-separated, optional 4th column
    the name; 'track', 'browser', '#' and blank lines skipped) or a region text 'chr1:1,000-2,000'
    (1-based inclusive; 'chr1' is the whole contig). ``fasta_contigs`` maps FASTA contig names to
    lengths (:attr:`Genome.contigs`); 'chr1'/'1' aliases resolve to the FASTA's name
    (:attr:`Region.fasta_chrom`, where the sequence is read) while :attr:`Region.chrom` keeps the name
    as given, for every output. The default name is ``chrom:start1-end`` (1-based inclusive, the
    contig as given)."""
    if os.path.isfile(spec):
        return _read_bed(os.fspath(spec), fasta_contigs)
    text = os.fspath(spec)
    if text.lower().endswith((".bed", ".bed.txt")) or os.sep in text:
        raise InputError(f"{text}: no such BED file")
    chrom, start1, end = parse_region(text)
    contig = _contig(chrom, fasta_contigs, f"region {text!r}")
    if end == CONTIG_END:  # 'chr1' or 'chr1:1000-': to the contig's end
        end = fasta_contigs[contig]
    if start1 > fasta_contigs[contig]:
        raise InputError(f"region {text!r} starts after the end of contig {_named(chrom, contig)} "
                         f"({fasta_contigs[contig]:,} bp)")
    return [Region(chrom, start1 - 1, end, f"{chrom}:{start1}-{end}", contig)]


def _named(given: str, contig: str) -> str:
    """A contig in messages: the name given, and the FASTA's when it differs."""
    return repr(given) if given == contig else f"{given!r} (FASTA {contig!r})"


def _contig(name: str, fasta_contigs: Mapping[str, int], where: str) -> str:
    contig = resolve_contig(name, fasta_contigs)
    if contig is None:
        raise InputError(f"{where}: contig {name!r} is not in the FASTA (it has {preview(fasta_contigs)})")
    return contig


def _read_bed(path: str, fasta_contigs: Mapping[str, int]) -> list[Region]:
    regions = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            where = f"{path} line {number}"
            fields = line.split("\t")
            if len(fields) < 3:
                raise InputError(f"{where}: expected tab-separated CHROM START END [NAME], got {line[:80]!r}")
            try:
                start, end = int(fields[1]), int(fields[2])
            except ValueError:
                raise InputError(f"{where}: START and END must be integers, got {fields[1]!r} and "
                                 f"{fields[2]!r}") from None
            if start < 0 or end <= start:
                raise InputError(f"{where}: need 0 <= START < END (0-based, half-open), got {start} and {end}")
            chrom = fields[0]
            contig = _contig(chrom, fasta_contigs, where)
            if start >= fasta_contigs[contig]:
                raise InputError(f"{where}: START {start} is past the end of contig {_named(chrom, contig)} "
                                 f"({fasta_contigs[contig]:,} bp)")
            name = fields[3].strip() if len(fields) > 3 and fields[3].strip() else f"{chrom}:{start + 1}-{end}"
            regions.append(Region(chrom, start, end, name, contig))
    if not regions:
        raise InputError(f"{path}: no regions (a BED file with CHROM START END [NAME] lines was expected)")
    return regions
