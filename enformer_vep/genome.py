"""Reference genome access: random reads from a plain or bgzip-compressed FASTA through htslib (``pysam.FastaFile``).

A plain FASTA needs ``ref.fa.fai``; a bgzip FASTA needs ``ref.fa.gz.fai`` (offsets in uncompressed bytes) and
``ref.fa.gz.gzi``. Missing indexes are built by htslib (``samtools faidx`` through pysam) under temporary names and
renamed into place beside the FASTA once they pass our checks, so a reader never sees half an index. Existing ones are
checked against the FASTA's content (file times cannot tell: a copy or a checkout makes an index no older than its
data) and refused when they no longer match it. htslib only prints why it cannot index or read a FASTA; the errors here
are one line, name the file and say what to do.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pysam
from pysam.libcbgzf import BGZFile

from .atomic import atomic_path
from .errors import InputError, preview

_N = ord("N")
_GZIP_MAGIC = b"\x1f\x8b"
_BGZF_HEADER = 18  # gzip header with the BC subfield (the block size)
_CHUNK = 4096  # bytes read at a time by the index checks


class Genome:
    """An indexed FASTA, read through one htslib ``FastaFile`` per instance.

    ``contigs`` maps sequence name -> length in ``.fai`` order; ``path`` is the FASTA path; ``bgzf`` tells
    whether it is bgzip-compressed (recognised by content, not by the file name). htslib's handles are not
    thread-safe: a lock serialises reads, so one instance may serve several threads. Pickling reopens the files (so
    a copy can be sent to worker processes). Check ``chrom in genome.contigs`` before fetching to handle naming
    differences. Raises :class:`InputError` for a FASTA or index it cannot use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(_BGZF_HEADER)
        except OSError as e:
            raise InputError(f"cannot read the FASTA {self.path}: {e.strerror}") from e
        self.bgzf = head[:2] == _GZIP_MAGIC
        if self.bgzf and _bgzf_header(head) is None:
            raise InputError(f"{self.path} is gzip-compressed but not BGZF: `enformer-score index {self.path}` "
                             f"recompresses it with bgzip (or gunzip it)")
        self._fasta: pysam.FastaFile | None = None
        self._open_files()
        # The first block starts the data; the .gzi lists the others.
        self._block_starts: tuple[list[int], list[int]] = ([0], [0])
        try:
            fai_bytes, gzi_bytes = self._load_indexes()
        except BaseException:
            self.close()
            raise
        self._checksum = hashlib.sha256(fai_bytes + gzi_bytes).hexdigest()

    def _load_indexes(self) -> tuple[bytes, bytes]:
        """Reads, builds where missing and checks the indexes, then opens htslib's reader; (.fai, .gzi) content
        (``b""`` for the .gzi of a plain FASTA)."""
        if self._read_sequence(0, 1) != b">":
            raise InputError(f"{self.path} is not a FASTA file (it does not start with '>')")
        fai, gzi = self.path + ".fai", self.path + ".gzi"
        indexes = {index: _read_index(index) for index in ((fai, gzi) if self.bgzf else (fai,))}
        missing = [index for index, content in indexes.items() if content is None]
        if missing:
            indexes.update(self._build_indexes(missing))
        if self.bgzf:
            self._block_starts = _parse_gzi(indexes[gzi], gzi)
            if gzi not in missing:
                self._check_gzi()
        entries = _parse_fai(indexes[fai], self.path)
        if fai not in missing:
            self._check_fai(entries)
        self._records = {name.decode("utf-8", errors="replace"): rec for name, rec in entries.items()}
        self.contigs: dict[str, int] = {name: rec[0] for name, rec in self._records.items()}
        self._fasta = self._open_fasta()
        return indexes[fai], indexes.get(gzi, b"")

    def fetch(self, chrom: str, start: int, end: int) -> np.ndarray:
        """Upper-cased ASCII codes ``uint8 [end - start]`` of 0-based half-open ``[start, end)`` on ``chrom``;
        positions outside ``[0, contig length)`` are ``N`` (any ``start <= end`` is allowed). Raises ``ValueError``
        when ``end < start``, :class:`InputError` for an unknown contig, a corrupt block or a FASTA that no longer
        fits its index."""
        start, end = int(start), int(end)
        if end < start:
            raise ValueError(f"fetch end {end} < start {start}")
        try:
            length, offset, line_bases, line_width = self._records[chrom]
        except KeyError:
            raise InputError(f"contig {chrom!r} is not in the FASTA {self.path} "
                             f"(it has contigs {preview(self.contigs)})") from None
        lo, hi = max(start, 0), min(end, length)
        if lo >= hi:
            return np.full(end - start, _N, dtype=np.uint8)
        with self._lock:
            try:
                bases = self._fasta.fetch(chrom, lo, hi).encode()
            except UnicodeDecodeError as e:  # pysam decodes the bytes as UTF-8; the error holds them all
                bases = e.object
            except ValueError as e:  # htslib could not read the bytes the index points at
                if self._fasta.closed:
                    raise
                self._fasta.close()
                self._fasta = self._open_fasta()  # a failed htslib handle keeps failing
                first = offset + lo // line_bases * line_width + lo % line_bases
                # Raises, naming the block, where a bgzip block of the range does not inflate.
                self._read_sequence(first, _sequence_end(hi, offset, line_bases, line_width) - first)
                raise _stale(self.path + ".fai", self.path, f"contig {chrom!r} is cut short") from e
        # htslib copies whole line stretches by the index's arithmetic: a line end among them means the FASTA changed
        # after it was opened, or was rewrapped inside a sequence.
        if b"\n" in bases or b"\r" in bases:
            raise _stale(self.path + ".fai", self.path, f"the bases of contig {chrom!r} are not where it says")
        # Soft-masked (lower-case) letters to upper case, every other byte unchanged (docs/spec.md §3.1).
        codes = np.frombuffer(bytearray(bases).upper(), dtype=np.uint8)  # writable, like the padded copy
        if hi - lo == end - start:
            return codes
        out = np.full(end - start, _N, dtype=np.uint8)
        out[lo - start:hi - start] = codes
        return out

    def index_checksum(self) -> str:
        """SHA-256 hex digest of the ``.fai`` content (followed by the ``.gzi`` for a bgzip FASTA)."""
        return self._checksum

    def close(self) -> None:
        self._file.close()
        if self._fasta is not None:
            self._fasta.close()
        if self._reader is not None:
            _close_quietly(self._reader)

    def __enter__(self) -> Genome:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for handle in ("_file", "_reader", "_cached", "_lock", "_fasta"):
            del state[handle]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_files()
        self._fasta = self._open_fasta()

    def __repr__(self) -> str:
        return f"Genome({self.path!r}, {len(self.contigs)} contigs)"

    # -- files -----------------------------------------------------------------------------------------------

    def _open_files(self) -> None:
        """The handles the index checks read through: ``pread`` on the file, and htslib's BGZF reader for a bgzip
        FASTA (with the last block range it inflated: the checks read a few bytes at a time from nearby places)."""
        self._lock = threading.Lock()
        self._file = open(self.path, "rb", buffering=0)
        self._reader = BGZFile(self.path, "rb") if self.bgzf else None
        self._cached: tuple[int, bytes] = (-1, b"")

    def _open_fasta(self) -> pysam.FastaFile:
        """htslib's reader, given the index paths so that it never builds an index itself."""
        try:
            return pysam.FastaFile(self.path, filepath_index=self.path + ".fai",
                                   filepath_index_compressed=self.path + ".gzi" if self.bgzf else None)
        except (OSError, UnicodeDecodeError) as e:  # pysam needs UTF-8 sequence names
            raise InputError(f"htslib cannot open the FASTA {self.path} with its index: {e}") from e

    def _read_sequence(self, offset: int, size: int) -> bytes:
        """``size`` bytes at uncompressed ``offset`` (fewer only at the end of the data), for the index checks. A
        bgzip FASTA is inflated by htslib, one ``.gzi`` block range at a time."""
        if not self.bgzf:
            return os.pread(self._file.fileno(), size, offset)
        uoffsets = self._block_starts[1]
        parts, end = [], offset + size
        while offset < end:
            i = bisect.bisect_right(uoffsets, offset) - 1
            block_end = uoffsets[i + 1] if i + 1 < len(uoffsets) else end
            ustart, data = self._inflate(i, block_end)
            parts.append(data[offset - ustart:end - ustart])
            offset = ustart + len(data)
            if offset < min(block_end, end):  # the data ends here
                break
        return b"".join(parts)

    def _inflate(self, i: int, block_end: int) -> tuple[int, bytes]:
        """(uncompressed offset, bytes) from the start of the ``i``-th listed block up to ``block_end``."""
        coffsets, uoffsets = self._block_starts
        if self._cached[0] == uoffsets[i] and len(self._cached[1]) >= block_end - uoffsets[i]:
            return self._cached
        try:
            self._reader.seek(coffsets[i] << 16)  # virtual offset: compressed block start << 16 | offset in the block
            self._cached = (uoffsets[i], self._reader.read(block_end - uoffsets[i]))
        except OSError as e:
            _close_quietly(self._reader)
            self._reader, self._cached = BGZFile(self.path, "rb"), (-1, b"")  # a failed reader keeps failing
            raise InputError(f"{self.path} is corrupt: BGZF block at byte {coffsets[i]} cannot be inflated "
                             f"(htslib: {e}); recompress the FASTA with `enformer-score index {self.path}`") from e
        return self._cached

    # -- index checks ----------------------------------------------------------------------------------------

    def _check_fai(self, entries: dict[bytes, tuple[int, int, int, int]]) -> None:
        """Refuses the ``.fai`` unless, for every entry, the byte before its offset ends a '>' header line whose first
        word is the entry's name, and its sequence ends where the entry says: its last base is followed by a line
        end (or the end of the file), then blank lines, then the next '>' header or the end of the file. A few short
        reads per entry; no sequence is read in full."""
        fai = self.path + ".fai"
        for raw, (length, offset, line_bases, line_width) in entries.items():
            name = raw.decode("utf-8", errors="replace")
            if not self._follows_header(raw, offset):
                raise _stale(fai, self.path, f"contig {name!r} at byte {offset} does not follow its '>{name}' "
                                             f"header line")
            end = _sequence_end(length, offset, line_bases, line_width)
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
        return line.startswith(b">") and _header_name(line) == name

    def _end_fault(self, end: int, length: int) -> str | None:
        """Why a sequence of ``length`` bases whose last base is at byte ``end - 1`` (an empty one: whose header line
        ends at ``end``) does not end there, or None when it does. Blanks may follow the last base on its line (htslib
        does not count them as bases)."""
        pos, skip = (end - 1, 1) if length else (end, 0)  # one read holds the last base and what follows it
        data = self._read_sequence(pos, _CHUNK)
        if length:
            if not data:
                return f"ends at byte {end}, past the end of the file"
            after = data[1:].lstrip(b" \t")
            if data[0] in b" \t\r\n>" or not (after[:1] in (b"", b"\n") or after[:2] == b"\r\n"):
                return f"does not end at byte {end}"
        while True:  # line ends and blank lines, then the next header or the end of the file
            rest = data[skip:].lstrip()
            if rest:
                return None if rest.startswith(b">") else f"does not end at byte {end}"
            if len(data) < _CHUNK:
                return None
            pos, skip = pos + _CHUNK, 0
            data = self._read_sequence(pos, _CHUNK)

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
        coffset, uoffset, head = 0, 0, os.pread(self._file.fileno(), _BGZF_HEADER, 0)
        while coffset < size:
            block_size = _bgzf_header(head)
            if block_size is None or coffset + block_size > size:
                raise InputError(f"{self.path} is not BGZF throughout (no BGZF block at byte {coffset}): "
                                 f"recompress it with `enformer-score index {self.path}`")
            block_end = coffset + block_size
            tail = os.pread(self._file.fileno(), 4 + _BGZF_HEADER, block_end - 4)
            isize = int.from_bytes(tail[:4], "little")
            yield coffset, uoffset, isize
            coffset, uoffset, head = block_end, uoffset + isize, tail[4:]

    # -- building ------------------------------------------------------------------------------------------

    def _build_indexes(self, missing: list[str]) -> dict[str, bytes]:
        """Builds the indexes with htslib and renames the ``missing`` ones into place (the ``.gzi`` before the
        ``.fai``, which readers look for first); returns their content. htslib builds both of a bgzip FASTA's:
        the one that exists is kept (and checked) and the new one discarded."""
        fai, gzi = self.path + ".fai", self.path + ".gzi"
        try:
            with contextlib.ExitStack() as stack:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                outputs = {}
                for index in (fai, gzi) if self.bgzf else (fai,):  # renamed into place in the reverse order
                    if index not in missing:
                        outputs[index] = scratch / Path(index).name
                        continue
                    try:
                        outputs[index] = stack.enter_context(atomic_path(index))
                        outputs[index].touch()  # says why the folder is not writable, which samtools would not
                    except OSError as e:
                        raise InputError(f"the FASTA index {index} is missing and cannot be written "
                                         f"({e.strerror or e}): run `samtools faidx {self.path}` where that is "
                                         f"allowed, or copy the FASTA to a writable directory") from e
                try:
                    pysam.faidx(self.path, "--fai-idx", str(outputs[fai]),
                                *(("--gzi-idx", str(outputs[gzi])) if self.bgzf else ()))
                except pysam.SamtoolsError as e:
                    raise InputError(f"cannot index {self.path}: {self._unindexable()}") from e
                built = {index: output.read_bytes() for index, output in outputs.items()}
                if self.bgzf:
                    self._block_starts = _parse_gzi(built[gzi], gzi)
                    # htslib reads gzip members after BGZF blocks but cannot seek into them; walking the headers
                    # refuses them.
                    for _ in self._bgzf_blocks():
                        pass
                why = self._indexing_fault(_parse_fai(built[fai], self.path))
                if why:
                    raise InputError(f"cannot index {self.path}: {why}")
        except OSError as e:  # writing or renaming an index
            raise InputError(f"cannot write the index of the FASTA {self.path} ({e.strerror or e}): run "
                             f"`samtools faidx {self.path}` where that is allowed") from e
        return {index: built[index] for index in missing}

    def _indexing_fault(self, entries: dict[bytes, tuple[int, int, int, int]]) -> str | None:
        """What htslib let pass in the FASTA it just indexed but a FASTA index cannot hold, or None: a header without
        a name, or a repeated name (htslib indexes the first such sequence only, with a warning). htslib leaves out
        only repeats and empty sequences, so only the lines between one indexed sequence and the next are read."""
        if b"" in entries:
            return f"the sequence at byte {entries[b''][1]} has a '>' header line without a name"
        names = list(entries)
        for i, (length, offset, line_bases, line_width) in enumerate(entries.values()):
            following = names[i + 1] if i + 1 < len(names) else None
            pos = _sequence_end(length, offset, line_bases, line_width)
            while (header := self._next_header(pos)) is not None and header[2] != following:
                start, pos, name = header
                if name in entries:
                    return (f"the '>' header at byte {start} repeats the sequence name "
                            f"{name.decode('utf-8', 'replace')!r}; rename or remove one of the two sequences")
        return None

    def _next_header(self, pos: int) -> tuple[int, int, bytes] | None:
        """(start, end, name) of the first line at or after byte ``pos`` that is not blank, when it is a '>' header
        line (skipping the rest of the line ``pos`` is in); None at the end of the file or for any other line."""
        while (line := self._line_at(pos)) and not line.strip():
            pos += len(line)
        return (pos, pos + len(line), _header_name(line)) if line.startswith(b">") else None

    def _line_at(self, pos: int) -> bytes:
        """The bytes from ``pos`` up to and including the next line end (or the end of the file)."""
        size = _CHUNK
        while True:
            data = self._read_sequence(pos, size)
            cut = data.find(b"\n")
            if cut >= 0 or len(data) < size:
                return data[:cut + 1] if cut >= 0 else data
            size *= 4

    def _unindexable(self) -> str:
        """Why htslib could not index the FASTA (it only prints its reason), from the BGZF block headers and the
        file's last lines; otherwise the usual cause."""
        if self.bgzf:
            blocks = list(self._bgzf_blocks())  # refuses a file that is not BGZF throughout
            self._block_starts = ([c for c, _, _ in blocks], [u for _, u, _ in blocks])
            size = blocks[-1][1] + blocks[-1][2]
        else:
            size = os.fstat(self._file.fileno()).st_size
        tail = self._read_sequence(max(size - _CHUNK, 0), _CHUNK).rstrip()
        last = tail[tail.rfind(b"\n") + 1:]
        if last.startswith(b">"):
            return (f"its last sequence {_header_name(last).decode('utf-8', 'replace')!r} is empty (the file ends "
                    f"with its '>' header line), which htslib cannot index; remove that line")
        return ("htslib cannot index it (its message above says where); the usual cause is a sequence whose lines "
                "are not all the same length (all but its last must be, and blank lines may only follow a "
                "sequence): rewrap it, e.g. `seqkit seq -w 60`")


def _read_index(path: str) -> bytes | None:
    """The index file's content, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InputError(f"cannot read the FASTA index {path}: {e.strerror}") from e


def _close_quietly(reader: BGZFile) -> None:
    with contextlib.suppress(OSError):  # htslib reports a read error again on close
        reader.close()


def _sequence_end(length: int, offset: int, line_bases: int, line_width: int) -> int:
    """The byte after the last base of a ``.fai`` entry's sequence (``offset`` for an empty one)."""
    if not length:
        return offset
    return offset + (length - 1) // line_bases * line_width + (length - 1) % line_bases + 1


def _header_name(line: bytes) -> bytes:
    """The sequence name of a '>' header line: its first word, as htslib reads it (blanks after '>' skipped)."""
    words = line[1:].split(None, 1)
    return words[0] if words else b""


def _bgzf_header(head: bytes) -> int | None:
    """Total size of the BGZF block whose header starts ``head``, or None if htslib would not read it as one: htslib
    takes only the standard header (XLEN 6, holding just the BC subfield)."""
    if len(head) < _BGZF_HEADER or head[:3] != b"\x1f\x8b\x08" or not head[3] & 4:
        return None
    return int.from_bytes(head[16:18], "little") + 1 if head[10:16] == b"\x06\x00BC\x02\x00" else None


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
                             f"`enformer-score index FASTA`") from None
        if length < 0 or offset < 0 or (length and not 0 < line_bases < line_width):
            raise InputError(f"malformed FASTA index {path} (line {number}); delete it and rerun, or run "
                             f"`enformer-score index FASTA`")
        if fields[0] in records:
            raise _stale(path, fasta, f"line {number} repeats the name {fields[0].decode('utf-8', 'replace')!r}")
        records[fields[0]] = (length, offset, line_bases, line_width)
    if not records:
        raise InputError(f"the FASTA index {path} is empty; delete it and rerun, or run `enformer-score index FASTA`")
    return records


def _parse_gzi(content: bytes, path: str) -> tuple[list[int], list[int]]:
    """(compressed, uncompressed) offsets of the block starts, the implicit first block (0, 0) included."""
    count = int.from_bytes(content[:8], "little") if len(content) >= 8 else -1
    if count < 0 or len(content) != 8 + 16 * count:
        raise InputError(f"malformed BGZF index {path}; delete it and rerun, or run `enformer-score index FASTA`")
    pairs = np.frombuffer(content, dtype="<u8", offset=8).reshape(count, 2)
    return [0, *pairs[:, 0].tolist()], [0, *pairs[:, 1].tolist()]


def _stale(index: str, fasta: str, why: str) -> InputError:
    """The one-line refusal of an index that no longer describes its FASTA."""
    return InputError(f"{index} does not match the FASTA {fasta} ({why}): the FASTA changed after the index was "
                      f"made; rebuild it with `enformer-score index {fasta}` (or `samtools faidx {fasta}`), or delete "
                      f"{index} (it is rebuilt automatically)")


class GenomeBlocks:
    """:meth:`Genome.fetch` served from one cached block of a chromosome: the windows of a sorted
    VCF's nearby variants become slices of a region read once (windows overlap by ~99%, docs/spec.md §3.2).

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
