"""Stream the alleles to score from a VCF, VCF.gz (bgzip) or BCF, in constant memory.

:func:`read_variants` yields one :class:`Allele` per scorable ALT allele and one
:class:`Skip` for every allele (or ALT-less record) it will not score, so nothing is
dropped silently. Records come from cyvcf2 one at a time, either the whole file in
order or, for ``regions``/``chroms``, through the file's ``.tbi``/``.csi`` index.
"""
from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import re
import warnings
import zlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import cyvcf2.cyvcf2
from cyvcf2 import VCF

from .errors import InputError, preview
from .text import from_bytes
from .vcf_index import check_vcf_index

NO_ALT, SYMBOLIC, INVALID, NOT_PASS, UNKNOWN_CONTIG = SKIP_REASONS = (
    "no ALT allele", "symbolic allele", "invalid allele", "not PASS", "contig not in FASTA")

#: ``end`` of a region that runs to the end of its contig (largest VCF/BCF position).
CONTIG_END = 2**31 - 1

_BASES = frozenset("ACGTN")
_MITO = ("chrM", "MT", "chrMT", "M")
# gVCF placeholders for "any other allele": a record whose only ALT is one of them has no real ALT.
_NON_REF = frozenset(("<NON_REF>", "<*>"))
_COORDS = re.compile(r"(?P<start>\d+)(?:-(?P<end>\d*))?")
_CONTIG_LINE = re.compile(r"^##contig=<(.*)>\s*$", re.M)
_HEADER_FIELD = re.compile(r'([A-Za-z_]\w*)=("[^"]*"|[^,]*)')


@dataclass(frozen=True, slots=True)
class Allele:
    """One ALT allele to score (a multi-allelic record gives one per ALT, in ALT order)."""

    chrom: str        # contig as written in the VCF
    fasta_chrom: str  # the FASTA contig it resolves to
    pos: int          # 1-based VCF POS
    id: str           # VCF ID (its bytes: enformer_vep.text), or "chrom:pos" when missing
    ref: str          # REF, upper case
    alt: str          # this ALT, upper case
    record: int       # 0-based ordinal of the record in this stream


@dataclass(frozen=True, slots=True)
class Skip:
    """An allele not scored, or one row for a record with no usable ALT (``alt`` '.').

    ``ref``/``alt`` are as written in the VCF; ``reason`` is one of :data:`SKIP_REASONS`.
    """

    chrom: str
    pos: int
    id: str
    ref: str
    alt: str
    reason: str
    record: int


def resolve_contig(vcf_name: str, fasta_contigs: Collection[str]) -> str | None:
    """The FASTA contig that ``vcf_name`` denotes, or None.

    An exact match wins; otherwise the name with the ``chr`` prefix added or removed
    ('chr1' <-> '1'), and for mitochondria any of chrM, MT, chrMT, M.
    """
    if vcf_name in fasta_contigs:
        return vcf_name
    if vcf_name in _MITO:
        candidates: Iterable[str] = _MITO
    elif vcf_name.startswith("chr"):
        candidates = (vcf_name[3:],)
    else:
        candidates = ("chr" + vcf_name,)
    return next((name for name in candidates if name in fasta_contigs), None)


def parse_region(text: str) -> tuple[str, int, int]:
    """Parse 'chr1:1,000-2,000' into ('chr1', 1000, 2000): 1-based, inclusive.

    Also 'chr1' (whole contig), 'chr1:1000-' (to the contig end) and 'chr1:1000'
    (that one position, as in bcftools); a whole or open-ended region ends at
    :data:`CONTIG_END`. Commas in numbers are allowed. The text after the last ':' is
    always read as coordinates, so a contig whose name has a ':' needs them.
    """
    text = text.strip()
    chrom, colon, coords = text.rpartition(":")
    if not colon:
        chrom, start, end = text, 1, CONTIG_END
    else:
        match = _COORDS.fullmatch(coords.replace(",", ""))
        if match is None:
            raise InputError(f"malformed region {text!r}: expected CHROM, CHROM:START-END, CHROM:START- "
                             "or CHROM:POS")
        start = int(match["start"])
        end = start if match["end"] is None else int(match["end"] or CONTIG_END)
    if not chrom or any(c.isspace() for c in chrom):
        raise InputError(f"malformed region {text!r}: the contig name is empty or has spaces")
    if start < 1:
        raise InputError(f"malformed region {text!r}: positions are 1-based")
    if start > end:
        raise InputError(f"malformed region {text!r}: start {start:,} is after end {end:,}")
    return chrom, start, end


def read_variants(path, fasta_contigs: Collection[str], *, regions: Sequence[str] = (),
                  chroms: Sequence[str] = (), pass_only: bool = False) -> Iterator[Allele | Skip]:
    """Stream the alleles of a VCF/VCF.gz/BCF as :class:`Allele` and :class:`Skip` rows.

    Parameters
    ----------
    path : str or PathLike
        The VCF, VCF.gz (bgzip) or BCF.
    fasta_contigs : collection of str
        The reference's contig names; VCF contigs resolve to them with :func:`resolve_contig`.
    regions : sequence of str
        ``CHR:START-END`` (see :func:`parse_region`), through the ``.tbi``/``.csi`` index (checked
        against the file first); overlaps are merged, records come in VCF order, each once.
    chroms : sequence of str
        Whole contigs, likewise. Both accept the VCF's or the FASTA's naming.
    pass_only : bool
        Skip records whose FILTER is neither PASS nor '.'.

    Returns
    -------
    iterator of Allele or Skip
        One :class:`Allele` per scorable ALT allele, one :class:`Skip` for every other allele (or
        ALT-less record), in VCF order; text fields keep their bytes (enformer_vep.text).

    Raises
    ------
    InputError
        Raised before this returns for a missing, unreadable or malformed file or header, a
        missing or stale index, an unknown region contig, or no VCF contig in the FASTA; raised
        when the stream reaches it for a malformed or truncated record.
    """
    path = os.fspath(path)
    fasta_names = list(fasta_contigs)
    fasta = frozenset(fasta_names)
    vcf, records = open_records(path, regions=regions, chroms=chroms)
    try:
        # For an indexed VCF.gz whose header declares no contigs, htslib takes them from the index.
        header_contigs = [rec.info()["ID"] for rec in vcf.header_iter() if rec.type == "CONTIG"]
        if header_contigs and not any(resolve_contig(name, fasta) for name in header_contigs):
            raise InputError(_no_match_message(header_contigs, fasta_names))
    except BaseException:
        vcf.close()
        raise
    check = None if header_contigs else fasta_names
    return _alleles(vcf, records, fasta, pass_only, check_contigs=check, path=path)


def contig_length_differences(path, fasta_contigs: dict[str, int]) -> list[dict]:
    """Contigs of the VCF header whose declared ``length`` differs from the FASTA contig they resolve
    to (same name or alias): ``[{"vcf": name, "vcf_length": n, "fasta": name, "fasta_length": n}]``.
    Not an error (a FASTA slice is legitimate), but a sign of another assembly (GRCh37 ``MT`` is the
    16,569-bp rCRS, hg19 ``chrM`` a 16,571-bp other sequence)."""
    vcf = open_vcf(path)
    try:
        header = vcf.raw_header
    finally:
        vcf.close()
    out = []
    for match in _CONTIG_LINE.finditer(header):
        fields = dict(_HEADER_FIELD.findall(match[1]))
        name, length = fields.get("ID"), fields.get("length", "")
        fasta_name = resolve_contig(name, fasta_contigs) if name else None
        if fasta_name is not None and length.isdigit() and int(length) != fasta_contigs[fasta_name]:
            out.append({"vcf": name, "vcf_length": int(length), "fasta": fasta_name,
                        "fasta_length": fasta_contigs[fasta_name]})
    return out


def canonical_selection(path, regions: Sequence[str] = (), chroms: Sequence[str] = ()) -> list[str]:
    """What ``regions`` and ``chroms`` select, as merged spans in the VCF's contig naming and order
    (``chr1:100-2000``; a whole contig as ``chr1``), so that two selections of the same records
    (``1:100-2000`` and ``chr1:100-2000``, or overlapping pieces) read alike."""
    spans = [parse_region(text) for text in regions] + [(name, 1, CONTIG_END) for name in chroms]
    if not spans:
        return []
    vcf = open_vcf(path)
    try:
        names = list(vcf.seqnames)
    finally:
        vcf.close()
    return [name if (start, end) == (1, CONTIG_END) else f"{name}:{start}-{end}"
            for name, start, end in merge_spans(spans, names, path)]


def open_records(path, *, regions: Sequence[str] = (), chroms: Sequence[str] = ()) -> tuple[VCF, Iterator]:
    """The open file and its cyvcf2 records: all in file order, or those whose POS lies in
    ``regions``/``chroms`` (through the index, overlaps merged, in VCF order)."""
    path = os.fspath(path)
    if isinstance(regions, str):
        regions = (regions,)
    if isinstance(chroms, str):
        chroms = (chroms,)
    spans = [parse_region(text) for text in regions] + [(name, 1, CONTIG_END) for name in chroms]
    vcf = open_vcf(path)
    try:
        if spans:
            _check_indexed(path)
            check_vcf_index(path, list(vcf.seqnames))
            return vcf, _query(vcf, merge_spans(spans, vcf.seqnames, path))
        return vcf, iter(vcf)
    except BaseException:
        vcf.close()
        raise


def open_vcf(path: str) -> VCF:
    """cyvcf2's reader of ``path``; a missing, unreadable or malformed file is an :class:`InputError`
    naming the file and the problem (htslib only prints its reason and raises a bare Exception)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"VCF file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"expected a VCF file, got a directory: {path}")
    try:
        return VCF(path, lazy=True)
    except Exception as exc:  # noqa: BLE001 - cyvcf2 raises bare Exceptions for htslib errors
        raise InputError(f"cannot read {path}: {header_problem(path)}") from exc


_FIXED_COLUMNS = ["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO"]


def header_problem(path: str) -> str:
    """Why htslib refuses the header of ``path``, as far as it can be told from the text."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as handle:
                magic = handle.read(4)
        if magic[:3] == b"BCF":
            return "its BCF header is truncated or corrupt"
        opener = gzip.open if _sniff(path) != "plain" else open
        with opener(path, "rb") as handle:
            lines = []
            for line in handle:
                if not line.startswith(b"#"):
                    break
                lines.append(line.rstrip(b"\r\n"))
    except (OSError, EOFError, zlib.error) as exc:
        return f"it is not a readable VCF or BCF file ({exc})"
    if not lines or not lines[0].startswith(b"##fileformat=VCF"):
        return "it is not a VCF: the first line is not ##fileformat=VCFv4.x"
    chrom_line = next((line for line in lines if line.startswith(b"#CHROM")), None)
    if chrom_line is None:
        return "its header has no #CHROM line"
    columns = from_bytes(chrom_line).split("\t")
    if columns[:8] != _FIXED_COLUMNS:
        if len(columns) == 1 and len(columns[0].split()) >= 8:
            return "its #CHROM header line is separated by spaces instead of tabs"
        return "its #CHROM header line does not start with the 8 tab-separated columns " + " ".join(_FIXED_COLUMNS)
    samples = columns[9:]
    if len(columns) > 8 and columns[8] != "FORMAT":
        return f"the 9th column of its #CHROM line is {columns[8]!r}, not FORMAT"
    repeated = next((name for i, name in enumerate(samples) if name in samples[:i]), None)
    if repeated is not None:
        return f"its #CHROM line repeats the sample name {repeated!r}"
    return "htslib cannot parse its header (a ## line may be malformed; `bcftools view -h` shows htslib's reason)"


def _sniff(path: str) -> str:
    """'bgzf-vcf', 'bgzf-bcf', 'gzip' (plain, not bgzip) or 'plain'."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if head[:2] != b"\x1f\x8b":
        return "plain"
    # BGZF = gzip member with the FEXTRA flag and a 'BC' subfield right after the fixed header
    if len(head) < 18 or not head[3] & 4 or head[12:14] != b"BC":
        return "gzip"
    data = zlib.decompressobj(31).decompress(head, 8)
    return "bgzf-bcf" if data.startswith(b"BCF") else "bgzf-vcf"


def _check_indexed(path: str) -> None:
    kind = _sniff(path)
    if kind == "plain":
        raise InputError(f"regions need a bgzip-compressed, indexed VCF; {path} is not compressed: "
                         f"`enformer-score index {path}` writes {path}.gz and its index (as bgzip and tabix would)")
    if kind == "gzip":
        raise InputError(f"{path} is gzip- but not bgzip-compressed, so it cannot be indexed for regions: "
                         f"`enformer-score index {path}` recompresses it with bgzip and indexes it")
    is_bcf = kind == "bgzf-bcf"
    # cyvcf2 picks the index reader (tabix vs BCF) from the file name, and the wrong one returns nothing.
    if is_bcf != path.endswith(".bcf"):
        raise InputError(f"{path} holds {'BCF' if is_bcf else 'VCF'} data but is "
                         f"{'not ' if is_bcf else ''}named .bcf; rename it to use regions")
    if is_bcf and not os.path.exists(path + ".csi"):
        raise InputError(f"regions need an index, but {path}.csi does not exist: "
                         f"make one with `enformer-score index {path}` (or `bcftools index {path}`)")
    if not is_bcf and not (os.path.exists(path + ".tbi") or os.path.exists(path + ".csi")):
        raise InputError(f"regions need an index, but neither {path}.tbi nor {path}.csi exists: "
                         f"make one with `enformer-score index {path}` (or `tabix -p vcf {path}`)")


def merge_spans(spans: list[tuple[str, int, int]], vcf_contigs: list[str],
           path: str) -> list[tuple[str, int, int]]:
    """Resolve span contigs to the VCF's names, merge overlaps, and order them as the VCF is."""
    order = {name: i for i, name in enumerate(vcf_contigs)}
    by_contig: dict[str, list[tuple[int, int]]] = {}
    for chrom, start, end in spans:
        name = resolve_contig(chrom, order)
        if name is None:
            raise InputError(f"region contig {chrom!r} is not in {path} (it has {preview(vcf_contigs)})")
        by_contig.setdefault(name, []).append((start, end))
    merged = []
    for name in sorted(by_contig, key=order.__getitem__):
        spans_here = sorted(by_contig[name])
        cur_start, cur_end = spans_here[0]
        for start, end in spans_here[1:]:
            if start > cur_end + 1:
                merged.append((name, cur_start, cur_end))
                cur_start = start
            cur_end = max(cur_end, end)
        merged.append((name, cur_start, cur_end))
    return merged


def _query(vcf: VCF, spans: list[tuple[str, int, int]]) -> Iterator:
    for chrom, start, end in spans:
        records = vcf(f"{chrom}:{start}-{end}")
        with warnings.catch_warnings():
            # cyvcf2 warns when the index has no records on the contig: an empty region, not a fault.
            warnings.filterwarnings("ignore", message="no intervals found")
            first = next(records, None)
        if first is None:
            continue
        # The index returns records overlapping the span; keep those starting in it, so a record
        # is never in two disjoint spans.
        for rec in itertools.chain((first,), records):
            if start <= rec.POS <= end:
                yield rec


def _alleles(vcf: VCF, records: Iterator, fasta: frozenset[str], pass_only: bool, *,
             check_contigs: list[str] | None, path: str) -> Iterator[Allele | Skip]:
    """Rows for ``records``; with ``check_contigs`` (the FASTA's names, given when the header
    declares no contigs) fail at the end if no record's contig resolved."""
    resolved: dict[str, str | None] = {}
    n, last = 0, None
    try:
        while True:
            with _latin1_fields():
                try:
                    rec = next(records)
                except StopIteration:
                    break
                except Exception as exc:  # cyvcf2 raises a bare Exception for htslib parse/read errors
                    where = f"after {last[0]}:{last[1]}" if last else "at the first record"
                    raise InputError(f"malformed or truncated VCF record {where} (record {n + 1}, counting from "
                                     f"1) in {path}") from exc
                chrom, pos = _field(rec.CHROM), rec.POS
                if chrom not in resolved:
                    resolved[chrom] = resolve_contig(chrom, fasta)
                rows = list(_rows(rec, chrom, pos, resolved[chrom], pass_only, n))
            yield from rows
            n, last = n + 1, (chrom, pos)
    finally:
        vcf.close()
    if check_contigs is not None and resolved and not any(resolved.values()):
        raise InputError(_no_match_message(list(resolved), check_contigs))


@contextlib.contextmanager
def _latin1_fields():
    """cyvcf2 decodes text fields with its module's ENC (UTF-8, undecodable bytes replaced: lost).
    Latin-1 maps every byte to one character, so :func:`_field` recovers the bytes exactly."""
    saved = cyvcf2.cyvcf2.ENC
    cyvcf2.cyvcf2.ENC = "latin-1"
    try:
        yield
    finally:
        cyvcf2.cyvcf2.ENC = saved


def _field(value: str) -> str:
    """A text field read under :func:`_latin1_fields` as the package's text (enformer_vep.text)."""
    return from_bytes(value.encode("latin-1"))


def _rows(rec, chrom: str, pos: int, fasta_chrom: str | None, pass_only: bool,
          n: int) -> Iterator[Allele | Skip]:
    vid = _field(rec.ID) if rec.ID else f"{chrom}:{pos}"
    ref, alts = _field(rec.REF), [_field(alt) for alt in rec.ALT]
    if not alts or all(alt in _NON_REF for alt in alts):
        yield Skip(chrom, pos, vid, ref, ".", NO_ALT, n)
        return
    if fasta_chrom is None:
        record_reason = UNKNOWN_CONTIG
    elif pass_only and any(f != "PASS" for f in rec.FILTERS):
        record_reason = NOT_PASS
    else:
        record_reason = None
    ref_upper = ref.upper()
    ref_ok = _BASES.issuperset(ref_upper)
    for alt in alts:
        reason = record_reason or _allele_problem(alt, ref_ok)
        if reason:
            yield Skip(chrom, pos, vid, ref, alt, reason, n)
        else:
            yield Allele(chrom, fasta_chrom, pos, vid, ref_upper, alt.upper(), n)


def _allele_problem(alt: str, ref_ok: bool) -> str | None:
    if (alt.startswith("<") or alt == "*" or "[" in alt or "]" in alt
            or len(alt) > 1 and (alt.startswith(".") or alt.endswith("."))):
        return SYMBOLIC
    if not ref_ok or not _BASES.issuperset(alt.upper()):
        return INVALID
    return None


def _no_match_message(vcf_contigs: Sequence[str], fasta_contigs: Sequence[str]) -> str:
    return (f"no VCF contig matches the FASTA: VCF has {preview(vcf_contigs)}; "
            f"FASTA has {preview(fasta_contigs) or 'no contigs'}")
