"""`--shard K/N`: record counts from .tbi/.csi indexes, and a partition that covers every record once."""
import gzip
import struct

import pytest
from helpers import DATA

from enformer_vep.errors import InputError
from enformer_vep.genome import Genome
from enformer_vep.shards import Layout, index_record_counts, parse_shard, record_layout, shard_part

FASTA_CONTIGS = Genome(DATA / "grch38_chr1_giab_hg002" / "reference.fa").contigs


def plain_counts(path):
    """Records per contig of a plain VCF, by reading its lines."""
    counts = {}
    for line in open(path):
        if not line.startswith("#"):
            counts[line.split("\t")[0]] = counts.get(line.split("\t")[0], 0) + 1
    return counts


@pytest.mark.parametrize("suffix", [".vcf.gz", ".bcf"])
def test_index_counts_equal_the_records_per_contig(two_contig_vcf, suffix):
    path = str(two_contig_vcf.with_suffix(suffix))
    layout = record_layout(path, FASTA_CONTIGS)
    assert layout.indexed
    assert dict(layout.contigs) == plain_counts(two_contig_vcf) == {"chr1": 30, "chr2": 7}
    assert record_layout(str(two_contig_vcf), FASTA_CONTIGS) == Layout(layout.contigs, indexed=False)


def test_csi_index_of_a_vcf_gz():
    path = str(DATA / "grch38_chr1_giab_hg002" / "input.csi.vcf.gz")
    assert index_record_counts(path, []) == {"chr1": 100}


def test_chrom_and_region_layouts(two_contig_vcf):
    gz = str(two_contig_vcf) + ".gz"
    assert record_layout(gz, FASTA_CONTIGS, chroms=("2",)) == Layout((("chr2", 7),), True)
    counted = record_layout(gz, FASTA_CONTIGS, regions=("chr1:700000-900000", "chr2:2000-3000"))
    want = sum(1 for line in open(two_contig_vcf) if not line.startswith("#")
               and line.split("\t")[0] == "chr1" and 700000 <= int(line.split("\t")[1]) <= 900000)
    assert not counted.indexed and counted.contigs == (("chr1", want), ("chr2", 2))
    with pytest.raises(InputError, match="--chrom chrX is not in the index"):
        record_layout(gz, FASTA_CONTIGS, chroms=("chrX",))


def test_a_tabix_index_without_statistics_falls_back_to_counting(tmp_path, two_contig_vcf):
    """Strip the pseudo-bins (as old indexers wrote them): the layout comes from a counting pass."""
    data = bytearray(gzip.decompress((two_contig_vcf.parent / "two_contigs.vcf.gz.tbi").read_bytes()))
    stripped = data.replace(struct.pack("<Ii", 37450, 2), struct.pack("<Ii", 99999, 2))
    assert stripped != data
    (tmp_path / "v.vcf.gz").write_bytes((two_contig_vcf.parent / "two_contigs.vcf.gz").read_bytes())
    (tmp_path / "v.vcf.gz.tbi").write_bytes(gzip.compress(bytes(stripped)))
    assert index_record_counts(str(tmp_path / "v.vcf.gz"), []) is None
    assert record_layout(str(tmp_path / "v.vcf.gz"), FASTA_CONTIGS) == Layout((("chr1", 30), ("chr2", 7)), False)


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0"])
def test_bad_shard_text(text):
    with pytest.raises(InputError, match="K/N"):
        parse_shard(text)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("size", [1, 3, 10, 1000])
def test_shards_cover_every_block_once_contiguously_and_balanced(n, size):
    layout = Layout((("chr1", 95), ("chr2", 1), ("chr3", 0), ("chrX", 41)), indexed=True)
    all_blocks = [(c, b) for c, count in layout.contigs for b in range(-(-count // size))]
    parts = [shard_part(layout, size, k, n) for k in range(1, n + 1)]
    owned = [block for part in parts for block in sorted(part.blocks, key=all_blocks.index)]
    assert owned == all_blocks  # every block once, shard after shard in VCF order
    assert sum(p.records for p in parts) == 137
    assert all(abs(p.records - 137 / n) < size for p in parts)  # balanced to within a block
    for part in parts:
        if part.blocks:
            first = min(part.blocks, key=all_blocks.index)
            contigs = [c for c, _ in layout.contigs]
            assert part.read_chroms[0] == first[0]
            assert part.record_offset == sum(n for c, n in layout.contigs[:contigs.index(first[0])])
