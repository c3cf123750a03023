"""Genome: plain and BGZF FASTA reads against plain string slicing, index building (by htslib) and errors.

Expected sequences come from reading the FASTA with ``open()`` into a dict and slicing strings; expected
indexes are written down by hand or produced by the test's own BGZF writer.
"""
import errno
import gzip
import hashlib
import pickle
import random
import re
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pysam
import pytest
from helpers import DATA

from enformer_vep import genome as genome_module
from enformer_vep.errors import InputError
from enformer_vep.genome import Genome

GIAB = DATA / "grch38_chr1_giab_hg002"
CHR1_LENGTH = 860_893
# The standard 28-byte BGZF end-of-file marker (SAM/BAM spec §4.1.2).
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def read_fasta(path) -> dict:
    """name -> sequence as written (case kept), by plain line splitting."""
    with open(path, "rb") as f:
        return read_fasta_text(f.read().decode())


def read_fasta_text(text: str) -> dict:
    seqs, name = {}, None
    for line in text.splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            seqs[name] = ""
        elif name is not None:
            seqs[name] += line
    return seqs


def padded(seq: str, start: int, end: int) -> str:
    """seq[start:end] upper-cased, with N for every position outside the sequence."""
    lo, hi = max(start, 0), min(end, len(seq))
    if lo >= hi:
        return "N" * (end - start)
    return "N" * (lo - start) + seq[lo:hi].upper() + "N" * (end - hi)


def fetch_str(g: Genome, chrom: str, start: int, end: int) -> str:
    codes = g.fetch(chrom, start, end)
    assert codes.dtype == np.uint8 and codes.shape == (end - start,)
    return codes.tobytes().decode()


def bgzf_block(chunk: bytes, extra_subfield: bytes = b"") -> bytes:
    """One BGZF member: gzip header with FEXTRA holding the BC (block size - 1) subfield, raw deflate, CRC, ISIZE."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = compressor.compress(chunk) + compressor.flush()
    xlen = len(extra_subfield) + 6
    bsize = 12 + xlen + len(body) + 8
    header = (b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + struct.pack("<H", xlen) + extra_subfield
              + b"BC" + struct.pack("<HH", 2, bsize - 1))
    return header + body + struct.pack("<II", zlib.crc32(chunk), len(chunk))


def bgzip(data: bytes, block_size: int, extra_subfield: bytes = b"") -> tuple[bytes, bytes]:
    """(BGZF file bytes, matching .gzi bytes) with uncompressed blocks of ``block_size`` and the EOF block."""
    out, entries = bytearray(), []
    for u in range(0, len(data), block_size):
        if u:
            entries.append((len(out), u))
        out += bgzf_block(data[u:u + block_size], extra_subfield)
    out += BGZF_EOF
    gzi = struct.pack("<Q", len(entries)) + b"".join(struct.pack("<QQ", c, u) for c, u in entries)
    return bytes(out), gzi


def test_bgzf_writer_makes_the_standard_eof_block():
    assert bgzf_block(b"") == BGZF_EOF


def make_fasta(newline: str) -> tuple[str, str]:
    """(FASTA text, its .fai written by hand-following the format): contigs of different line widths,
    soft-masked runs, N runs, one contig with a short last line and one of 5 bases."""
    rng = random.Random(7)
    contigs = [("chrA", 1003, 7), ("chrB", 2600, 13), ("tiny", 5, 60), ("chrM", 4000, 50)]
    text, fai = "", ""
    for name, length, width in contigs:
        seq = "".join(rng.choice("ACGTACGTacgtN") for _ in range(length))
        header = f">{name} description words{newline}"
        offset = len(text) + len(header)
        lines = [seq[i:i + width] for i in range(0, length, width)]
        text += header + "".join(line + newline for line in lines)
        fai += f"{name}\t{length}\t{offset}\t{len(lines[0])}\t{len(lines[0]) + len(newline)}\n"
    return text, fai


@pytest.fixture(scope="module")
def chr1() -> str:
    return read_fasta(GIAB / "reference.fa")["1"]


def test_real_reference_random_fetches(chr1):
    g = Genome(GIAB / "reference.fa")
    assert g.contigs == {"1": CHR1_LENGTH} and len(chr1) == CHR1_LENGTH
    rng = random.Random(0)
    spans = [(0, 10), (9_990, 10_010), (-5, 5), (-400_000, -1), (CHR1_LENGTH - 3, CHR1_LENGTH + 3),
             (CHR1_LENGTH, CHR1_LENGTH + 10), (CHR1_LENGTH + 10**6, CHR1_LENGTH + 10**6 + 7), (5, 5),
             (-200_000, CHR1_LENGTH + 200_000)]
    for _ in range(300):
        start = rng.randint(-450_000, CHR1_LENGTH + 50_000)
        spans.append((start, start + rng.choice([1, 2, 59, 60, 61, 121, rng.randint(0, 393_216), 393_216])))
    for start, end in spans:
        assert fetch_str(g, "1", start, end) == padded(chr1, start, end), (start, end)
    assert fetch_str(g, "1", 0, 10_000) == "N" * 10_000  # the hg38 gap 1-10000
    assert fetch_str(g, "1", 10_000, 10_006) == chr1[10_000:10_006] != "NNNNNN"


def test_window_past_the_end_is_full_length_n_padded():
    g = Genome(GIAB / "reference.fa")
    codes = g.fetch("1", CHR1_LENGTH - 100, CHR1_LENGTH - 100 + 393_216)
    assert codes.shape == (393_216,) and (codes[100:] == ord("N")).all() and (codes[:100] != ord("N")).any()


def test_built_fai_equals_samtools_fai(tmp_path):
    shutil.copyfile(GIAB / "reference.fa", tmp_path / "reference.fa")
    g = Genome(tmp_path / "reference.fa")
    assert (tmp_path / "reference.fa.fai").read_bytes() == (GIAB / "reference.fa.fai").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference.fa", "reference.fa.fai"]  # no temporary left
    assert g.index_checksum() == hashlib.sha256((GIAB / "reference.fa.fai").read_bytes()).hexdigest()


@pytest.mark.parametrize("newline, fai", [
    ("\n", "a\t7\t3\t5\t6\nb\t3\t17\t3\t4\n"),
    ("\r\n", "a\t7\t4\t5\t7\nb\t3\t21\t3\t5\n"),
])
def test_built_fai_hand_derived(tmp_path, newline, fai):
    (tmp_path / "t.fa").write_bytes(newline.join([">a", "ACGTA", "CG", ">b x", "AAA", ""]).encode())
    g = Genome(tmp_path / "t.fa")
    assert (tmp_path / "t.fa.fai").read_text() == fai
    assert g.contigs == {"a": 7, "b": 3}
    assert fetch_str(g, "a", -1, 9) == "NACGTACGNN" and fetch_str(g, "b", 0, 3) == "AAA"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_hand_fasta_soft_masked_line_endings_widths(tmp_path, newline):
    text, fai = make_fasta(newline)
    path = tmp_path / "hand.fa"
    path.write_bytes(text.encode())
    seqs = read_fasta(path)
    g = Genome(path)
    assert (tmp_path / "hand.fa.fai").read_text() == fai
    assert g.contigs == {name: len(seq) for name, seq in seqs.items()}
    assert list(g.contigs) == ["chrA", "chrB", "tiny", "chrM"]
    assert any(c.islower() for c in seqs["chrA"])
    for name, seq in seqs.items():
        n = len(seq)
        for start in range(-3, n + 3, max(1, n // 40)):
            for end in {start, start + 1, start + 6, start + 7, start + 8, start + 50, n + 2}:
                if end >= start:
                    assert fetch_str(g, name, start, end) == padded(seq, start, end), (name, start, end)
    # A contig much shorter than a window.
    assert fetch_str(g, "tiny", -196_608, 196_608) == "N" * 196_608 + seqs["tiny"].upper() + "N" * 196_603


def test_bgzf_reads_like_plain_with_block_boundaries_inside_lines_and_fetches(tmp_path):
    text, fai = make_fasta("\n")
    data = text.encode()
    compressed, gzi = bgzip(data, 50)  # lines are 7, 13, 60 and 50 bases wide: boundaries fall inside them
    (tmp_path / "hand.fa.gz").write_bytes(compressed)
    (tmp_path / "hand.fa.gz.fai").write_text(fai)
    (tmp_path / "hand.fa.gz.gzi").write_bytes(gzi)
    seqs = read_fasta_text(text)
    g = Genome(tmp_path / "hand.fa.gz")
    assert g.contigs == {name: len(seq) for name, seq in seqs.items()}
    rng = random.Random(1)
    for _ in range(400):
        name = rng.choice(list(seqs))
        start = rng.randint(-20, len(seqs[name]) + 20)
        end = start + rng.randint(0, 300)
        assert fetch_str(g, name, start, end) == padded(seqs[name], start, end), (name, start, end)
    assert g.index_checksum() == hashlib.sha256(fai.encode() + gzi).hexdigest()


def test_bgzf_indexes_are_built(tmp_path):
    text, fai = make_fasta("\r\n")
    compressed, gzi = bgzip(text.encode(), 333)
    (tmp_path / "hand.fa.gz").write_bytes(compressed)
    g = Genome(tmp_path / "hand.fa.gz")
    assert (tmp_path / "hand.fa.gz.fai").read_text() == fai
    assert (tmp_path / "hand.fa.gz.gzi").read_bytes() == gzi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hand.fa.gz", "hand.fa.gz.fai", "hand.fa.gz.gzi"]
    seqs = read_fasta_text(text)
    for name, seq in seqs.items():
        assert fetch_str(g, name, -10, len(seq) + 10) == padded(seq, -10, len(seq) + 10)


def test_real_reference_bgzf(tmp_path, chr1):
    data = (GIAB / "reference.fa").read_bytes()
    compressed, gzi = bgzip(data, 0xff00)  # bgzip's own block size
    (tmp_path / "ref.fa.gz").write_bytes(compressed)
    g = Genome(tmp_path / "ref.fa.gz")
    assert (tmp_path / "ref.fa.gz.fai").read_bytes() == (GIAB / "reference.fa.fai").read_bytes()
    assert (tmp_path / "ref.fa.gz.gzi").read_bytes() == gzi
    rng = random.Random(2)
    for _ in range(60):
        start = rng.randint(-400_000, CHR1_LENGTH + 10_000)
        end = start + rng.choice([1, 61, 0xff00, 393_216])
        assert fetch_str(g, "1", start, end) == padded(chr1, start, end), (start, end)


@pytest.mark.parametrize("compressed", [False, True])
def test_pickle_reopens_the_file(tmp_path, compressed):
    text, _ = make_fasta("\n")
    (tmp_path / "hand.fa").write_text(text)
    if compressed:
        pysam.tabix_compress(str(tmp_path / "hand.fa"), str(tmp_path / "hand.fa.gz"))
    g = Genome(tmp_path / ("hand.fa.gz" if compressed else "hand.fa"))
    assert g.bgzf == compressed
    copy = pickle.loads(pickle.dumps(g))
    g.close()
    assert copy.contigs == g.contigs and copy.index_checksum() == g.index_checksum()
    assert fetch_str(copy, "chrB", -2, 100) == padded(read_fasta_text(text)["chrB"], -2, 100)


def test_unwritable_directory_gives_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "readonly"
    folder.mkdir()
    (folder / "t.fa").write_text(">a\nACGT\n")
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.touch()
            probe.unlink()
            writable = True
        except PermissionError:
            writable = False
        if writable:  # running as root: permissions do not stop writes, so refuse the write the way the OS would

            def refuse(path, *args):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))

            monkeypatch.setattr(genome_module, "atomic_path", refuse)
        with pytest.raises(InputError, match=r"t\.fa\.fai is missing and cannot be written \(Permission denied\)"
                                             r".*samtools faidx .*t\.fa"):
            Genome(folder / "t.fa")
        assert sorted(p.name for p in folder.iterdir()) == ["t.fa"]
    finally:
        folder.chmod(0o755)


def test_unwritable_gzi_gives_clear_error(tmp_path, monkeypatch):
    compressed, _ = bgzip(b">a\nACGT\n", 4)
    (tmp_path / "t.fa.gz").write_bytes(compressed)
    writable = genome_module.atomic_path

    def refuse_gzi(path, *args):  # the .fai could be written, the .gzi not
        if str(path).endswith(".gzi"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return writable(path, *args)

    monkeypatch.setattr(genome_module, "atomic_path", refuse_gzi)
    with pytest.raises(InputError, match=r"t\.fa\.gz\.gzi is missing and cannot be written \(Permission denied\)"
                                         r".*samtools faidx"):
        Genome(tmp_path / "t.fa.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.fa.gz"]  # neither index half-written


# htslib only prints where a sequence's lines differ; the message names the fault and the fix.
RAGGED = (r"htslib cannot index it \(its message above says where\); the usual cause is a sequence whose lines are "
          r"not all the same length .*: rewrap it, e.g. `seqkit seq -w 60`$")


@pytest.mark.parametrize("text, why", [
    (">a\nACGT\nAC\nACGT\n", RAGGED),  # a line after a shorter one
    (">a\nACGT\nACGTA\n", RAGGED),  # a line longer than the first
    (">a\nACGT\n\nACGT\n", RAGGED),  # a blank line inside a sequence
    (">a\nACGT\nACGT\r\nACGT\n", RAGGED),  # another line ending inside a sequence
    (">a\nAC\n>a\nAC\n", r"the '>' header at byte 6 repeats the sequence name 'a'; rename or remove one of the two "
                       r"sequences$"),
    (">a\nAC\n>b\nGG\n>e\n>b\nAC\n>c\nA\n", r"the '>' header at byte 15 repeats the sequence name 'b'"),  # after e
    (">\nAC\n", r"the sequence at byte 2 has a '>' header line without a name$"),
    (">a\nACGT\n>b desc\n\n", r"its last sequence 'b' is empty \(the file ends with its '>' header line\), which "
                             r"htslib cannot index; remove that line$"),
])
def test_malformed_fasta_is_not_indexed(tmp_path, text, why):
    (tmp_path / "bad.fa").write_text(text, newline="")
    with pytest.raises(InputError, match="^cannot index .*bad.fa: " + why):
        Genome(tmp_path / "bad.fa")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fa"]  # no index, no temporary left


def test_other_line_ending_on_the_last_line_is_read(tmp_path):
    # htslib indexes a sequence whose last line ends differently (the others set the layout), and reads it right.
    # By hand: a starts at 3 with 4 bases in 6-byte lines; b's header follows at 3 + 6 + 6 + 3 = 18, its bases at 21.
    (tmp_path / "t.fa").write_bytes(b">a\nACGT\r\nACGT\r\nAC\n>b\nGG\n")
    g = Genome(tmp_path / "t.fa")
    assert (tmp_path / "t.fa.fai").read_text() == "a\t10\t3\t4\t6\nb\t2\t21\t2\t3\n"
    assert fetch_str(g, "a", -1, 11) == "NACGTACGTACN" and fetch_str(Genome(tmp_path / "t.fa"), "b", 0, 2) == "GG"


def test_short_last_line_and_trailing_blank_lines_are_fine(tmp_path):
    (tmp_path / "t.fa").write_text(">a\nACGT\nAC\n\n\n>b\nGG\nG")
    g = Genome(tmp_path / "t.fa")
    assert g.contigs == {"a": 6, "b": 3}
    assert fetch_str(g, "a", 0, 7) == "ACGTACN" and fetch_str(g, "b", -1, 4) == "NGGGN"


def test_plain_gzip_is_refused(tmp_path):
    (tmp_path / "t.fa.gz").write_bytes(gzip.compress(b">a\nACGT\n"))
    with pytest.raises(InputError, match=r"not BGZF: `enformer-score index \S*` recompresses it with bgzip"):
        Genome(tmp_path / "t.fa.gz")
    # BGZF with another gzip subfield beside BC is valid, but htslib takes it for plain gzip and cannot seek in it.
    compressed, _ = bgzip(b">a\nACGT\n", 4, extra_subfield=b"XY\x02\x00hi")
    (tmp_path / "t.fa.gz").write_bytes(compressed)
    with pytest.raises(InputError, match=r"not BGZF: `enformer-score index \S*` recompresses it with bgzip"):
        Genome(tmp_path / "t.fa.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.fa.gz"]


def test_gzip_after_a_bgzf_block_is_refused(tmp_path):
    (tmp_path / "t.fa.gz").write_bytes(bgzf_block(b">a\nAC") + gzip.compress(b"GT\n"))
    with pytest.raises(InputError, match=r"not BGZF throughout \(no BGZF block at byte \d+\)"):
        Genome(tmp_path / "t.fa.gz")


def test_not_a_fasta(tmp_path):
    (tmp_path / "t.fa").write_bytes(b"BZh91AY&SY")
    with pytest.raises(InputError, match="not a FASTA file"):
        Genome(tmp_path / "t.fa")
    with pytest.raises(InputError, match="cannot read the FASTA .*missing.fa"):
        Genome(tmp_path / "missing.fa")


def test_unknown_contig(tmp_path):
    (tmp_path / "t.fa").write_text(">1\nACGT\n>2\nAC\n")
    g = Genome(tmp_path / "t.fa")
    with pytest.raises(InputError, match=r"contig 'chr1' is not in the FASTA .*t\.fa \(it has contigs 1, 2\)"):
        g.fetch("chr1", 0, 2)
    with pytest.raises(ValueError):
        g.fetch("1", 3, 2)


def test_index_checksum_follows_the_fai(tmp_path):
    (tmp_path / "t.fa").write_text(">a\nACGT\n>b\nAC\n")
    first = Genome(tmp_path / "t.fa").index_checksum()
    assert first == hashlib.sha256(b"a\t4\t3\t4\t5\nb\t2\t11\t2\t3\n").hexdigest()
    (tmp_path / "t.fa.fai").write_text("a\t4\t3\t4\t5\n")  # a valid index that leaves out b
    second = Genome(tmp_path / "t.fa")
    assert second.index_checksum() != first and second.contigs == {"a": 4}


def test_stale_index_is_detected(tmp_path):
    (tmp_path / "t.fa").write_text(">a\nACGTACGT\nACGT\n")
    Genome(tmp_path / "t.fa")
    (tmp_path / "t.fa").write_text(">a\nACGTACGT\n")
    with pytest.raises(InputError, match=r"t\.fa\.fai does not match .*contig 'a'"):
        Genome(tmp_path / "t.fa")
    (tmp_path / "t.fa").write_text(">a\nACGT\nACGT\nACGT\n")  # long enough, but another line width
    # The index says a 12 3 8 9: the last base at byte 3 + 9 + 3 = 15 is followed by a base, not a line end.
    with pytest.raises(InputError, match=r"t\.fa\.fai does not match the FASTA .*\(contig 'a' of 12 bases does not "
                                         r"end at byte 16\)"):
        Genome(tmp_path / "t.fa")
    # Rewrapped with both ends in place (bytes 3 and 15 are still its first and last bases): only a read across
    # the moved line end can tell; bytes 3-10 hold 7 bases and a line end.
    (tmp_path / "t.fa").write_text(">a\nACGTAC\nGTACGT\n")
    with pytest.raises(InputError, match=r"t\.fa\.fai does not match .*the bases of contig 'a' are not where it says"):
        Genome(tmp_path / "t.fa").fetch("a", 0, 8)


def test_malformed_indexes(tmp_path):
    (tmp_path / "t.fa").write_text(">a\nACGT\n")
    (tmp_path / "t.fa.fai").write_text("a\tfour\t3\t4\t5\n")
    with pytest.raises(InputError, match=r"malformed FASTA index .*t\.fa\.fai \(line 1\)"):
        Genome(tmp_path / "t.fa")
    (tmp_path / "t.fa.fai").write_text("")
    with pytest.raises(InputError, match=r"the FASTA index .*t\.fa\.fai is empty"):
        Genome(tmp_path / "t.fa")
    compressed, gzi = bgzip(b">a\nACGT\n", 4)
    (tmp_path / "t.fa.gz").write_bytes(compressed)
    (tmp_path / "t.fa.gz.gzi").write_bytes(gzi[:-1])
    with pytest.raises(InputError, match=r"malformed BGZF index .*t\.fa\.gz\.gzi"):
        Genome(tmp_path / "t.fa.gz")


def test_corrupt_bgzf_block(tmp_path):
    compressed, gzi = bgzip(b">a\n" + b"ACGT" * 100 + b"\n", 64)
    second = struct.unpack("<Q", gzi[8:16])[0]  # compressed offset of the second block
    damaged = bytearray(compressed)
    damaged[second + 18:second + 22] = b"\xff\xff\xff\xff"  # inside its deflate data
    (tmp_path / "t.fa.gz").write_bytes(bytes(damaged))
    (tmp_path / "t.fa.gz.gzi").write_bytes(gzi)
    (tmp_path / "t.fa.gz.fai").write_text("a\t400\t3\t400\t401\n")
    g = Genome(tmp_path / "t.fa.gz")
    assert fetch_str(g, "a", 0, 8) == "ACGTACGT"  # the first block is intact
    with pytest.raises(InputError, match=rf"t\.fa\.gz is corrupt: BGZF block at byte {second} cannot be inflated"):
        g.fetch("a", 0, 100)
    assert fetch_str(g, "a", 4, 12) == "ACGTACGT"  # other blocks are still read


def test_genome_blocks_serve_the_same_bases_from_one_read():
    from enformer_vep.genome import GenomeBlocks

    genome = Genome(DATA / "grch38_chr1_giab_hg002" / "reference.fa")
    blocks = GenomeBlocks(genome, block=500_000)
    reads = []
    original = genome.fetch
    genome.fetch = lambda *a: reads.append(a) or original(*a)
    for start, end in [(600_000, 600_100), (650_000, 1_043_216), (-5, 10), (860_000, 1_300_000), (1000, 1010)]:
        np.testing.assert_array_equal(blocks.fetch("1", start, end), original("1", start, end))
    assert len(reads) == 4  # the second request lies inside the first block
    assert not blocks.fetch("1", 0, 10).flags.writeable


# -- existing indexes are checked against the FASTA's content --------------------------------------------------

STALE_FAI_REPORT = DATA / "bug_reports" / "fasta_stale_fai_header_edit"


def refusal(path) -> str:
    """The message of the InputError that opening ``path`` raises; it must be one line."""
    with pytest.raises(InputError) as caught:
        Genome(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def stale_message(index: str, fasta: str, why: str) -> str:
    """A regex for the refusal of ``index`` next to ``fasta`` (file names, not paths) because of ``why`` (a regex)."""
    return (rf"^\S*/{re.escape(index)} does not match the FASTA \S*/{re.escape(fasta)} \({why}\): the FASTA changed "
            rf"after the index was made; rebuild it with `enformer-score index \S*/{re.escape(fasta)}` \(or "
            rf"`samtools faidx \S*/{re.escape(fasta)}`\), or delete \S*/{re.escape(index)} \(it is rebuilt "
            rf"automatically\)$")


def test_bug_report_header_edited_after_indexing_is_refused(tmp_path):
    for name in ("ref.fa", "ref.fa.fai"):
        shutil.copyfile(STALE_FAI_REPORT / name, tmp_path / name)
    # The report's index says ctgA starts at byte 6: right after a 5-byte '>ctgA' line, which the edit lengthened.
    assert (tmp_path / "ref.fa.fai").read_text() == "ctgA\t30000\t6\t60\t61\nctgB\t30000\t30512\t60\t61\n"
    message = refusal(tmp_path / "ref.fa")
    assert re.match(stale_message("ref.fa.fai", "ref.fa", r"contig 'ctgA' at byte 6 does not follow its '>ctgA' "
                                                          r"header line"), message), message
    # The same stale index beside the FASTA bgzip-compressed: offsets are read as uncompressed bytes.
    pysam.tabix_compress(str(tmp_path / "ref.fa"), str(tmp_path / "ref.fa.gz"))
    shutil.copyfile(STALE_FAI_REPORT / "ref.fa.fai", tmp_path / "ref.fa.gz.fai")
    message = refusal(tmp_path / "ref.fa.gz")
    assert re.match(stale_message("ref.fa.gz.fai", "ref.fa.gz", "contig 'ctgA' at byte 6 .*"), message), message
    # Deleting the index, as the message says, rebuilds it; the report's three variants then match their REF.
    (tmp_path / "ref.fa.fai").unlink()
    g = Genome(tmp_path / "ref.fa")
    header = (tmp_path / "ref.fa").read_bytes().split(b"\n", 1)[0]
    assert g._records["ctgA"][1] == len(header) + 1 == 77
    vcf = [line.split("\t") for line in (STALE_FAI_REPORT / "in.vcf").read_text().splitlines()
           if not line.startswith("#")]
    assert [(chrom, pos, ref) for chrom, pos, _, ref, *_ in vcf] == [("ctgA", "5000", "C"), ("ctgA", "15000", "T"),
                                                                      ("ctgA", "26000", "T")]
    for chrom, pos, _, ref, *_ in vcf:
        assert fetch_str(g, chrom, int(pos) - 1, int(pos)) == ref


def test_repeated_name_in_fai_is_refused(tmp_path):
    (tmp_path / "t.fa").write_text(">a\nAC\n>b\nGG\n")
    (tmp_path / "t.fa.fai").write_text("a\t2\t3\t2\t3\na\t2\t9\t2\t3\n")  # both entries fit the FASTA's layout
    message = refusal(tmp_path / "t.fa")
    assert re.match(stale_message("t.fa.fai", "t.fa", "line 2 repeats the name 'a'"), message), message


# samtools' index of ">a desc\nACGTACGT\nACG\n>b\nACGT\n" (hand-derived): b's header starts at 8 + 9 + 4 = 21.
SEQ_EDIT_FASTA = ">a desc\nACGTACGT\nACG\n>b\nACGT\n"
SEQ_EDIT_FAI = "a\t11\t8\t8\t9\nb\t4\t24\t4\t5\n"


@pytest.mark.parametrize("edited, why", [
    # b's last base is expected at byte 24 + 3 = 27, so its sequence must end at byte 28.
    (">a desc\nACGTACGT\nACG\n>b\nACGTA\n", "contig 'b' of 4 bases does not end at byte 28"),  # a base more
    (">a desc\nACGTACGT\nACG\n>b\nACGT\nAC\n", "contig 'b' of 4 bases does not end at byte 28"),  # a line more
    (">a desc\nACGTACGT\nACG\n>b\nACG\n", "contig 'b' of 4 bases does not end at byte 28"),  # a base fewer
    (">a desc\nACGTACGT\nACG\n>b\nAC", "contig 'b' of 4 bases ends at byte 28, past the end of the file"),
    # a's last base is expected at byte 8 + 9 + 2 = 19, so its sequence must end at byte 20.
    (">a desc\nACGTACGT\nACGT\n>b\nACGT\n", "contig 'a' of 11 bases does not end at byte 20"),
    (">a desc\nACGTACGT\nAC\n>b\nACGT\n", "contig 'a' of 11 bases does not end at byte 20"),
    (">a desc\nACGTACGT\nACG\nACGTACGT\n>b\nACGT\n", "contig 'a' of 11 bases does not end at byte 20"),
    (">a desc\nACGTACGT\nACG\n\n\n>b\nACGT\n", "contig 'b' at byte 24 does not follow its '>b' header line"),
    (">b\nACGT\n>a desc\nACGTACGT\nACG\n", "contig 'a' at byte 8 does not follow its '>a' header line"),
    (">ax esc\nACGTACGT\nACG\n>b\nACGT\n", "contig 'a' at byte 8 does not follow its '>a' header line"),  # renamed
])
def test_sequence_edited_after_indexing_is_refused(tmp_path, edited, why):
    path = tmp_path / "t.fa"
    path.write_text(SEQ_EDIT_FASTA)
    pysam.faidx(str(path))
    assert (tmp_path / "t.fa.fai").read_text() == SEQ_EDIT_FAI
    assert fetch_str(Genome(path), "a", 0, 11) == "ACGTACGTACG"
    path.write_text(edited)
    message = refusal(path)
    assert re.match(stale_message("t.fa.fai", "t.fa", why), message), message


@pytest.mark.parametrize("text", [
    ">a desc\nACGTACGT\nACG\n\n\n>b\nACGT\n\n",  # blank lines after a sequence
    ">a desc\nACGTACGT\nACG\n>b\nACGT",  # no line end after the last base
    ">a desc\r\nACGTACGT\r\nACG\r\n>b\r\nACGT\r\n",
    ">a desc\nACGTACGT\nACG\n>empty x\n\n>e2\n>b\nACGT\n",  # empty sequences (not indexed by htslib)
    "> a desc\nACGTACGT  \nACG \n>b\tx\nACGT\t\n",  # blanks after '>' and after bases (not counted by htslib)
])
def test_existing_index_that_fits_is_accepted(tmp_path, text):
    path = tmp_path / "t.fa"
    path.write_bytes(text.encode())
    built = Genome(path)  # htslib's index, checked when opened again
    fai = (tmp_path / "t.fa.fai").read_bytes()
    again = Genome(path)
    assert (tmp_path / "t.fa.fai").read_bytes() == fai and again.contigs == built.contigs
    assert fetch_str(again, "a", 0, 11) == "ACGTACGTACG" and fetch_str(again, "b", 0, 4) == "ACGT"


def bgzf_fasta(tmp_path, name: str, text: bytes) -> str:
    """``text`` bgzip-compressed by htslib into ``tmp_path/name`` and indexed by samtools (.fai and .gzi)."""
    (tmp_path / "plain.fa").write_bytes(text)
    path = str(tmp_path / name)
    pysam.tabix_compress(str(tmp_path / "plain.fa"), path, force=True)
    pysam.faidx(path)
    return path


def long_fasta(seed: int, length: int = 200_000) -> bytes:
    rng = random.Random(seed)
    seq = "".join(rng.choice("ACGT") for _ in range(length))
    return (">s\n" + "".join(seq[i:i + 60] + "\n" for i in range(0, length, 60))).encode()


def gzi_entries(gzi: bytes) -> list[tuple[int, int]]:
    """(compressed, uncompressed) offsets listed in a .gzi (htslib's layout: a count, then little-endian pairs)."""
    count = struct.unpack_from("<Q", gzi)[0]
    assert len(gzi) == 8 + 16 * count
    return [struct.unpack_from("<QQ", gzi, 8 + 16 * k) for k in range(count)]


def gzi_of(entries) -> bytes:
    return struct.pack("<Q", len(entries)) + b"".join(struct.pack("<QQ", c, u) for c, u in entries)


def test_stale_gzi_is_refused(tmp_path):
    data = long_fasta(3)
    path = bgzf_fasta(tmp_path, "t.fa.gz", data)
    samtools_gzi = (tmp_path / "t.fa.gz.gzi").read_bytes()
    htslib_blocks = gzi_entries(samtools_gzi)
    assert [u for _, u in htslib_blocks] == [0xff00, 2 * 0xff00, 3 * 0xff00]  # htslib's block size
    bases = data[3:].replace(b"\n", b"").decode()
    assert fetch_str(Genome(path), "s", 130_000, 130_600) == bases[130_000:130_600]

    # The same FASTA recompressed with another block layout: the .fai still fits, the .gzi does not.
    compressed, own_gzi = bgzip(data, 50_000)
    own_blocks = gzi_entries(own_gzi)
    assert htslib_blocks[0][0] not in {c for c, _ in own_blocks}
    (tmp_path / "t.fa.gz").write_bytes(compressed)
    message = refusal(path)
    assert re.match(stale_message("t.fa.gz.gzi", "t.fa.gz", f"it lists byte {htslib_blocks[0][0]}, where no "
                                                             f"BGZF block starts"), message), message
    (tmp_path / "t.fa.gz.gzi").write_bytes(own_gzi)
    assert fetch_str(Genome(path), "s", 130_000, 130_600) == bases[130_000:130_600]

    # A right block start with a wrong uncompressed offset: the blocks before it hold 2 x 50,000 bytes.
    assert own_blocks[1][1] == 100_000
    (tmp_path / "t.fa.gz.gzi").write_bytes(gzi_of([(own_blocks[1][0], 100_001)]))
    message = refusal(path)
    assert re.match(stale_message("t.fa.gz.gzi", "t.fa.gz", f"the block at byte {own_blocks[1][0]} holds "
                                                             f"uncompressed byte 100000, not 100001"), message), message

    # The .gzi of another FASTA of the same length: the same uncompressed layout, other compressed sizes.
    other = bgzf_fasta(tmp_path, "u.fa.gz", long_fasta(4))
    assert (tmp_path / "u.fa.gz.fai").read_bytes() == (tmp_path / "t.fa.gz.fai").read_bytes()
    other_blocks = gzi_entries((tmp_path / "u.fa.gz.gzi").read_bytes())
    assert htslib_blocks[0][0] not in {c for c, _ in other_blocks}
    (tmp_path / "u.fa.gz.gzi").write_bytes(samtools_gzi)
    message = refusal(other)
    assert re.match(stale_message("u.fa.gz.gzi", "u.fa.gz", f"it lists byte {htslib_blocks[0][0]}, where no "
                                                             f"BGZF block starts"), message), message

    # The FASTA cut short and recompressed by htslib: its first block is unchanged, the second ends earlier.
    short = bgzf_fasta(tmp_path, "v.fa.gz", data[:120_000])
    assert gzi_entries((tmp_path / "v.fa.gz.gzi").read_bytes()) == htslib_blocks[:1]
    assert htslib_blocks[1][0] >= (tmp_path / "v.fa.gz").stat().st_size
    (tmp_path / "v.fa.gz.gzi").write_bytes(samtools_gzi)
    message = refusal(short)
    assert re.match(stale_message("v.fa.gz.gzi", "v.fa.gz", f"it lists byte {htslib_blocks[1][0]}, past the end "
                                                             f"of the file"), message), message


def described_fasta(newline: str, final_newline: bool) -> tuple[bytes, dict]:
    """(FASTA bytes, name -> sequence): long description headers (one of 150,000 bytes, longer than a BGZF block),
    several line widths, soft-masked bases, a blank line between records."""
    rng = random.Random(11)
    seqs, text = {}, ""
    for name, length, width, description in [("chr1", 70_000, 60, "Homo sapiens chromosome 1 " + "x" * 300),
                                             ("chrUn_KI270302v1", 2_001, 70, "AC:KI270302.1 " + "y" * 150_000),
                                             ("chrM", 16_569, 80, "\tmitochondrion LN:16569"),
                                             ("HLA-A*01:01:01:01", 3_503, 60, "HLA00001 3503 bp")]:
        seqs[name] = "".join(rng.choice("ACGTacgtN") for _ in range(length))
        text += f">{name} {description}{newline}"
        text += "".join(seqs[name][i:i + width] + newline for i in range(0, length, width))
        text += newline if name == "chrUn_KI270302v1" else ""
    return (text if final_newline else text[:-len(newline)]).encode(), seqs


@pytest.mark.parametrize("newline, final_newline", [("\n", True), ("\r\n", True), ("\r\n", False)])
@pytest.mark.parametrize("compressed", [False, True])
def test_fresh_samtools_indexes_are_accepted(tmp_path, newline, final_newline, compressed):
    data, seqs = described_fasta(newline, final_newline)
    if compressed:
        path = bgzf_fasta(tmp_path, "ref.fa.gz", data)
    else:
        path = str(tmp_path / "ref.fa")
        (tmp_path / "ref.fa").write_bytes(data)
        pysam.faidx(path)
    indexes = {p.name: p.read_bytes() for p in tmp_path.glob("ref.fa*.[fg]*i")}
    assert sorted(indexes) == (["ref.fa.gz.fai", "ref.fa.gz.gzi"] if compressed else ["ref.fa.fai"])
    g = Genome(path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ref.fa*.[fg]*i")} == indexes  # used, not rebuilt
    assert g.contigs == {name: len(seq) for name, seq in seqs.items()}
    rng = random.Random(5)
    for name, seq in seqs.items():
        assert fetch_str(g, name, -3, len(seq) + 3) == padded(seq, -3, len(seq) + 3)
        for _ in range(20):
            start = rng.randint(0, len(seq))
            assert fetch_str(g, name, start, start + 700) == padded(seq, start, start + 700)


def test_truncated_deflate_data_is_corrupt(tmp_path):
    # A block whose deflate stream stops short of its ISIZE: htslib's inflating fails; the message names the block.
    block = bgzf_block(b">a\n" + b"ACGT" * 100 + b"\n")
    body_end = len(block) - 8
    header = bytearray(block[:18])
    header[16:18] = struct.pack("<H", len(block) - 20 - 1)  # BSIZE - 1 of the block cut by 20 deflate bytes
    (tmp_path / "t.fa.gz").write_bytes(bytes(header) + block[18:body_end - 20] + block[body_end:] + BGZF_EOF)
    (tmp_path / "t.fa.gz.fai").write_text("a\t400\t3\t400\t401\n")
    (tmp_path / "t.fa.gz.gzi").write_bytes(struct.pack("<Q", 0))
    with pytest.raises(InputError, match=r"t\.fa\.gz is corrupt: BGZF block at byte 0 cannot be inflated"):
        Genome(tmp_path / "t.fa.gz")  # the first check reads the first byte


def test_index_listing_empty_sequences_is_accepted(tmp_path):
    # Our own builder (before htslib built the indexes) listed empty sequences, which htslib leaves out; offsets by
    # hand: a after the 8-byte header, 'empty' after 8 + 9 + 4 + 9, b 3 bytes later, e2 after b's 5-byte line.
    (tmp_path / "t.fa").write_text(">a desc\nACGTACGT\nACG\n>empty x\n>b\nACGT\n>e2\n")
    (tmp_path / "t.fa.fai").write_text("a\t11\t8\t8\t9\nempty\t0\t30\t0\t0\nb\t4\t33\t4\t5\ne2\t0\t42\t0\t0\n")
    g = Genome(tmp_path / "t.fa")
    assert g.contigs == {"a": 11, "empty": 0, "b": 4, "e2": 0}
    assert fetch_str(g, "empty", -1, 2) == "NNN" and fetch_str(g, "b", -1, 5) == "NACGTN"


def test_bytes_other_than_letters_are_kept(tmp_path):
    # Under an index that counts every byte of a line as a base (as our own builder did): a byte that is not UTF-8
    # (pysam decodes the bases as UTF-8) and the two bytes of a UTF-8 'é' come back unchanged, letters upper-cased.
    (tmp_path / "t.fa").write_bytes(b">a\nAc\xe9g\nt\xc3\xa9*\n")
    (tmp_path / "t.fa.fai").write_text("a\t8\t3\t4\t5\n")
    g = Genome(tmp_path / "t.fa")
    assert g.fetch("a", -1, 9).tobytes() == b"NAC\xe9GT\xc3\xa9*N"
    assert g.fetch("a", 4, 8).tobytes() == b"T\xc3\xa9*"


def test_missing_gzi_is_built_and_the_existing_fai_still_checked(tmp_path):
    path = bgzf_fasta(tmp_path, "t.fa.gz", b">a\nACGTACGT\nACGT\n")
    (tmp_path / "t.fa.gz.gzi").unlink()
    (tmp_path / "t.fa.gz.fai").write_text("a\t12\t3\t4\t5\n")  # another line width: a's last base would be at 16
    message = refusal(path)
    assert re.match(stale_message("t.fa.gz.fai", "t.fa.gz", "contig 'a' of 12 bases does not end at byte 17"),
                    message), message
    assert gzi_entries((tmp_path / "t.fa.gz.gzi").read_bytes()) == []  # htslib's: one data block, none listed


@pytest.mark.parametrize("compressed", [False, True])
def test_one_genome_serves_several_threads(tmp_path, compressed):
    data = long_fasta(6)
    if compressed:
        path = bgzf_fasta(tmp_path, "t.fa.gz", data)
    else:
        path = tmp_path / "t.fa"
        path.write_bytes(data)
    seq = data[3:].replace(b"\n", b"").decode()
    g = Genome(path)
    rng = random.Random(8)
    spans = [(start, start + rng.randint(0, 5_000)) for start in (rng.randint(-100, len(seq)) for _ in range(300))]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda span: fetch_str(g, "s", *span), spans))
    assert got == [padded(seq, *span) for span in spans]


def test_fasta_cut_short_after_opening(tmp_path):
    data = long_fasta(9)
    (tmp_path / "t.fa").write_bytes(data)
    g = Genome(tmp_path / "t.fa")
    with open(tmp_path / "t.fa", "r+b") as f:
        f.truncate(100_000)  # 60 bases per 61 bytes: base 150,000 was at byte 152,503
    with pytest.raises(InputError, match=r"t\.fa\.fai does not match .*\(contig 's' is cut short\)"):
        g.fetch("s", 150_000, 150_010)
    assert fetch_str(g, "s", 0, 120) == data[3:3 + 122].replace(b"\n", b"").decode()  # what is left is still read
    g.close()
    with pytest.raises(ValueError, match="closed"):
        g.fetch("s", 0, 10)
