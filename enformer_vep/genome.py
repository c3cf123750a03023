"""Reference genome access: random reads from a plain or BGZF-compressed FASTA through its samtools indexes.

A plain FASTA needs ``ref.fa.fai``; a bgzip FASTA needs ``ref.fa.gz.fai`` (offsets in uncompressed bytes) and
``ref.fa.gz.gzi``. Missing indexes are built next to the FASTA (the same files ``samtools faidx`` writes); existing
ones are checked against the FASTA's content (file times cannot tell: a copy or a checkout makes an index no older
than its data) and refused when they no longer match it.
"""
from __future__ import annotations

import bisect
import gzip
import hashlib
import os
import zlib
from typing import Iterable, Iterator

import numpy as np

from .atomic import atomic_write
from .errors import InputError

_N = ord("N")
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_HEADER = 12  # fixed gzip header up to and including XLEN
_HEADER_PEEK = _GZIP_HEADER + 256  # bytes read to parse a block header; BGZF writers use an XLEN of 6
_BGZF_FOOTER = 8  # CRC32 + ISIZE
# Soft-masked (lower-case) letters to upper case, every other byte unchanged (SPEC §2 project choice).
_UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Genome:
    """An indexed FASTA, read with one ``pread`` (plus inflating BGZF blocks) per :meth:`fetch`.

    ``contigs`` maps sequence name -> length in ``.fai`` order; ``path`` is the FASTA path; ``bgzf`` tells
    whether it is bgzip-compressed (recognised by content, not by the file name). One open file
    handle per instance; ``pread`` keeps it thread-safe, and pickling reopens the file (so a copy can be sent
    to worker processes). Check ``chrom in genome.contigs`` before fetching to handle naming differences.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(2)
        except OSError as e:
            raise InputError(f"cannot read the FASTA {self.path}: {e.strerror}") from e
        self.bgzf = head == _GZIP_MAGIC
        if not self.bgzf and head[:1] != b">":
            raise InputError(f"{self.path} is not a FASTA file (it does not start with '>')")
        self._file = open(self.path, "rb", buffering=0)
        self._block_starts: tuple[list[int], list[int]] | None = None
        try:
            if self.bgzf:
                if _bgzf_header(self._read(0, _HEADER_PEEK)) is None:
                    raise InputError(f"{self.path} is gzip-compressed but not BGZF: gunzip it or recompress it "
                                     f"with `bgzip`")
                gzi_bytes, gzi_built = self._ensure_index(self.path + ".gzi", self._build_gzi)
                self._block_starts = _parse_gzi(gzi_bytes, self.path + ".gzi")
                if not gzi_built:
                    self._check_gzi()
            fai_bytes, fai_built = self._ensure_index(self.path + ".fai", self._build_fai)
            entries = _parse_fai(fai_bytes, self.path)
            if not fai_built:
                self._check_fai(entries)
        except BaseException:
            self._file.close()
            raise
        self._records = {name.decode("utf-8", errors="replace"): rec for name, rec in entries.items()}
        self.contigs: dict[str, int] = {name: rec[0] for name, rec in self._records.items()}
        self._checksum = hashlib.sha256(fai_bytes + (gzi_bytes if self.bgzf else b"")).hexdigest()

    def fetch(self, chrom: str, start: int, end: int) -> np.ndarray:
        """Upper-cased ASCII codes ``uint8 [end - start]`` of 0-based half-open ``[start, end)`` on ``chrom``;
        positions outside ``[0, contig length)`` are ``N`` (any ``start <= end`` is allowed)."""
        start, end = int(start), int(end)
        if end < start:
            raise ValueError(f"fetch end {end} < start {start}")
        try:
            length, offset, line_bases, line_width = self._records[chrom]
        except KeyError:
            raise InputError(f"contig {chrom!r} is not in the FASTA {self.path} "
                             f"(it has {_preview(self.contigs)})") from None
        out = np.full(end - start, _N, dtype=np.uint8)
        lo, hi = max(start, 0), min(end, length)
        if lo >= hi:
            return out
        first = offset + lo // line_bases * line_width + lo % line_bases
        last = offset + (hi - 1) // line_bases * line_width + (hi - 1) % line_bases
        bases = self._read_sequence(first, last + 1 - first).translate(_UPPER, b"\r\n")
        if len(bases) != hi - lo:  # the FASTA changed after it was opened, or was rewrapped inside a sequence
            raise _stale(self.path + ".fai", self.path, f"the bases of contig {chrom!r} are not where it says")
        out[lo - start:hi - start] = np.frombuffer(bases, dtype=np.uint8)
        return out

    def index_checksum(self) -> str:
        """SHA-256 hex digest of the ``.fai`` content (followed by the ``.gzi`` for a bgzip FASTA)."""
        return self._checksum

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Genome:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_file"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._file = open(self.path, "rb", buffering=0)

    def __repr__(self) -> str:
        return f"Genome({self.path!r}, {len(self.contigs)} contigs)"

    # -- reading -------------------------------------------------------------------------------------------

    def _read(self, offset: int, size: int) -> bytes:
        return os.pread(self._file.fileno(), size, offset)

    def _read_sequence(self, offset: int, size: int) -> bytes:
        """``size`` bytes at uncompressed ``offset`` (fewer only at the end of the data)."""
        if self._block_starts is None:
            return self._read(offset, size)
        coffsets, uoffsets = self._block_starts
        # Blocks from the one holding the first byte up to (not including) the first one starting past the last.
        i = bisect.bisect_right(uoffsets, offset) - 1
        j = bisect.bisect_right(uoffsets, offset + size - 1)
        cend = coffsets[j] if j < len(coffsets) else os.fstat(self._file.fileno()).st_size
        data = memoryview(self._read(coffsets[i], cend - coffsets[i]))
        skip, parts, have, pos = offset - uoffsets[i], [], 0, 0
        while have < skip + size and pos < len(data):
            header = _bgzf_header(data[pos:pos + _HEADER_PEEK])
            if header is None or pos + header[1] > len(data):
                raise InputError(f"{self.path} is corrupt: no valid BGZF block at byte {coffsets[i] + pos}")
            header_len, block_size = header
            # Inflate only as far as this read needs: the index checks read a few bytes from each of many blocks.
            inflater, wanted = zlib.decompressobj(-15), skip + size - have
            try:
                block = inflater.decompress(data[pos + header_len:pos + block_size - _BGZF_FOOTER], wanted)
            except zlib.error as e:
                raise InputError(f"{self.path} is corrupt: BGZF block at byte {coffsets[i] + pos}: {e}") from e
            if len(block) < wanted and not inflater.eof:
                raise InputError(f"{self.path} is corrupt: BGZF block at byte {coffsets[i] + pos} is truncated")
            parts.append(block)
            have += len(block)
            pos += block_size
        return b"".join(parts)[skip:skip + size]

    def _check_fai(self, entries: dict[bytes, tuple[int, int, int, int]]) -> None:
        """Refuses the ``.fai`` unless, for every entry, the byte before its offset ends a line that starts with '>'
        and the entry's name followed by whitespace or the line end, and its sequence ends where the entry says:
        its last base is followed by a line end (or the end of the file), then blank lines, then the next '>'
        header or the end of the file. A few short reads per entry; no sequence is read in full."""
        fai = self.path + ".fai"
        for raw, (length, offset, line_bases, line_width) in entries.items():
            name = raw.decode("utf-8", errors="replace")
            if not self._follows_header(raw, offset):
                raise _stale(fai, self.path, f"contig {name!r} at byte {offset} does not follow its '>{name}' "
                                             f"header line")
            end = offset + (length - 1) // line_bases * line_width + (length - 1) % line_bases + 1 if length else offset
            why = self._end_fault(end, length)
            if why:
                raise _stale(fai, self.path, f"contig {name!r} of {length} bases {why}")

    def _follows_header(self, name: bytes, offset: int) -> bool:
        """Whether (uncompressed) byte ``offset`` starts a line and the line before it is a '>' header naming
        ``name`` (its first word)."""
        if offset <= 0:
            return False
        size = 256
        while True:  # widen the read backwards until it holds the start of the line (descriptions can be long)
            lo = max(offset - size, 0)
            data = self._read_sequence(lo, offset - lo)
            if len(data) != offset - lo or not data.endswith(b"\n"):
                return False
            line_start = data.rfind(b"\n", 0, len(data) - 1) + 1  # 0 when no earlier line end was read
            if line_start or not lo:
                break
            size *= 4
        line = data[line_start:]
        return line.startswith(b">" + name) and line[len(name) + 1:len(name) + 2].isspace()

    def _end_fault(self, end: int, length: int) -> str | None:
        """Why a sequence of ``length`` bases whose last base is at byte ``end - 1`` (an empty one: whose header line
        ends at ``end``) does not end there, or None when it does."""
        chunk = 4096
        pos, skip = (end - 1, 1) if length else (end, 0)  # one read holds the last base and what follows it
        data = self._read_sequence(pos, chunk)
        if length:
            if not data:
                return f"ends at byte {end}, past the end of the file"
            if data[0] in b"\r\n>" or not (data[1:2] in (b"", b"\n") or data[1:3] == b"\r\n"):
                return f"does not end at byte {end}"
        while True:  # line ends and blank lines, then the next header or the end of the file
            rest = data[skip:].lstrip(b"\r\n")
            if rest:
                return None if rest.startswith(b">") else f"does not end at byte {end}"
            if len(data) < chunk:
                return None
            pos, skip = pos + chunk, 0
            data = self._read_sequence(pos, chunk)

    def _check_gzi(self) -> None:
        """Refuses the ``.gzi`` unless every block start it lists is the start of a BGZF block of the file and its
        uncompressed offset is the sum of the uncompressed sizes (ISIZE) of the blocks before it. Reads block
        headers and ISIZE fields only, no data."""
        gzi = self.path + ".gzi"
        coffsets, uoffsets = self._block_starts
        listed = 1  # the implicit first block (0, 0) is not in the file
        for coffset, uoffset, _ in self._bgzf_blocks():
            if listed == len(coffsets):
                return
            if coffset > coffsets[listed]:
                raise _stale(gzi, self.path, f"it lists byte {coffsets[listed]}, where no BGZF block starts")
            if coffset == coffsets[listed]:
                if uoffset != uoffsets[listed]:
                    raise _stale(gzi, self.path, f"the block at byte {coffset} holds uncompressed byte {uoffset}, "
                                                 f"not {uoffsets[listed]}")
                listed += 1
        if listed < len(coffsets):
            raise _stale(gzi, self.path, f"it lists byte {coffsets[listed]}, past the end of the file")

    def _bgzf_blocks(self) -> Iterator[tuple[int, int, int]]:
        """(compressed offset, uncompressed offset, ISIZE) of every BGZF block, in file order, from one read per
        block: a block's ISIZE field lies just before the next block's header."""
        size = os.fstat(self._file.fileno()).st_size
        coffset, uoffset, head = 0, 0, self._read(0, _HEADER_PEEK)
        while coffset < size:
            header = _bgzf_header(head)
            if header is None or coffset + header[1] > size:
                raise InputError(f"{self.path} is not BGZF throughout (no BGZF block at byte {coffset}): "
                                 f"recompress it with `bgzip`")
            block_end = coffset + header[1]
            tail = self._read(block_end - 4, 4 + _HEADER_PEEK)
            isize = int.from_bytes(tail[:4], "little")
            yield coffset, uoffset, isize
            coffset, uoffset, head = block_end, uoffset + isize, tail[4:]

    # -- indexes ---------------------------------------------------------------------------------------------

    def _ensure_index(self, index_path: str, build) -> tuple[bytes, bool]:
        """(the index file's bytes, whether it was just built): built and written next to the FASTA when missing."""
        try:
            with open(index_path, "rb") as f:
                return f.read(), False
        except FileNotFoundError:
            pass
        except OSError as e:
            raise InputError(f"cannot read the FASTA index {index_path}: {e.strerror}") from e
        content = build()
        try:
            atomic_write(index_path, lambda f: f.write(content))
        except OSError as e:
            raise InputError(f"the FASTA index {index_path} is missing and cannot be written ({e.strerror or e}): "
                             f"run `samtools faidx {self.path}` where that is allowed, or copy the FASTA to a "
                             f"writable directory") from e
        return content, True

    def _build_fai(self) -> bytes:
        opener = gzip.open if self.bgzf else open
        try:
            with opener(self.path, "rb") as f:
                return _fai_from_lines(f, self.path)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"cannot index {self.path}: {e}") from e

    def _build_gzi(self) -> bytes:
        """htslib's ``.gzi``: every non-empty block start after the first as (compressed, uncompressed) offsets."""
        entries = [(coffset, uoffset) for coffset, uoffset, isize in self._bgzf_blocks() if isize and coffset]
        return np.array([len(entries), *np.ravel(entries)], dtype="<u8").tobytes()


def _bgzf_header(head: bytes | memoryview) -> tuple[int, int] | None:
    """(header length, total block size) of the BGZF block starting ``head``, or None if it is not one."""
    if len(head) < _GZIP_HEADER or bytes(head[:3]) != b"\x1f\x8b\x08" or not head[3] & 4:
        return None
    xlen = int.from_bytes(head[10:12], "little")
    pos, end = _GZIP_HEADER, _GZIP_HEADER + xlen
    if end > len(head):
        return None
    while pos + 4 <= end:
        slen = int.from_bytes(head[pos + 2:pos + 4], "little")
        if bytes(head[pos:pos + 2]) == b"BC" and slen == 2:
            return end, int.from_bytes(head[pos + 4:pos + 6], "little") + 1
        pos += 4 + slen
    return None


def _fai_from_lines(lines: Iterable[bytes], path: str) -> bytes:
    """samtools-compatible ``.fai`` content for FASTA ``lines`` (bytes, line endings kept)."""
    records, names, offset, name = [], set(), 0, None

    def fail(number: int, why: str) -> InputError:
        where = f"line {number}" + (f" (sequence {name.decode(errors='replace')!r})" if name else "")
        return InputError(f"cannot index {path}: {where} {why}")

    for number, line in enumerate(lines, 1):
        offset += len(line)
        if line.startswith(b">"):
            if name is not None:
                records.append((name, length, seq_offset, line_bases, line_width))
            fields = line[1:].split()
            name = fields[0] if fields else None
            if name is None:
                raise fail(number, "is a '>' header without a name")
            if name in names:
                raise fail(number, "repeats an earlier sequence name")
            names.add(name)
            seq_offset, length, line_bases, line_width, ended = offset, 0, 0, 0, False
            continue
        bases = len(line.rstrip(b"\r\n"))
        if name is None:
            if bases:
                raise fail(number, "comes before the first '>' header")
            continue
        if not bases:
            ended = True  # blank lines may only trail a sequence
            continue
        if ended:
            raise fail(number, "follows a shorter line: all lines of a sequence but the last must have the same "
                               "length; rewrap the FASTA, e.g. `seqkit seq -w 60`")
        if not line_bases:
            # A single line without a line end still needs line_width > line_bases for the offset arithmetic.
            line_bases, line_width = bases, max(len(line), bases + 1)
        elif bases > line_bases or len(line) - bases not in (line_width - line_bases, 0):
            raise fail(number, "is longer than the sequence's first line or has other line endings; rewrap the "
                               "FASTA, e.g. `seqkit seq -w 60`")
        ended = bases < line_bases or len(line) == bases
        length += bases
    if name is None:
        raise InputError(f"cannot index {path}: it has no '>' sequence header")
    records.append((name, length, seq_offset, line_bases, line_width))
    return b"".join(b"%s\t%d\t%d\t%d\t%d\n" % r for r in records)


def _parse_fai(content: bytes, fasta: str) -> dict[bytes, tuple[int, int, int, int]]:
    """name (bytes, as in the FASTA) -> (length, offset, line_bases, line_width) of ``fasta``'s ``.fai`` content;
    a name listed twice is refused (no FASTA indexed by samtools has one)."""
    path = fasta + ".fai"
    records = {}
    for number, line in enumerate(content.splitlines(), 1):
        fields = line.split(b"\t")
        try:
            length, offset, line_bases, line_width = (int(x) for x in fields[1:5])
        except ValueError:
            raise InputError(f"malformed FASTA index {path} (line {number}); delete it and rerun, or run "
                             f"`samtools faidx`") from None
        if length < 0 or offset < 0 or (length and not 0 < line_bases < line_width):
            raise InputError(f"malformed FASTA index {path} (line {number}); delete it and rerun, or run "
                             f"`samtools faidx`")
        if fields[0] in records:
            raise _stale(path, fasta, f"line {number} repeats the name {fields[0].decode('utf-8', 'replace')!r}")
        records[fields[0]] = (length, offset, line_bases, line_width)
    if not records:
        raise InputError(f"the FASTA index {path} is empty; delete it and rerun, or run `samtools faidx`")
    return records


def _parse_gzi(content: bytes, path: str) -> tuple[list[int], list[int]]:
    """(compressed, uncompressed) offsets of the block starts, the implicit first block (0, 0) included."""
    count = int.from_bytes(content[:8], "little") if len(content) >= 8 else -1
    if count < 0 or len(content) != 8 + 16 * count:
        raise InputError(f"malformed BGZF index {path}; delete it and rerun, or run `samtools faidx`")
    pairs = np.frombuffer(content, dtype="<u8", offset=8).reshape(count, 2)
    return [0, *pairs[:, 0].tolist()], [0, *pairs[:, 1].tolist()]


def _stale(index: str, fasta: str, why: str) -> InputError:
    """The one-line refusal of an index that no longer describes its FASTA."""
    return InputError(f"{index} does not match the FASTA {fasta} ({why}): the FASTA changed after the index was "
                      f"made; rebuild it with `samtools faidx {fasta}` or delete {index} (it is rebuilt "
                      f"automatically)")


def _preview(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"contigs {shown}" if names else "no contigs"


class GenomeBlocks:
    """:meth:`Genome.fetch` served from one cached block of a chromosome: the windows of a sorted
    VCF's nearby variants become slices of a region read once (SPEC windows overlap by ~99%).

    Not thread-safe: give each thread its own.
    """

    def __init__(self, genome: Genome, block: int = 1 << 22):
        self.genome, self.block = genome, block
        self.contigs = genome.contigs
        self._chrom: str | None = None
        self._start = self._end = 0
        self._codes = np.empty(0, np.uint8)

    def fetch(self, chrom: str, start: int, end: int) -> np.ndarray:
        """As :meth:`Genome.fetch` (a read-only view into the cached block)."""
        if chrom != self._chrom or start < self._start or end > self._end:
            self._chrom, self._start = chrom, start
            self._end = start + max(self.block, end - start)
            self._codes = self.genome.fetch(chrom, self._start, self._end)
            self._codes.flags.writeable = False
        return self._codes[start - self._start:end - self._start]
