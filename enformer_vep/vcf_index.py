"""The ``.tbi``/``.csi`` index beside a VCF.gz or BCF: what it says, and whether it still fits the data.

:func:`read_index` parses either index kind into per-contig bins and chunks; :func:`index_record_counts`
gives the records per contig from its statistics (for ``--shard``); :func:`check_vcf_index` refuses
an index that no longer matches its data file (an old index beside a rewritten VCF makes htslib
return only some records for region queries, silently). File times cannot tell a stale index
(a copy or ``git checkout`` makes it no older than the data), so the check reads the content.

Layouts: "The Tabix index file format" and "CSIv1" in samtools/hts-specs (tabix.pdf, CSIv1.pdf);
BGZF blocks and virtual offsets in SAMv1 section 4.1; BCF records in VCFv4.3 section 6.3.
"""
from __future__ import annotations

import dataclasses
import gzip
import mmap
import os
import struct
import zlib

from .errors import InputError

#: min_shift and depth of every ``.tbi`` (fixed by the tabix format; a CSI stores its own).
TBI_MIN_SHIFT, TBI_DEPTH = 14, 5

_BGZF_MAGIC = b"\x1f\x8b\x08\x04"  # gzip ID1 ID2, CM = deflate, FLG = FEXTRA
_BGZF_HEADER = 12  # gzip fixed header up to and including XLEN
_BGZF_FOOTER = 8  # CRC32 and ISIZE
_MAX_FIELDS = 1 << 16  # bytes scanned for a record's CHROM and POS before calling it malformed
# What a damaged or truncated index raises while it is read.
_UNREADABLE = (OSError, EOFError, zlib.error, struct.error, UnicodeDecodeError, ValueError)


@dataclasses.dataclass(frozen=True)
class IndexedContig:
    """One reference sequence of an index. ``bins``: bin number -> chunks as (begin, end) BGZF
    virtual offsets, pseudo-bin excluded; ``mapped``: the records counted in the pseudo-bin
    (0 for a contig without bins, None when the index has bins but no statistics)."""

    name: str
    bins: dict[int, tuple[tuple[int, int], ...]]
    mapped: int | None


@dataclasses.dataclass(frozen=True)
class VcfIndex:
    """A parsed ``.tbi`` or ``.csi``: its binning scheme and its contigs in index order."""

    min_shift: int
    depth: int
    contigs: tuple[IndexedContig, ...]


def pseudo_bin(depth: int) -> int:
    """The bin number one past the last real bin, ((1 << 3 (depth + 1)) - 1) / 7 + 1 (CSIv1)."""
    return ((1 << ((depth + 1) * 3)) - 1) // 7 + 1


def bin_range(bin_number: int, min_shift: int, depth: int) -> tuple[int, int]:
    """The 0-based half-open genomic range [start, end) of a bin (CSIv1 reg2bin, inverted): level l
    holds the bins from ((1 << 3l) - 1) / 7 on, each 1 << (min_shift + 3 (depth - l)) wide."""
    level = depth
    while ((1 << (3 * level)) - 1) // 7 > bin_number:
        level -= 1
    width = 1 << (min_shift + 3 * (depth - level))
    start = (bin_number - ((1 << (3 * level)) - 1) // 7) * width
    return start, start + width


def read_index(index_path: str, header_contigs: list[str]) -> VcfIndex:
    """Parse a ``.tbi`` or ``.csi`` (either kind, by its magic). A CSI of a VCF.gz names its
    contigs in a tabix aux block; a CSI of a BCF has none and numbers them in header order,
    so ``header_contigs`` name them. Raises :class:`InputError` for anything unreadable."""
    try:
        return _read_index(index_path, header_contigs)
    except _UNREADABLE as error:
        raise InputError(f"unreadable VCF index {index_path}: {error}") from None


def index_record_counts(path: str, header_contigs: list[str]) -> dict[str, int] | None:
    """Records per contig from the ``.tbi`` or ``.csi`` index beside ``path`` (its per-contig
    statistics), in index order; None when there is no index or it lacks the statistics.
    ``header_contigs`` name a BCF's contigs (its CSI index numbers them in header order)."""
    for suffix in (".csi", ".tbi"):
        if os.path.exists(path + suffix):
            index = read_index(path + suffix, header_contigs)
            if any(contig.mapped is None for contig in index.contigs):
                return None
            return {contig.name: contig.mapped for contig in index.contigs}
    return None


def _read_index(index_path: str, header_contigs: list[str]) -> VcfIndex:
    with open(index_path, "rb") as handle:
        data = gzip.decompress(handle.read())  # an index is BGZF-compressed: gzip members
    return _parse(data, header_contigs)


class _Reader:
    """Little-endian fields read one after another from a decompressed index."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def count(self) -> int:
        """An int32 count; a negative one means the index is damaged."""
        n = self.take("i")
        if n < 0:
            raise ValueError(f"negative count {n} at byte {self.at - 4}")
        return n

    def skip(self, n: int) -> None:
        self.at += n


def _names(reader: _Reader) -> list[str]:
    """The tabix header (format, col_seq, col_beg, col_end, meta, skip) and its NUL-separated
    contig names."""
    reader.skip(6 * 4)
    length = reader.count()
    blob = reader.data[reader.at:reader.at + length]
    reader.skip(length)
    return [name.decode() for name in blob.split(b"\0")[:-1]]


def _parse(data: bytes, header_contigs: list[str]) -> VcfIndex:
    reader = _Reader(data)
    magic = data[:4]
    if magic == b"TBI\1":
        reader.skip(4)
        n_ref = reader.count()
        names = _names(reader)
        min_shift, depth = TBI_MIN_SHIFT, TBI_DEPTH
    elif magic == b"CSI\1":
        min_shift, depth, l_aux = reader.take("4xiii")
        # the widest bin, 1 << (min_shift + 3 depth), must fit 64-bit positions
        if not (min_shift > 0 and depth >= 0 and min_shift + 3 * depth < 64 and l_aux >= 0):
            raise ValueError(f"implausible CSI header: min_shift {min_shift}, depth {depth}, l_aux {l_aux}")
        names = _names(_Reader(data[reader.at:reader.at + l_aux])) if l_aux else header_contigs
        reader.skip(l_aux)
        n_ref = reader.count()
    else:
        raise ValueError(f"not a tabix or CSI index (magic {magic!r})")
    if n_ref > len(names):
        raise ValueError(f"{n_ref} contigs indexed but {len(names)} named")
    pseudo = pseudo_bin(depth)
    contigs = []
    for tid in range(n_ref):
        n_bin = reader.count()
        bins, mapped = {}, None if n_bin else 0
        for _ in range(n_bin):
            bin_number = reader.take("I")
            if magic == b"CSI\1":
                reader.skip(8)  # loffset: the CSI stand-in for the linear index
            n_chunk = reader.count()
            offsets = struct.unpack_from(f"<{2 * n_chunk}Q", data, reader.at)
            reader.skip(16 * n_chunk)
            if bin_number == pseudo and n_chunk == 2:
                mapped = offsets[2]  # chunks (ref_beg, ref_end), (n_mapped, n_unmapped)
            else:
                bins[bin_number] = tuple(zip(offsets[0::2], offsets[1::2], strict=True))
        if magic == b"TBI\1":
            reader.skip(8 * reader.count())  # linear index
        contigs.append(IndexedContig(names[tid], bins, mapped))
    return VcfIndex(min_shift, depth, tuple(contigs))


# Verdicts of check_vcf_index by (data path, size, mtime_ns, index path, size, mtime_ns): the error
# message, or None for an index that fits. The check runs before every region query.
_VERDICTS: dict[tuple, str | None] = {}


def check_vcf_index(path: str, header_contigs: list[str]) -> None:
    """Raise :class:`InputError` (one line, with the command that rebuilds it) when a ``.tbi`` or
    ``.csi`` beside ``path`` is unreadable or no longer matches the data. Both are checked when
    both exist (:func:`index_record_counts` reads the ``.csi`` first, htslib the ``.tbi`` of a VCF.gz).

    Cheap content checks, per contig of the index, reading only the BGZF blocks they need:

    * every chunk's begin and end virtual offset points at the start of a BGZF block inside the
      file, and its within-block offset lies inside that block (a chunk end may sit at its end);
    * the record at the smallest chunk begin (the contig's first indexed record) starts a line,
      lies on that contig (VCF: CHROM is the index's name; BCF: the CHROM int32 is the contig's
      number in header order) and its POS - 1 lies inside the bin that lists it (:func:`bin_range`);
    * at the largest chunk end comes the end of the data or a record of another contig (records
      appended to a contig after indexing fail here).

    ``header_contigs``: the data's ``##contig`` IDs in header order (they name a BCF's contigs).
    """
    for suffix in (".tbi", ".csi"):
        index_path = path + suffix
        if not os.path.exists(index_path):
            continue
        tool = f"tabix -f -p vcf {path}" if suffix == ".tbi" else f"bcftools index -f {path}"
        rebuild = f"`enformer-score index {path}` (or `{tool}`)"
        try:
            data_stat, index_stat = os.stat(path), os.stat(index_path)
        except OSError as error:
            raise InputError(f"cannot read {path} or its index {index_path}: {error}") from None
        key = (path, data_stat.st_size, data_stat.st_mtime_ns, index_path, index_stat.st_size,
               index_stat.st_mtime_ns)
        if key not in _VERDICTS:
            _VERDICTS[key] = _verdict(path, index_path, header_contigs, rebuild)
        if _VERDICTS[key] is not None:
            raise InputError(_VERDICTS[key])


class _Mismatch(Exception):
    """The data contradicts the index; the message says where."""


def _verdict(path: str, index_path: str, header_contigs: list[str], rebuild: str) -> str | None:
    try:
        index = _read_index(index_path, header_contigs)
    except _UNREADABLE as error:
        return f"the index {index_path} is unreadable ({error}); rebuild it with {rebuild}"
    try:
        _check_data(path, index, len(header_contigs))
    except _Mismatch as mismatch:
        return (f"the index {index_path} does not match {path} ({mismatch}): was the VCF rewritten "
                f"after indexing? Rebuild it with {rebuild}")
    except OSError as error:
        return f"cannot read {path} to check its index {index_path}: {error}"
    return None


def _check_data(path: str, index: VcfIndex, n_header_contigs: int) -> None:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if not size:
            raise _Mismatch("the data file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            blocks = _Bgzf(data, size)
            bcf = blocks.block(0)[:4] == b"BCF\2"
            for tid, contig in enumerate(index.contigs):
                try:
                    _check_contig(blocks, index, tid, contig, bcf, n_header_contigs)
                except _Mismatch as mismatch:
                    raise _Mismatch(f"contig {contig.name!r}: {mismatch}") from None


def _check_contig(blocks: _Bgzf, index: VcfIndex, tid: int, contig: IndexedContig, bcf: bool,
                  n_header_contigs: int) -> None:
    first = first_bin = last = None
    for bin_number, chunks in contig.bins.items():
        if bin_number >= pseudo_bin(index.depth) - 1:  # real bins end at ((1 << 3 (depth + 1)) - 1) / 7
            raise _Mismatch(f"bin {bin_number} is beyond the last bin of depth {index.depth}")
        for begin, end in chunks:
            if begin >= end:
                raise _Mismatch(f"chunk {_voffset(begin)}-{_voffset(end)} of bin {bin_number} is empty")
            blocks.check_offset(begin, at_end=False)
            blocks.check_offset(end, at_end=True)
            if first is None or begin < first:
                first, first_bin = begin, bin_number
            last = end if last is None else max(last, end)
    if first is None:
        return  # no records: a header contig of a BCF, say
    chrom, beg = _record(blocks, first, bcf)
    if chrom is None:
        raise _Mismatch(f"its first indexed record, at {_voffset(first)}, lies past the end of the data")
    if chrom != (tid if bcf else contig.name.encode()):
        raise _Mismatch(f"its first indexed record, at {_voffset(first)}, is on contig {_shown(chrom)}")
    low, high = bin_range(first_bin, index.min_shift, index.depth)
    if not low <= beg < high:
        raise _Mismatch(f"its first indexed record, at {_voffset(first)}, has POS {beg + 1}, "
                        f"outside its bin {first_bin} ({low + 1}-{high})")
    chrom, _ = _record(blocks, last, bcf)
    if chrom == (tid if bcf else contig.name.encode()):
        raise _Mismatch(f"a record of this contig follows its last indexed one, at {_voffset(last)}")
    if bcf and chrom is not None and not 0 <= chrom < n_header_contigs:
        raise _Mismatch(f"no record starts where its last chunk ends, at {_voffset(last)}")


def _record(blocks: _Bgzf, voffset: int, bcf: bool) -> tuple[int | bytes | None, int]:
    """(CHROM, POS - 1) of the record at ``voffset``; CHROM is None at the end of the data. A BCF
    record starts uint32 l_shared, uint32 l_indiv, int32 CHROM, int32 0-based POS (VCFv4.3 6.3);
    a VCF record is a line: CHROM TAB POS TAB ..., the first after any '#' lines there (tabix
    skips them, and a chunk may begin or end where one starts)."""
    if bcf:
        got = blocks.read(voffset, lambda out: len(out) >= 16)
        if got is None:
            return None, -1
        if len(got[1]) < 16:
            raise _Mismatch(f"the data ends inside the record at {_voffset(voffset)}")
        _, _, chrom, beg = struct.unpack_from("<IIii", got[1])
        return chrom, beg
    def enough(out: bytes) -> bool:
        out = _after_meta(out)
        return not out.startswith(b"#") and (out.count(b"\t") >= 2 or b"\n" in out)

    got = blocks.read(voffset, enough)
    if got is None:
        return None, -1
    before, text = got
    text = _after_meta(text)
    if not text:
        return None, -1
    fields = text.split(b"\n", 1)[0].split(b"\t", 2)
    # A within-block offset of 0 gives no preceding byte to look at (the previous block is unknown).
    if before not in (b"", b"\n") or len(fields) < 3 or not fields[1].isdigit():
        raise _Mismatch(f"no VCF record starts at {_voffset(voffset)}")
    return fields[0], int(fields[1]) - 1


def _after_meta(text: bytes) -> bytes:
    """``text`` without its leading complete '#' lines."""
    while text.startswith(b"#") and b"\n" in text:
        text = text.split(b"\n", 1)[1]
    return text


def _voffset(voffset: int) -> str:
    """A virtual offset as compressed:uncompressed offsets, as htslib prints them."""
    return f"{voffset >> 16}:{voffset & 0xFFFF}"


def _shown(chrom: int | bytes) -> str:
    """A CHROM as read: a BCF contig number, or a VCF name."""
    return f"#{chrom}" if isinstance(chrom, int) else repr(chrom.decode(errors="replace"))


class _Bgzf:
    """The BGZF blocks of a data file (SAMv1 4.1), read and inflated on demand and cached by
    compressed offset (small contigs share blocks). A virtual offset is the block's compressed
    offset << 16 | the offset inside its inflated data."""

    def __init__(self, data: mmap.mmap, size: int):
        self.data, self.size = data, size
        self._headers: dict[int, tuple[int, int, int]] = {}  # coffset -> (XLEN, BSIZE + 1, ISIZE)
        self._blocks: dict[int, bytes] = {}

    def header(self, coffset: int) -> tuple[int, int, int]:
        """(XLEN, block size, inflated size) of the block at ``coffset``: a gzip member with the
        FEXTRA flag whose extra field holds the 'BC' subfield (SLEN 2, BSIZE = block size - 1)."""
        found = self._headers.get(coffset)
        if found is not None:
            return found
        data, size = self.data, self.size
        if coffset + _BGZF_HEADER > size or data[coffset:coffset + 4] != _BGZF_MAGIC:
            raise _Mismatch(f"compressed offset {coffset} is not the start of a BGZF block")
        xlen = struct.unpack_from("<H", data, coffset + 10)[0]
        at, extra_end = coffset + _BGZF_HEADER, min(coffset + _BGZF_HEADER + xlen, size)
        block_size = None
        while at + 4 <= extra_end:
            si1, si2, slen = struct.unpack_from("<BBH", data, at)
            if (si1, si2, slen) == (66, 67, 2) and at + 6 <= extra_end:
                block_size = struct.unpack_from("<H", data, at + 4)[0] + 1
                break
            at += 4 + slen
        if (block_size is None or block_size < _BGZF_HEADER + xlen + _BGZF_FOOTER
                or coffset + block_size > size):
            raise _Mismatch(f"compressed offset {coffset} is not the start of a BGZF block")
        inflated_size = struct.unpack_from("<I", data, coffset + block_size - 4)[0]  # ISIZE
        found = self._headers[coffset] = (xlen, block_size, inflated_size)
        return found

    def block(self, coffset: int) -> bytes:
        """The inflated data of the block at ``coffset`` (raw deflate after the header)."""
        found = self._blocks.get(coffset)
        if found is None:
            xlen, block_size, inflated_size = self.header(coffset)
            deflated = self.data[coffset + _BGZF_HEADER + xlen:coffset + block_size - _BGZF_FOOTER]
            try:
                found = zlib.decompress(deflated, -15)
            except zlib.error as error:
                raise _Mismatch(f"the BGZF block at {coffset} is corrupt ({error})") from None
            if len(found) != inflated_size:
                raise _Mismatch(f"the BGZF block at {coffset} inflates to {len(found)} bytes, "
                                f"not its ISIZE {inflated_size}")
            self._blocks[coffset] = found
        return found

    def check_offset(self, voffset: int, *, at_end: bool) -> None:
        """A chunk begin points inside a block; a chunk end may also point at a block's end, or at
        the end of a file without the empty EOF block."""
        coffset, uoffset = voffset >> 16, voffset & 0xFFFF
        if at_end and (coffset, uoffset) == (self.size, 0):
            return
        inflated_size = self.header(coffset)[2]
        if uoffset > inflated_size or (uoffset == inflated_size and not at_end):
            raise _Mismatch(f"virtual offset {_voffset(voffset)} lies past the {inflated_size} bytes "
                            "of its block")

    def read(self, voffset: int, enough) -> tuple[bytes, bytes] | None:
        """(the byte before ``voffset`` in its block, or b'' at a block start; the bytes from it on,
        across blocks, until ``enough(bytes)`` or the end of the data), or None when only the end of
        the data (empty blocks such as the EOF marker) follows."""
        coffset, uoffset = voffset >> 16, voffset & 0xFFFF
        # An offset at the end of a block, or in an empty one, means the next block's start.
        while coffset < self.size and uoffset >= self.header(coffset)[2]:
            coffset, uoffset = coffset + self.header(coffset)[1], 0
        if coffset >= self.size:
            return None
        block = self.block(coffset)
        before, out = block[uoffset - 1:uoffset] if uoffset else b"", b""
        while True:
            piece = block[uoffset:uoffset + 1024]  # a record's first fields: not its whole block
            out, uoffset = out + piece, uoffset + len(piece)
            if enough(out) or len(out) >= _MAX_FIELDS:
                return before, out
            if uoffset >= len(block):
                coffset += self.header(coffset)[1]
                if coffset >= self.size:
                    return before, out
                block, uoffset = self.block(coffset), 0
