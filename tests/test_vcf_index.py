"""The .tbi/.csi index beside a VCF.gz/BCF: bins by hand, record counts against the VCF text, and the
refusal of an index that no longer matches its data (the `stale_tbi_region` bug report and indexes
made stale here by rewriting, appending to or editing the files after indexing)."""
import gzip
import os
import re
import struct
import time

import pysam
import pysam.bcftools
import pytest
from helpers import DATA

from enformer_vep.errors import InputError
from enformer_vep.vcf_index import bin_range, check_vcf_index, index_record_counts, pseudo_bin

CONTIGS = ["ctgA", "ctgB", "ctgC"]
BUG_REPORT = DATA / "bug_reports" / "stale_tbi_region"


def header(contigs=CONTIGS) -> str:
    return ("##fileformat=VCFv4.2\n"
            '##INFO=<ID=NOTE,Number=1,Type=String,Description="filler">\n'
            + "".join(f"##contig=<ID={name},length=10000000>\n" for name in contigs)
            + "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n")


def record(chrom: str, pos: int, ref: str = "A") -> str:
    return f"{chrom}\t{pos}\t.\t{ref}\tG\t50\tPASS\tNOTE={'ACGT' * 100}\n"


def records(skip_a: int = 0, extra_a: int = 0) -> list[str]:
    """ctgA: 200 records 1,000 bp apart, each over 400 bytes, so ctgA spans two BGZF blocks (65,280
    bytes each); ``skip_a`` drops its first records, ``extra_a`` adds records between them. ctgB: 5
    records from 5,000,001, far from bin 0. ctgC: a 10-bp REF at 16,380 that straddles the 16,384-bp
    boundary of the smallest bins, so it sits in a bigger bin, then two SNVs."""
    ctg_a = [(1000 * i + 1, record("ctgA", 1000 * i + 1)) for i in range(skip_a, 200)]
    ctg_a += [(1000 * i + 501, record("ctgA", 1000 * i + 501)) for i in range(extra_a)]
    return ([line for _, line in sorted(ctg_a)]
            + [record("ctgB", 5_000_001 + 100 * i) for i in range(5)]
            + [record("ctgC", 16380, "A" * 10), record("ctgC", 20000), record("ctgC", 30000)])


def write(path, lines, kind: str | None, contigs=CONTIGS):
    """Write ``lines`` as ``path`` (a .vcf.gz, or a .bcf made from it) and, for ``kind`` 'tbi' or
    'csi', index it; kind None keeps whatever index is there (the stale cases)."""
    plain = path.with_name(path.name.split(".")[0] + ".txt")
    plain.write_text(header(contigs) + "".join(lines))
    gz = path.with_name(path.name.split(".")[0] + ".vcf.gz")
    pysam.tabix_compress(str(plain), str(gz), force=True)
    if path.suffix == ".bcf":
        pysam.bcftools.view("-Ob", "-o", str(path), str(gz), catch_stdout=False)
        if kind:
            pysam.bcftools.index("-f", str(path))
    elif kind:
        pysam.tabix_index(str(path), preset="vcf", force=True, csi=kind == "csi")
    return str(path)


def plain_counts(text: str) -> dict[str, int]:
    """Records per contig of VCF text, by reading its lines."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            counts[line.split("\t")[0]] = counts.get(line.split("\t")[0], 0) + 1
    return counts


def refusal(path: str, contigs=CONTIGS) -> str:
    with pytest.raises(InputError) as caught:
        check_vcf_index(path, contigs)
    message = str(caught.value)
    assert "\n" not in message
    return message


FILES = {"tbi": ("v.vcf.gz", "tbi"), "csi": ("v.vcf.gz", "csi"), "bcf": ("v.bcf", "csi")}


def test_bins_and_their_ranges_by_hand():
    """Level l starts at bin (8^l - 1) / 7: 0, 1, 9, 73, 585, 4681 (then 37449 for depth 6); a bin
    at level l of depth d spans 2^(14 + 3 (d - l)) bp."""
    assert pseudo_bin(5) == 37450 and pseudo_bin(6) == 299594
    assert bin_range(0, 14, 5) == (0, 2**29)
    assert bin_range(1, 14, 5) == (0, 2**26)
    assert bin_range(8, 14, 5) == (7 * 2**26, 2**29)
    assert bin_range(585, 14, 5) == (0, 131072)
    assert bin_range(586, 14, 5) == (131072, 262144)
    assert bin_range(4681, 14, 5) == (0, 16384)
    assert bin_range(4986, 14, 5) == (305 * 16384, 306 * 16384)
    assert bin_range(37448, 14, 5) == (2**29 - 16384, 2**29)
    assert bin_range(4681, 14, 6) == (0, 131072)
    assert bin_range(37449, 14, 6) == (0, 16384)


@pytest.mark.parametrize("kind", FILES)
def test_fresh_indexes_pass_and_count_every_record(tmp_path, kind):
    name, index = FILES[kind]
    path = write(tmp_path / name, records(), index)
    check_vcf_index(path, CONTIGS)
    want = plain_counts((tmp_path / "v.txt").read_text())
    assert want == {"ctgA": 200, "ctgB": 5, "ctgC": 3}
    assert index_record_counts(path, CONTIGS) == want


@pytest.mark.parametrize("name", ["input.vcf.gz", "input.csi.vcf.gz", "input.bcf"])
def test_indexes_made_by_htslib_tools_pass(name):
    """The bundled GIAB files, indexed by tabix and bcftools (a BCF header of 195 contigs)."""
    text = (DATA / "grch38_chr1_giab_hg002" / "input.vcf").read_text()
    contigs = re.findall(r"^##contig=<ID=([^,>]+)", text, re.M)
    path = str(DATA / "grch38_chr1_giab_hg002" / name)
    check_vcf_index(path, contigs)
    counts = index_record_counts(path, contigs)
    assert {c: n for c, n in counts.items() if n} == plain_counts(text) == {"chr1": 100}


def test_the_bug_report_stale_tbi_is_refused():
    path = str(BUG_REPORT / "in.vcf.gz")
    # The report's premise: the text has 10 ctgA records, a query through the index finds 3.
    assert plain_counts(gzip.decompress(open(path, "rb").read()).decode()) == {"ctgA": 10}
    assert len(list(pysam.TabixFile(path).fetch("ctgA"))) == 3
    message = refusal(path, ["ctgA", "ctgB"])
    assert f"{path}.tbi does not match {path}" in message
    assert f"`tabix -f -p vcf {path}`" in message


@pytest.mark.parametrize("change", [{"skip_a": 20}, {"extra_a": 20}], ids=["removed", "added"])
@pytest.mark.parametrize("kind", ["csi", "bcf"])
def test_stale_csi_is_refused(tmp_path, kind, change):
    name, index = FILES[kind]
    path = write(tmp_path / name, records(), index)
    before = open(path + ".csi", "rb").read()
    write(tmp_path / name, records(**change), None)
    assert open(path + ".csi", "rb").read() == before
    message = refusal(path)
    assert f"{path}.csi does not match {path}" in message
    assert f"`enformer-score index {path}` (or `bcftools index -f {path}`)" in message


def test_a_comment_line_between_contigs_is_no_mismatch(tmp_path):
    """tabix skips '#' lines in the data: the chunk of ctgA ends, and that of ctgB begins, at one."""
    lines = records()
    lines.insert(200, "# ctgB follows\n")
    assert lines[199].startswith("ctgA") and lines[201].startswith("ctgB")
    path = write(tmp_path / "v.vcf.gz", lines, "tbi")
    check_vcf_index(path, CONTIGS)
    assert index_record_counts(path, CONTIGS) == {"ctgA": 200, "ctgB": 5, "ctgC": 3}


def test_records_appended_to_a_contig_after_indexing_are_refused(tmp_path):
    """`cat more.vcf.gz >> v.vcf.gz` (BGZF members concatenate): nothing the index points at moves,
    but two ctgC records now follow the last one it knows, and a query misses them."""
    path = write(tmp_path / "v.vcf.gz", records(), "tbi")
    check_vcf_index(path, CONTIGS)
    (tmp_path / "more.txt").write_text(record("ctgC", 40000) + record("ctgC", 50000))
    pysam.tabix_compress(str(tmp_path / "more.txt"), str(tmp_path / "more.gz"))
    with open(path, "ab") as handle:
        handle.write((tmp_path / "more.gz").read_bytes())
    assert plain_counts(gzip.decompress(open(path, "rb").read()).decode())["ctgC"] == 5
    assert len(list(pysam.TabixFile(path).fetch("ctgC"))) == 3
    assert "contig 'ctgC': a record of this contig follows its last indexed one" in refusal(path)


def edit_index(path: str, old: bytes, new: bytes) -> None:
    """Replace the one ``old`` in the decompressed index (written back as plain gzip: it reads the same)."""
    data = gzip.decompress(open(path, "rb").read())
    assert data.count(old) == 1
    with open(path, "wb") as handle:
        handle.write(gzip.compress(data.replace(old, new)))


@pytest.mark.parametrize("bin_number, problem", [
    (4987, "has POS 5000001, outside its bin 4987 (5013505-5029888)"),
    (37449, "bin 37449 is beyond the last bin of depth 5"),
])
def test_an_index_listing_a_record_in_the_wrong_bin_is_refused(tmp_path, bin_number, problem):
    """ctgB's first record has POS 5,000,001: 0-based 5,000,000 lies in the 306th 16-kb bin,
    4681 + 305 = 4986 (one chunk); relabelled 4987 it falls outside [5,013,504, 5,029,888). The
    level-5 bins end at 37448 (37449 = (8^6 - 1) / 7 would start a sixth level)."""
    path = write(tmp_path / "v.vcf.gz", records(), "tbi")
    edit_index(path + ".tbi", struct.pack("<Ii", 4986, 1), struct.pack("<Ii", bin_number, 1))
    message = refusal(path)
    assert message.startswith(f"the index {path}.tbi does not match") and "contig 'ctgB': " in message
    assert problem in message


def test_a_chunk_starting_inside_a_line_is_refused(tmp_path):
    """The first record's ID and REF read like CHROM and POS, so only its position inside the line
    (not after a newline) shows that the moved chunk begin starts no record."""
    lines = ["ctgA\t1001\tctgA\t1001\tG\t50\tPASS\t.\n", "ctgA\t2001\t.\tA\tG\t50\tPASS\t.\n"]
    path = write(tmp_path / "v.vcf.gz", lines, "tbi")
    check_vcf_index(path, CONTIGS)
    first = len(header().encode())  # bin 4681 (POS < 16,384) holds both records, one chunk from here
    moved = first + len("ctgA\t1001\t")
    edit_index(path + ".tbi", struct.pack("<IiQ", 4681, 1, first), struct.pack("<IiQ", 4681, 1, moved))
    assert f"contig 'ctgA': no VCF record starts at 0:{moved}" in refusal(path)


def test_a_chunk_begin_past_its_block_is_refused(tmp_path):
    """bgzip fills blocks with 65,280 (0xff00) bytes, so ctgA's first block is full; a chunk may not
    begin at its end (an end may: that is the next block's start)."""
    path = write(tmp_path / "v.vcf.gz", records(), "tbi")
    bin_4681 = struct.pack("<IiQ", 4681, 1, len(header().encode()))  # then the chunk's end
    data = gzip.decompress(open(path + ".tbi", "rb").read())
    chunk = data[data.index(bin_4681):data.index(bin_4681) + 24]
    edit_index(path + ".tbi", chunk, struct.pack("<IiQQ", 4681, 1, 65280, 65535))
    assert "contig 'ctgA': virtual offset 0:65280 lies past the 65280 bytes of its block" in refusal(path)


def test_an_index_naming_the_wrong_contig_is_refused(tmp_path):
    path = write(tmp_path / "v.vcf.gz", records(), "tbi")
    edit_index(path + ".tbi", b"ctgA\0ctgB\0", b"ctgB\0ctgA\0")
    assert "contig 'ctgB': its first indexed record, at 0:" in refusal(path)
    assert "is on contig 'ctgA'" in refusal(path)


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "empty", "wrong magic"])
@pytest.mark.parametrize("suffix", [".tbi", ".csi"])
def test_an_unreadable_index_is_an_input_error(tmp_path, suffix, damage):
    path = write(tmp_path / "v.vcf.gz", records(), suffix[1:])
    data = gzip.decompress(open(path + suffix, "rb").read())
    damaged = {"truncated": gzip.compress(data[:60]), "not gzip": b"this is no index",
               "empty": b"", "wrong magic": gzip.compress(b"BAI\1" + data[4:])}[damage]
    with open(path + suffix, "wb") as handle:
        handle.write(damaged)
    tool = f"tabix -f -p vcf {path}" if suffix == ".tbi" else f"bcftools index -f {path}"
    rebuild = f"`enformer-score index {path}` (or `{tool}`)"
    message = refusal(path)
    assert f"the index {path}{suffix} is unreadable" in message and rebuild in message
    with pytest.raises(InputError, match="unreadable VCF index"):
        index_record_counts(path, CONTIGS)


def test_a_stale_csi_beside_a_fresh_tbi_is_refused(tmp_path):
    """index_record_counts reads the .csi first, so a stale one misleads --shard even when htslib
    queries through the .tbi."""
    path = write(tmp_path / "v.vcf.gz", records(), "csi")
    write(tmp_path / "v.vcf.gz", records(skip_a=20), "tbi")
    assert f"{path}.csi does not match" in refusal(path)


def test_the_verdict_is_kept_until_either_file_changes(tmp_path):
    path = write(tmp_path / "v.vcf.gz", records(), "tbi")
    check_vcf_index(path, CONTIGS)
    stat = os.stat(path)
    # Same size and modification time: the cached verdict stands (the check runs per query).
    data = bytearray(open(path, "rb").read())
    data[30:40] = bytes(10)
    with open(path, "wb") as handle:
        handle.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    check_vcf_index(path, CONTIGS)
    # A rewrite changes them, and the index is checked again.
    write(tmp_path / "v.vcf.gz", records(skip_a=20), None)
    assert "does not match" in refusal(path)


def test_thousands_of_contigs_are_checked_well_within_a_second(tmp_path):
    contigs = [f"c{i}" for i in range(3000)]
    lines = [f"{name}\t{pos}\t.\tA\tG\t50\tPASS\t.\n" for name in contigs for pos in (100, 90000)]
    path = write(tmp_path / "v.vcf.gz", lines, "tbi", contigs)
    start = time.perf_counter()
    check_vcf_index(path, contigs)
    assert time.perf_counter() - start < 1.0
    assert index_record_counts(path, contigs) == dict.fromkeys(contigs, 2)
