"""Which records a run reads and scores: ``--shard K/N`` and the split among device workers.

A run reads the VCF in *blocks* of up to ``checkpoint_every`` consecutive records of one
contig (numbered per contig from 0); a block is staged as one chunk and is batched the
same way whoever scores it, so any split on block boundaries gives the same numbers as one
run. ``--shard K/N`` takes the blocks whose first record falls in the K-th of N equal parts
of the record stream: contiguous, covering every record exactly once, balanced to within a
block. The record counts per contig come from the ``.tbi``/``.csi`` index when there is one
(and then a shard queries only its contigs), else from one counting pass over the VCF.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter

from .errors import InputError
from .variants import open_vcf, read_variants, resolve_contig
from .vcf_index import check_vcf_index, index_record_counts


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8): shard K of N, 1 <= K <= N (K is 1-based, like SLURM's --array=1-N)."""
    k, slash, n = text.partition("/")
    if not (slash and k.strip().isdigit() and n.strip().isdigit()) or not 1 <= int(k) <= int(n):
        raise InputError(f"--shard expects K/N with 1 <= K <= N (e.g. 2/8), not {text!r}")
    return int(k), int(n)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Records per contig of the stream a run reads, in stream order. ``indexed``: the counts came
    from the index, so each contig can be read alone."""

    contigs: tuple[tuple[str, int], ...]
    indexed: bool

    @property
    def records(self) -> int:
        return sum(n for _, n in self.contigs)

    def blocks(self, size: int) -> list[tuple[str, int, int, int]]:
        """(contig, block, position of its first record in the stream, records) of every block."""
        out, at = [], 0
        for contig, n in self.contigs:
            for block, start in enumerate(range(0, n, size)):
                out.append((contig, block, at + start, min(size, n - start)))
            at += n
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.contigs).encode()).hexdigest()


def record_layout(vcf: str, fasta_contigs, *, regions=(), chroms=()) -> Layout:
    """Count the records of the stream ``read_variants`` gives for these arguments, per contig."""
    if not regions:
        handle = open_vcf(vcf)
        try:
            header = list(handle.seqnames)  # a BCF's CSI numbers contigs as its header does
        finally:
            handle.close()
        counts = index_record_counts(vcf, header)
        if counts is not None:
            check_vcf_index(vcf, header)
        if counts is not None:
            wanted = {resolve_contig(c, counts) for c in chroms}
            if None in wanted:
                missing = [c for c in chroms if resolve_contig(c, counts) is None]
                raise InputError(f"--chrom {missing[0]} is not in the index of {vcf}")
            return Layout(tuple((c, n) for c, n in counts.items() if n and (not chroms or c in wanted)), True)
    counts: Counter = Counter()
    last = -1
    for item in read_variants(vcf, fasta_contigs, regions=regions, chroms=chroms):
        if item.record != last:
            counts[item.chrom] += 1
            last = item.record
    return Layout(tuple(counts.items()), False)


@dataclasses.dataclass(frozen=True)
class Part:
    """The blocks one shard scores. ``read_chroms``: contigs to query through the index (None: read
    the whole stream); ``record_offset``: stream position of the first record so read."""

    shard: int
    shards: int
    blocks: frozenset[tuple[str, int]]
    records: int
    read_chroms: tuple[str, ...] | None
    record_offset: int


def shard_part(layout: Layout, size: int, shard: int, shards: int) -> Part:
    """Shard ``shard`` of ``shards`` (1-based): the blocks whose first record lies in its share."""
    total = max(1, layout.records)
    mine = [b for b in layout.blocks(size) if b[2] * shards // total == shard - 1]
    read_chroms, offset = None, 0
    if layout.indexed and mine:
        read_chroms = tuple(dict.fromkeys(b[0] for b in mine))
        first = [c for c, _ in layout.contigs].index(read_chroms[0])
        offset = sum(n for _, n in layout.contigs[:first])
    return Part(shard, shards, frozenset((b[0], b[1]) for b in mine), sum(b[3] for b in mine), read_chroms, offset)
