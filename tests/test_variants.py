"""VCF streaming: real GIAB records in every container format, regions, skips, errors, memory."""
import gzip
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
from cyvcf2 import VCF
from helpers import DATA

from enformer_vep.errors import InputError
from enformer_vep.variants import CONTIG_END, SKIP_REASONS, Allele, Skip, parse_region, read_variants, resolve_contig

GIAB = DATA / "grch38_chr1_giab_hg002"
INDEXED = ["input.vcf.gz", "input.bcf", "input.csi.vcf.gz"]
HEADER = "##fileformat=VCFv4.2\n{contigs}#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"


def plain_records():
    """(pos, ref, alt) of input.vcf, read as text: the expected rows of every test below."""
    rows = []
    for line in (GIAB / "input.vcf").read_text().splitlines():
        if not line.startswith("#"):
            chrom, pos, vid, ref, alt = line.split("\t")[:5]
            assert (chrom, vid) == ("chr1", ".") and "," not in alt
            rows.append((int(pos), ref, alt))
    return rows


def expected_alleles(records):
    return [Allele("chr1", "1", pos, f"chr1:{pos}", ref, alt, i) for i, (pos, ref, alt) in enumerate(records)]


def write_vcf(tmp_path, body, contigs=("chr1",), name="test.vcf"):
    """A VCF with the given header contigs and tab-separated ``body`` rows (written with spaces)."""
    header = HEADER.format(contigs="".join(f"##contig=<ID={c}>\n" for c in contigs))
    rows = "".join("\t".join(line.split()) + "\n" for line in textwrap.dedent(body).strip().splitlines())
    path = tmp_path / name
    path.write_text(header + rows)
    return path


def copy_data(tmp_path, *names):
    """Copy GIAB files (data before index, so the index is not older than its data)."""
    for name in names:
        shutil.copyfile(GIAB / name, tmp_path / name)
    return tmp_path / names[0]


@pytest.mark.parametrize("name", ["input.vcf", *INDEXED])
def test_real_records_in_every_format(name):
    records = plain_records()
    assert len(records) == 100
    assert list(read_variants(GIAB / name, ["1"])) == expected_alleles(records)


def test_exact_contig_name_wins_over_alias():
    rows = list(read_variants(GIAB / "input.vcf.gz", ["1", "chr1"]))
    assert {row.fasta_chrom for row in rows} == {"chr1"}


def deletion_pos():
    return next(pos for pos, ref, alt in plain_records() if len(ref) > len(alt))


@pytest.mark.parametrize("name", INDEXED)
@pytest.mark.parametrize("regions, spans", [
    (["chr1:604,358-631,859"], [(604358, 631859)]),
    (["1:604358-631859"], [(604358, 631859)]),
    (["chr1:631859"], [(631859, 631859)]),
    (["chr1:780000-800000", "1:790000-810000"], [(780000, 810000)]),      # overlapping
    (["chr1:600000-779047", "chr1:779048-790000"], [(600000, 790000)]),   # adjacent
    (["1:800000-810000", "chr1:600000-610000"], [(600000, 610000), (800000, 810000)]),  # given out of order
    (["chr1:840000-"], [(840000, CONTIG_END)]),
    (["chr1:1-602112", "chr1:850894-900000"], []),
])
def test_regions_select_records_by_pos(name, regions, spans):
    records = plain_records()
    expected = [r for r in records if any(lo <= r[0] <= hi for lo, hi in spans)]
    assert list(read_variants(GIAB / name, ["1"], regions=regions)) == expected_alleles(expected)


@pytest.mark.parametrize("name", INDEXED)
def test_region_splitting_a_deletion(name):
    pos = deletion_pos()  # a 'CG' -> 'C' deletion: REF spans pos and pos + 1
    # htslib's index query reports it as overlapping pos + 1, although it starts before
    assert [rec.POS for rec in VCF(str(GIAB / name))(f"chr1:{pos + 1}-{pos + 1}")] == [pos]
    after = [r for r in plain_records() if pos + 1 <= r[0] <= pos + 200_000]
    assert after and after[0][0] > pos
    assert list(read_variants(GIAB / name, ["1"], regions=[f"chr1:{pos + 1}-{pos + 200_000}"])) \
        == expected_alleles(after)
    rows = list(read_variants(GIAB / name, ["1"], regions=[f"chr1:{pos - 10}-{pos}", f"chr1:{pos + 1}-{pos + 1}"]))
    assert [row.pos for row in rows] == [pos]


@pytest.mark.parametrize("name", INDEXED)
@pytest.mark.parametrize("chroms", [["chr1"], ["1"]])
def test_chroms(name, chroms):
    assert list(read_variants(GIAB / name, ["1"], chroms=chroms)) == expected_alleles(plain_records())


def test_chroms_and_regions_together_never_repeat_a_record():
    rows = list(read_variants(GIAB / "input.vcf.gz", ["1"], regions=["chr1:700000-800000"], chroms=["1"]))
    assert rows == expected_alleles(plain_records())


def test_region_contig_absent_from_vcf():
    with pytest.raises(InputError, match=r"region contig 'chrZ' is not in .*input\.vcf\.gz"):
        read_variants(GIAB / "input.vcf.gz", ["1"], regions=["chrZ:1-100"])


def test_region_on_contig_without_records_is_empty():
    assert list(read_variants(GIAB / "input.vcf.gz", ["1"], regions=["chr2:1-1000000"])) == []


@pytest.mark.parametrize("name, advice", [("input.vcf.gz", "tabix -p vcf"), ("input.bcf", "bcftools index")])
def test_missing_index(tmp_path, name, advice):
    path = copy_data(tmp_path, name)
    with pytest.raises(InputError, match="regions need an index") as error:
        read_variants(path, ["1"], regions=["chr1:1-700000"])
    assert str(path) in str(error.value) and advice in str(error.value)
    assert len(list(read_variants(path, ["1"]))) == 100  # no index needed to stream it all


def test_plain_gzip_streams_but_cannot_take_regions(tmp_path):
    path = tmp_path / "input.vcf.gz"
    path.write_bytes(gzip.compress((GIAB / "input.vcf").read_bytes()))
    assert list(read_variants(path, ["1"])) == expected_alleles(plain_records())
    with pytest.raises(InputError, match="not bgzip-compressed"):
        read_variants(path, ["1"], chroms=["chr1"])


def test_uncompressed_vcf_cannot_take_regions():
    with pytest.raises(InputError, match="not compressed.*bgzip"):
        read_variants(GIAB / "input.vcf", ["1"], regions=["chr1:1-700000"])


def test_bcf_under_a_vcf_name(tmp_path):
    copy_data(tmp_path, "input.bcf", "input.bcf.csi")
    os.rename(tmp_path / "input.bcf", tmp_path / "input.vcf.gz")
    os.rename(tmp_path / "input.bcf.csi", tmp_path / "input.vcf.gz.csi")
    with pytest.raises(InputError, match="holds BCF data but is not named .bcf"):
        read_variants(tmp_path / "input.vcf.gz", ["1"], chroms=["chr1"])


def test_edge_cases_file():
    path = DATA / "vcf" / "edge_cases.vcf"

    def A(pos, ref, alt, rec, vid=None):
        return Allele("chr1", "1", pos, vid or f"chr1:{pos}", ref, alt, rec)

    def S(pos, ref, alt, reason, rec, chrom="chr1"):
        return Skip(chrom, pos, f"{chrom}:{pos}", ref, alt, reason, rec)

    unknown = "chrUn_KI270302v1"
    assert list(read_variants(path, ["1"])) == [
        A(700000, "T", "C", 0, "rs1"),
        A(700100, "CAC", "TT", 1), A(700100, "CAC", "C", 1), S(700100, "CAC", "<DEL>", "symbolic allele", 1),
        A(700200, "C", "A", 2), S(700200, "C", "*", "symbolic allele", 2), A(700200, "C", "CTT", 2),
        S(700300, "A", ".", "no ALT allele", 3),
        S(700400, "A", ".", "no ALT allele", 4),
        A(700500, "A", "G", 5),
        S(700600, "A", "R", "invalid allele", 6),
        S(700700, "G", "G]chr1:800000]", "symbolic allele", 7), S(700700, "G", "G.", "symbolic allele", 7),
        A(700800, "C", "T", 8),
        S(100, "A", "C", "contig not in FASTA", 9, unknown), S(100, "A", "G", "contig not in FASTA", 9, unknown),
    ]
    # the fixture's REF alleles are the reference's bases, so other modules can score it
    sequence = "".join(line.strip() for line in (GIAB / "reference.fa").read_text().splitlines()[1:])
    for row in read_variants(path, ["1"]):
        if isinstance(row, Allele):
            assert sequence[row.pos - 1:row.pos - 1 + len(row.ref)] == row.ref


def test_multiallelic_symbolic_and_star(tmp_path):
    path = write_vcf(tmp_path, """
        chr1 10 rs7 A C,<DEL>,*,G,<*> . PASS .
    """)
    rows = list(read_variants(path, ["chr1"]))
    assert [(type(row), row.alt) for row in rows] == [
        (Allele, "C"), (Skip, "<DEL>"), (Skip, "*"), (Allele, "G"), (Skip, "<*>")]
    assert {row.reason for row in rows if isinstance(row, Skip)} == {"symbolic allele"}
    assert {(row.id, row.record) for row in rows} == {("rs7", 0)}


def test_breakends(tmp_path):
    path = write_vcf(tmp_path, """
        chr1 10 . G G]chr1:500],[chr1:500[G,G.,.G,T . PASS .
    """)
    rows = list(read_variants(path, ["chr1"]))
    assert [(row.alt, getattr(row, "reason", None)) for row in rows] == [
        ("G]chr1:500]", "symbolic allele"), ("[chr1:500[G", "symbolic allele"),
        ("G.", "symbolic allele"), (".G", "symbolic allele"), ("T", None)]


def test_gvcf_blocks_and_missing_alt(tmp_path):
    path = write_vcf(tmp_path, """
        chr1 10 . A <NON_REF> . . END=20
        chr1 21 . C <*> . . END=30
        chr1 31 . G . . . .
        chr1 32 . T C,<NON_REF> . PASS .
    """)
    assert list(read_variants(path, ["chr1"])) == [
        Skip("chr1", 10, "chr1:10", "A", ".", "no ALT allele", 0),
        Skip("chr1", 21, "chr1:21", "C", ".", "no ALT allele", 1),
        Skip("chr1", 31, "chr1:31", "G", ".", "no ALT allele", 2),
        Allele("chr1", "chr1", 32, "chr1:32", "T", "C", 3),
        Skip("chr1", 32, "chr1:32", "T", "<NON_REF>", "symbolic allele", 3),
    ]


def test_ids_case_and_allele_kinds(tmp_path):
    path = write_vcf(tmp_path, """
        chr1 10 . a g . PASS .
        chr1 20 rs5;rs6 acg Tt . PASS .
        chr1 30 rs9 C CTTA,c . PASS .
    """)
    assert list(read_variants(path, ["chr1"])) == [
        Allele("chr1", "chr1", 10, "chr1:10", "A", "G", 0),
        Allele("chr1", "chr1", 20, "rs5;rs6", "ACG", "TT", 1),
        Allele("chr1", "chr1", 30, "rs9", "C", "CTTA", 2),
        Allele("chr1", "chr1", 30, "rs9", "C", "C", 2),
    ]


def test_iupac_alleles_are_invalid(tmp_path):
    path = write_vcf(tmp_path, """
        chr1 10 . A R,N,T . PASS .
        chr1 20 . Y C . PASS .
    """)
    assert [(row.alt, getattr(row, "reason", None)) for row in read_variants(path, ["chr1"])] == [
        ("R", "invalid allele"), ("N", None), ("T", None), ("C", "invalid allele")]


def test_pass_only(tmp_path):
    path = write_vcf(tmp_path, """
        chr1 10 . A C,G . PASS .
        chr1 20 . A C . . .
        chr1 30 . A C,G . q10 .
        chr1 40 . A C . PASS;q10 .
    """)
    assert all(isinstance(row, Allele) for row in read_variants(path, ["chr1"]))
    rows = list(read_variants(path, ["chr1"], pass_only=True))
    assert [(row.pos, row.alt, getattr(row, "reason", None)) for row in rows] == [
        (10, "C", None), (10, "G", None), (20, "C", None),
        (30, "C", "not PASS"), (30, "G", "not PASS"), (40, "C", "not PASS")]


def test_unknown_contig_among_known(tmp_path):
    path = write_vcf(tmp_path, """
        chr1 10 . A C . PASS .
        chrUn 5 . A C,G . PASS .
        chr2 7 . A T . PASS .
    """, contigs=("chr1", "chrUn", "chr2"))
    assert list(read_variants(path, ["1", "2"])) == [
        Allele("chr1", "1", 10, "chr1:10", "A", "C", 0),
        Skip("chrUn", 5, "chrUn:5", "A", "C", "contig not in FASTA", 1),
        Skip("chrUn", 5, "chrUn:5", "A", "G", "contig not in FASTA", 1),
        Allele("chr2", "2", 7, "chr2:7", "A", "T", 2),
    ]


def test_no_contig_matches_header(tmp_path):
    path = write_vcf(tmp_path, "chr1 10 . A C . PASS .", contigs=("chr1", "chr2"))
    with pytest.raises(InputError, match="no VCF contig matches the FASTA: VCF has chr1, chr2; FASTA has 7, 8"):
        read_variants(path, ["7", "8"])  # raised before any row


def test_no_contig_matches_records_without_header_contigs(tmp_path):
    path = write_vcf(tmp_path, """
        chrA 10 . A C . PASS .
        chrB 20 . A C . PASS .
    """, contigs=())
    rows = []
    with pytest.raises(InputError, match="no VCF contig matches the FASTA: VCF has chrA, chrB; FASTA has 1"):
        rows.extend(read_variants(path, ["1"]))
    assert [row.reason for row in rows] == ["contig not in FASTA"] * 2


def test_header_without_contigs_is_fine_when_records_match(tmp_path):
    path = write_vcf(tmp_path, "chr1 10 . A C . PASS .", contigs=())
    assert [row.fasta_chrom for row in read_variants(path, ["1"])] == ["1"]


def test_mitochondria_alias(tmp_path):
    path = write_vcf(tmp_path, "chrM 73 . A G . PASS .", contigs=("chrM",))
    assert list(read_variants(path, ["1", "MT"])) == [Allele("chrM", "MT", 73, "chrM:73", "A", "G", 0)]


def test_malformed_record_names_last_good_record(tmp_path):
    path = write_vcf(tmp_path, """
        chr1 10 . A C . PASS .
        chr1 20 . A C . PASS .
        chr1 2x0 . A C . PASS .
        chr1 40 . A C . PASS .
    """)
    rows = []
    with pytest.raises(InputError, match=r"after chr1:20 \(record 3, counting from 1\)") as error:
        rows.extend(read_variants(path, ["chr1"]))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert [row.pos for row in rows] == [10, 20]


def test_malformed_first_record(tmp_path):
    path = write_vcf(tmp_path, "chr1 10 . A")
    with pytest.raises(InputError, match="malformed or truncated VCF record at the first record"):
        list(read_variants(path, ["chr1"]))


def test_truncated_bgzip(tmp_path):
    path = tmp_path / "cut.vcf.gz"
    data = (GIAB / "input.vcf.gz").read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(InputError, match="malformed or truncated VCF record"):
        list(read_variants(path, ["1"]))


def test_empty_vcf(tmp_path):
    path = write_vcf(tmp_path, "")
    assert list(read_variants(path, ["chr1"])) == []


META = "##fileformat=VCFv4.2\n##contig=<ID=chr1,length=1000>\n"
FIXED = "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"


@pytest.mark.parametrize("content, message", [
    (None, "VCF file not found"),
    ("", "not a VCF: the first line is not ##fileformat"),
    (">1\nACGT\n", "not a VCF: the first line is not ##fileformat"),
    ("chr1\t10\t.\tA\tC\t.\t.\t.\n", "not a VCF: the first line is not ##fileformat"),  # no header
    (META + FIXED.replace("\t", " ") + "\nchr1\t10\t.\tA\tC\t.\t.\t.\n", "separated by spaces instead of tabs"),
    (META + FIXED + "\tFORMAT\tS1\tS2\tS1\nchr1\t10\t.\tA\tC\t.\t.\t.\tGT\t0\t0\t1\n",
     "repeats the sample name 'S1'"),
    (META + "#CHROM\tPOS\tID\tREF\tALT\n", "does not start with the 8 tab-separated columns"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "x.vcf"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as error:
        read_variants(path, ["1"])
    assert str(path) in str(error.value)


def test_skip_reasons_are_the_emitted_ones():
    assert SKIP_REASONS == ("no ALT allele", "symbolic allele", "invalid allele", "not PASS",
                            "contig not in FASTA")


@pytest.mark.parametrize("name, contigs, expected", [
    ("chr1", ["chr1", "1"], "chr1"),
    ("chr1", ["1", "2"], "1"),
    ("1", ["chr1"], "chr1"),
    ("chrX", ["X", "Y"], "X"),
    ("X", ["chrX"], "chrX"),
    ("chrM", ["MT"], "MT"),
    ("MT", ["chrM"], "chrM"),
    ("chrMT", ["M"], "M"),
    ("M", ["chrMT"], "chrMT"),
    ("chr1", ["2", "chr2"], None),
    ("chrUn_KI270302v1", ["Un_KI270302v1"], "Un_KI270302v1"),
    ("GL000192.1", ["1"], None),
])
def test_resolve_contig(name, contigs, expected):
    assert resolve_contig(name, contigs) == expected


@pytest.mark.parametrize("text, expected", [
    ("chr1:1,000-2,000", ("chr1", 1000, 2000)),
    ("chr1:1000-2000", ("chr1", 1000, 2000)),
    (" 1:5-5 ", ("1", 5, 5)),
    ("chr1", ("chr1", 1, CONTIG_END)),
    ("chr1:1000", ("chr1", 1000, 1000)),
    ("chr1:1000-", ("chr1", 1000, CONTIG_END)),
    ("HLA-A*01:01:1-10", ("HLA-A*01:01", 1, 10)),
])
def test_parse_region(text, expected):
    assert parse_region(text) == expected


@pytest.mark.parametrize("text, message", [
    ("chr1:2000-1000", "start 2,000 is after end 1,000"),
    ("chr1:0-10", "1-based"),
    ("chr1:a-b", "expected CHROM"),
    ("chr1:10-20-30", "expected CHROM"),
    (":1-10", "contig name is empty"),
    ("", "contig name is empty"),
    ("chr 1:1-10", "has spaces"),
])
def test_parse_region_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_region(text)


def test_streaming_memory_stays_flat(tmp_path):
    n = 200_000
    path = tmp_path / "big.vcf"
    with open(path, "w") as out:
        out.write(HEADER.format(contigs="##contig=<ID=chr1>\n"))
        out.writelines(f"chr1\t{i + 1}\t.\tA\tC\t.\tPASS\t.\n" for i in range(n))
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_variants(path, ["1"]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 2_000_000  # a materialised list of 200,000 Alleles alone would take > 30 MB


WRITER = """
import select, sys
path, n = sys.argv[1], int(sys.argv[2])
lines = [f"chr1\\t{i + 1}\\t.\\tA\\tC\\t.\\t.\\t.\\n" for i in range(n)]
with open(path, "w") as out:
    out.write(sys.argv[3])
    out.write("".join(lines[: n // 20]))
    out.flush()
    told = bool(select.select([sys.stdin], [], [], 10)[0])  # wait for the reader's first row
    out.write("".join(lines[n // 20:]))
sys.exit(0 if told else 3)
"""


def test_first_row_arrives_before_the_file_is_written(tmp_path):
    # A separate process, not a thread: cyvcf2 holds the GIL while it blocks on the pipe.
    path, n = tmp_path / "pipe.vcf", 200_000
    os.mkfifo(path)
    header = HEADER.format(contigs="##contig=<ID=chr1>\n")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n), header], stdin=subprocess.PIPE)
    try:
        rows = read_variants(path, ["1"])
        assert next(rows) == Allele("chr1", "1", 1, "chr1:1", "A", "C", 0)
        writer.stdin.write(b"go\n")
        writer.stdin.flush()
        assert sum(1 for _ in rows) == n - 1
        assert writer.wait(30) == 0, "the first row only came once the whole file was written"
    finally:
        writer.kill()
