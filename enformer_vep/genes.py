"""Genes and their transcription start sites (TSSs), and the output bins that gene-level variant
scores sum over (docs/spec.md §4.5).

An annotation is a GTF or GFF3 (plain or gzip; GENCODE or Ensembl) or a BED6 of TSSs. It is read
once, streamed line by line through pysam's GTF/GFF3 parsers, and only the TSSs are kept: for a
full GENCODE GTF that is ~250,000 positions, not the file's gigabytes.
"""
from __future__ import annotations

import dataclasses
import gzip
import logging
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np

from .errors import InputError
from .variants import resolve_contig

log = logging.getLogger("enformer_vep")

BIN_SIZE = 128
TARGET_BINS = 896
# Output bin k of a variant at 1-based POS covers genome [POS - 57,344 + 128 k, POS - 57,216 + 128 k)
# (0-based; docs/spec.md §3.3).
FIRST_BIN_OFFSET = TARGET_BINS // 2 * BIN_SIZE
FORMATS = ("gtf", "gff3", "bed")


@dataclasses.dataclass(frozen=True)
class Gene:
    """One gene: its identifier, name, type (GENCODE ``gene_type``, Ensembl ``gene_biotype``/``biotype``;
    ``.`` from a BED) and strand (``+`` or ``-``)."""

    gene_id: str
    gene_name: str
    gene_type: str
    strand: str


@dataclasses.dataclass
class GeneAnnotation:
    """TSSs of an annotation by FASTA contig.

    Attributes
    ----------
    path : str
        The annotation file.
    genes : list of Gene
        Every gene kept, in file order.
    tss : dict of str to (numpy.ndarray, numpy.ndarray)
        Per FASTA contig, TSS positions ``int64 [n]`` (0-based, sorted; one per distinct gene and
        position) and their genes ``int32 [n]`` (indices into ``genes``).
    """

    path: str
    genes: list[Gene]
    tss: dict[str, tuple[np.ndarray, np.ndarray]]

    def within(self, contig: str, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """TSS positions in ``[start, end)`` (0-based) of FASTA contig ``contig`` and their genes."""
        positions, genes = self.tss.get(contig, (np.empty(0, np.int64), np.empty(0, np.int32)))
        lo, hi = np.searchsorted(positions, [start, end])
        return positions[lo:hi], genes[lo:hi]


@dataclasses.dataclass(frozen=True)
class GeneBins:
    """One (allele, gene) pair: the gene, its TSSs in the output bins, and the bins its scores sum.

    ``ref_bins``/``alt_bins``: sorted distinct output bins (``0 .. 895``) of the reference and the
    alternative prediction; ``tss_distance``: signed bp from the variant to the nearest TSS along the
    gene's direction of transcription (positive: the TSS lies downstream of the variant, i.e. the
    variant is upstream of it); ``n_tss``: the gene's TSSs inside the reference's output bins.
    """

    gene: int
    ref_bins: tuple[int, ...]
    alt_bins: tuple[int, ...]
    tss_distance: int
    n_tss: int


def tss_bin(position: int, pos: int) -> int:
    """Output bin of 0-based genome ``position`` in the window of a variant at 1-based ``pos`` (may
    lie outside ``0 .. 895``)."""
    return (position - pos + FIRST_BIN_OFFSET) // BIN_SIZE


def allele_gene_bins(annotation: GeneAnnotation, contig: str, pos: int, ref_length: int, alt_length: int,
                     tss_bins: int = 3) -> list[GeneBins]:
    """The genes with a TSS among the output bins of the allele ``pos, REF, ALT`` (1-based POS,
    lengths in bp) on FASTA contig ``contig``, ordered by their first TSS there (then gene index).

    Each TSS contributes its bin and its ``(tss_bins - 1) // 2`` neighbours on each side (``tss_bins``
    odd), cut to the window; a gene's bins are the union over its TSSs. In the alternative, a TSS to
    the right of REF (at or after genome position ``pos - 1 + len(REF)``) moves by ``len(ALT) -
    len(REF)`` bp, as the sequence does (docs/spec.md §3.4); a TSS inside a deleted REF keeps its place.
    """
    half = (tss_bins - 1) // 2
    start = pos - FIRST_BIN_OFFSET  # genome position of bin 0's first base
    positions, genes = annotation.within(contig, start, start + TARGET_BINS * BIN_SIZE)
    variant, right_of_ref, delta = pos - 1, pos - 1 + ref_length, alt_length - ref_length
    order: dict[int, list[int]] = {}
    for position, gene in zip(positions.tolist(), genes.tolist(), strict=True):
        order.setdefault(gene, []).append(position)
    out = []
    for gene, tss in order.items():
        strand = annotation.genes[gene].strand
        ref_bins, alt_bins = set(), set()
        for position in tss:
            moved = position + delta if position >= right_of_ref else position
            for bins, at in ((ref_bins, tss_bin(position, pos)), (alt_bins, tss_bin(moved, pos))):
                bins.update(k for k in range(at - half, at + half + 1) if 0 <= k < TARGET_BINS)
        distances = [(p - variant) if strand == "+" else (variant - p) for p in tss]
        nearest = min(distances, key=lambda d: (abs(d), d))
        out.append(GeneBins(gene, tuple(sorted(ref_bins)), tuple(sorted(alt_bins)), nearest, len(tss)))
    return out


# --- reading annotations ---------------------------------------------------------------------------------

def annotation_format(path: str | Path) -> str:
    """``gtf``, ``gff3`` or ``bed`` from the file name (``.gz`` allowed), else from the first data line."""
    name = Path(path).name.lower().removesuffix(".gz")
    for suffix, kind in ((".gtf", "gtf"), (".gff3", "gff3"), (".gff", "gff3"), (".bed", "bed")):
        if name.endswith(suffix):
            return kind
    for _, line in _lines(path):
        fields = line.rstrip("\n").split("\t")
        if len(fields) >= 9:
            return "gff3" if "=" in fields[8].split(";")[0] else "gtf"
        if len(fields) >= 6:
            return "bed"
        break
    raise InputError(f"{path}: not a GTF, GFF3 or BED6 annotation (name it .gtf, .gff3 or .bed)")


def read_annotation(path: str | Path, fasta_contigs: Collection[str], gene_types: Collection[str] | None = None
                    ) -> GeneAnnotation:
    """Genes and TSSs of ``path`` (GTF, GFF3 or BED6; plain or gzip), on the FASTA's contigs.

    GTF: each ``transcript`` feature gives a TSS of its gene (``gene_id``, ``gene_name``,
    ``gene_type`` or ``gene_biotype``): its 5' end, the start on ``+``, the end on ``-``. GFF3: gene
    features (those with a ``gene_id``; ``Name``/``gene_name``, ``biotype``/``gene_type``) and, as
    transcripts, every feature whose ``Parent`` is such a gene (GENCODE ``transcript``, Ensembl
    ``mRNA``, ``lnc_RNA``...). BED6: each line one TSS of the gene ``name`` (``start`` on ``+``,
    ``end - 1`` on ``-``). Contig names resolve as a VCF's do (``chr1`` <-> ``1``); features on
    contigs the FASTA lacks are counted and left out. ``gene_types``: keep only these types.

    Raises
    ------
    InputError
        An unreadable or malformed file (naming the line), or one with no TSS on the FASTA's contigs.
    """
    kind = annotation_format(path)
    genes: list[Gene] = []
    index: dict[str, int] = {}
    per_contig: dict[str, list[tuple[int, int]]] = {}
    unknown: dict[str, int] = {}
    resolved: dict[str, str | None] = {}
    for contig, position, gene in _transcript_starts(path, kind):
        if gene_types is not None and gene.gene_type not in gene_types:
            continue
        if contig not in resolved:
            resolved[contig] = resolve_contig(contig, fasta_contigs)
        target = resolved[contig]
        if target is None:
            unknown[contig] = unknown.get(contig, 0) + 1
            continue
        if gene.gene_id not in index:
            index[gene.gene_id] = len(genes)
            genes.append(gene)
        per_contig.setdefault(target, []).append((position, index[gene.gene_id]))
    if unknown:
        log.info("%s: %d TSSs on %d contigs the FASTA lacks (e.g. %s) left out", path, sum(unknown.values()),
                 len(unknown), next(iter(unknown)))
    if not per_contig:
        kept = f" of types {', '.join(sorted(gene_types))}" if gene_types is not None else ""
        raise InputError(f"{path}: no TSS{kept} on the FASTA's contigs")
    tss = {}
    for contig, pairs in per_contig.items():
        pairs = sorted(set(pairs))
        tss[contig] = (np.array([p for p, _ in pairs], np.int64), np.array([g for _, g in pairs], np.int32))
    return GeneAnnotation(str(path), genes, tss)


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a plain or gzip text file, comments and blank lines left out."""
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                if line.strip() and not line.startswith(("#", "track ", "browser ")):
                    yield number, line
    except (OSError, EOFError, UnicodeError) as error:
        raise InputError(f"cannot read annotation {path}: {getattr(error, 'strerror', None) or error}") from None


def _transcript_starts(path: str | Path, kind: str) -> Iterator[tuple[str, int, Gene]]:
    """(contig as the file names it, 0-based TSS, gene) of each transcript of the file."""
    if kind == "bed":
        yield from _bed_starts(path)
        return
    import pysam

    parser = pysam.asGTF() if kind == "gtf" else pysam.asGFF3()
    gff_genes: dict[str, Gene] = {}
    for number, line in _lines(path):
        try:
            record = parser(line.rstrip("\n").encode(), len(line.rstrip("\n").encode()))
            feature, strand, attributes = record.feature, record.strand, record.to_dict()
            start, end, contig = record.start, record.end, record.contig
        except Exception as error:  # noqa: BLE001 - pysam raises plain exceptions on malformed lines
            raise InputError(f"{path} line {number}: not a {kind.upper()} line ({error})") from None
        if not 0 <= start < end:
            raise InputError(f"{path} line {number}: start and end must be numbers with 1 <= start <= end")
        if kind == "gtf":
            if feature != "transcript":
                continue
            gene = _gene(attributes, strand, path, number)
        elif "gene_id" in attributes and "Parent" not in attributes:
            gff_genes[str(attributes.get("ID", attributes["gene_id"]))] = _gene(attributes, strand, path, number)
            continue
        else:
            gene = gff_genes.get(str(attributes.get("Parent", "")).split(",")[0])
            if gene is None:
                continue
        yield contig, start if strand == "+" else end - 1, gene


def _gene(attributes: dict, strand: str, path, number: int) -> Gene:
    if strand not in ("+", "-"):
        raise InputError(f"{path} line {number}: strand {strand!r}, expected + or -")
    gene_id = str(attributes.get("gene_id", ""))
    if not gene_id:
        raise InputError(f"{path} line {number}: no gene_id")
    name = attributes.get("gene_name", attributes.get("Name", gene_id))
    kind = attributes.get("gene_type", attributes.get("gene_biotype", attributes.get("biotype", ".")))
    return Gene(gene_id, str(name), str(kind), strand)


def _bed_starts(path: str | Path) -> Iterator[tuple[str, int, Gene]]:
    for number, line in _lines(path):
        fields = line.rstrip("\n").split("\t")
        try:
            contig, start, end, name, strand = fields[0], int(fields[1]), int(fields[2]), fields[3], fields[5]
        except (IndexError, ValueError):
            raise InputError(f"{path} line {number}: not a BED6 line (chrom, start, end, name, score, "
                             f"strand)") from None
        if strand not in ("+", "-") or not 0 <= start < end:
            raise InputError(f"{path} line {number}: a TSS needs start < end and strand + or -")
        yield contig, start if strand == "+" else end - 1, Gene(name, name, ".", strand)
