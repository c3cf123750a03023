"""`enformer-score index`: a user's VCF, BCF or FASTA compressed and indexed through pysam, checked by
reading it back through the package (region queries, window reads)."""
import gzip
import shutil

import pysam
from click.testing import CliRunner
from helpers import DATA

from enformer_vep.cli import cli
from enformer_vep.genome import Genome
from enformer_vep.variants import Allele, read_variants

GIAB = DATA / "grch38_chr1_giab_hg002"


def index(path):
    result = CliRunner().invoke(cli, ["index", str(path)])
    assert result.exit_code == 0, result.output
    return result.output


def region_ids(path):
    return [r.id for r in read_variants(str(path), ["1"], regions=["chr1:700000-800000"]) if isinstance(r, Allele)]


def expected_ids():
    """IDs of the GIAB records with POS in 700,000..800,000, read from the plain text."""
    rows = [line.split("\t") for line in (GIAB / "input.vcf").read_text().splitlines() if not line.startswith("#")]
    return [r[2] if r[2] != "." else f"{r[0]}:{r[1]}" for r in rows if 700_000 <= int(r[1]) <= 800_000]


def test_a_plain_vcf_is_compressed_and_indexed(tmp_path):
    shutil.copyfile(GIAB / "input.vcf", tmp_path / "in.vcf")
    output = index(tmp_path / "in.vcf")
    assert "in.vcf.gz.tbi" in output and (tmp_path / "in.vcf").is_file()  # the original is kept
    assert gzip.decompress((tmp_path / "in.vcf.gz").read_bytes()) == (GIAB / "input.vcf").read_bytes()
    assert region_ids(tmp_path / "in.vcf.gz") == expected_ids() and expected_ids()


def test_a_plain_gzip_vcf_is_recompressed_with_bgzip_and_indexed(tmp_path):
    (tmp_path / "in.vcf.gz").write_bytes(gzip.compress((GIAB / "input.vcf").read_bytes()))
    index(tmp_path / "in.vcf.gz")
    assert (tmp_path / "in.vcf.gz").read_bytes()[12:14] == b"BC"  # a BGZF block now
    assert region_ids(tmp_path / "in.vcf.gz") == expected_ids()


def test_a_bcf_gets_a_fresh_csi(tmp_path):
    shutil.copyfile(GIAB / "input.bcf", tmp_path / "in.bcf")
    index(tmp_path / "in.bcf")
    assert (tmp_path / "in.bcf.csi").is_file() and region_ids(tmp_path / "in.bcf") == expected_ids()


def test_a_stale_fasta_index_is_rebuilt(tmp_path):
    text = ">1 a description\n" + "\n".join(["ACGTN" * 12] * 50) + "\n"
    (tmp_path / "ref.fa").write_text(text)
    (tmp_path / "ref.fa.fai").write_text("1\t3000\t3\t60\t61\n")  # 3 bytes off: stale
    index(tmp_path / "ref.fa")
    assert (tmp_path / "ref.fa.fai").read_text() == "1\t3000\t17\t60\t61\n"  # ">1 a description\n" is 17 bytes
    assert Genome(tmp_path / "ref.fa").fetch("1", 0, 10).tobytes() == b"ACGTNACGTN"
    assert pysam.FastaFile(str(tmp_path / "ref.fa")).fetch("1", 0, 10) == "ACGTNACGTN"


def test_anything_else_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    result = CliRunner().invoke(cli, ["index", str(tmp_path / "notes.txt")])
    assert result.exit_code == 1 and "is neither a VCF, a BCF nor a FASTA" in result.output


def test_a_truncated_vcf_gz_is_a_one_line_error_and_leaves_no_index(tmp_path):
    whole = (GIAB / "input.vcf.gz").read_bytes()
    path = tmp_path / "cut.vcf.gz"
    path.write_bytes(whole[: len(whole) // 2])  # inside a BGZF block
    result = CliRunner().invoke(cli, ["index", str(path)])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: cannot index {path}: htslib could not read it to the end (truncated " \
                                    "or corrupt?)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.vcf.gz"]
