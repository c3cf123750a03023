"""``--vcf-out``: the input VCF with each ALT allele's strongest effect per assay family in INFO.

For every assay family (the part of a track description before ':', e.g. CAGE, DNASE, CHIP),
an allele gets ``ENFORMER_<FAMILY>_SAD``, the SAD of the family's track with the largest
|SAD|, and ``ENFORMER_<FAMILY>_TRACK``, that track's identifier (both Number=A; '.' for an
allele that was not scored). Values come from the finished HDF5 files, matched to the VCF's
alleles in order; the result is bgzip-compressed and tabix-indexed.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pysam

from .errors import InputError
from .tabix import bgzip_and_index
from .variants import CONTIG_END, merge_spans, parse_region

BLOCK_ROWS = 4096


def assay_families(labels: Sequence[str]) -> dict[str, np.ndarray]:
    """``{family: column indices}`` in order of first appearance; the family is the description
    before ':' as an INFO-key-safe name (``CHIP`` for 'CHIP:H3K27ac:...', ``OTHER`` without ':')."""
    families: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        head = label.split(":", 1)[0] if ":" in label else "OTHER"
        name = re.sub(r"[^A-Za-z0-9_]", "_", head).upper() or "OTHER"
        families.setdefault(name, []).append(i)
    return {name: np.array(columns) for name, columns in families.items()}


def _strongest(path: Path) -> Iterator[tuple[tuple[int, str, str], list]]:
    """((pos, ref, alt), INFO values per family [SAD, TRACK, SAD, TRACK...]) of a file's rows, in order."""
    with h5py.File(path, "r") as f:
        ids = [t.decode() for t in f["target_ids"][:]]
        families = assay_families([t.decode() for t in f["target_labels"][:]])
        for start in range(0, len(f["pos"]), BLOCK_ROWS):
            sad = f["SAD"][start:start + BLOCK_ROWS].astype(np.float32)
            keys = zip(f["pos"][start:start + BLOCK_ROWS].tolist(),
                       (r.decode() for r in f["ref"][start:start + BLOCK_ROWS]),
                       (a.decode() for a in f["alt"][start:start + BLOCK_ROWS]), strict=True)
            best = {name: cols[np.abs(sad[:, cols]).argmax(axis=1)] for name, cols in families.items()}
            for row, key in enumerate(keys):
                values = []
                for name in families:
                    column = best[name][row]
                    values += [float(f"{sad[row, column]:.4g}"), ids[column]]
                yield key, values


PROVENANCE = ("enformer_vep_version", "model_source", "model_sha256", "fasta", "fasta_index_sha256", "options")


def provenance_header(attrs: Mapping) -> list[str]:
    """``##enformer_vep_<key>=value`` meta lines of the scores' provenance (the HDF5 file attributes):
    version, model source and SHA-256, FASTA and its index checksum, the run's options (JSON)."""
    lines = []
    for key in PROVENANCE:
        if key in attrs:
            value = attrs[key].decode() if isinstance(attrs[key], bytes) else str(attrs[key])
            lines.append(f"##{key if key.startswith('enformer_vep') else 'enformer_vep_' + key}={value}")
    return lines


def info_header(labels: Sequence[str]) -> list[str]:
    lines = []
    for name in assay_families(labels):
        lines.append(f'##INFO=<ID=ENFORMER_{name}_SAD,Number=A,Type=Float,Description="enformer-vep: SAD '
                     f'(sum over bins of alt - ref predictions) of the {name} track with the largest |SAD| for '
                     f'this ALT allele">')
        lines.append(f'##INFO=<ID=ENFORMER_{name}_TRACK,Number=A,Type=String,Description="enformer-vep: '
                     f'identifier of the {name} track in ENFORMER_{name}_SAD">')
    return lines


def check_vcf_out_path(dest: str | Path) -> Path:
    """``dest`` as a Path when it can take the annotated VCF (a ``.vcf.gz`` name in an existing
    directory), else :class:`InputError`: checked before a run starts, not after it."""
    dest = Path(dest)
    if not dest.name.endswith(".gz"):
        raise InputError(f"--vcf-out {dest}: the annotated VCF is bgzip-compressed; name it .vcf.gz")
    if not dest.parent.is_dir():
        raise InputError(f"--vcf-out {dest}: the directory {dest.parent} does not exist")
    return dest


def write_annotated_vcf(vcf: str, files: Mapping[str, Path], dest: str | Path, *, regions: Sequence[str] = (),
                        chroms: Sequence[str] = ()) -> Path:
    """``dest`` (.vcf.gz, with .tbi): the records of ``vcf`` that the run read (``regions``/``chroms`` as
    in the run) with INFO fields from the run's per-chromosome ``files`` ``{chrom: path}``.

    Records are copied by htslib (pysam), so every byte we do not set travels unchanged, also text
    that is not UTF-8. Raises :class:`InputError` for an unreadable VCF or rows that do not match it.
    """
    dest = check_vcf_out_path(dest)
    labels, per_file, provenance = None, {}, []
    for chrom, path in files.items():
        with h5py.File(path, "r") as f:
            if "SAD" not in f:
                raise InputError("--vcf-out needs SAD among --stats")
            labels = labels or [t.decode() for t in f["target_labels"][:]]
            provenance = provenance or provenance_header(f.attrs)
        per_file[chrom] = _strongest(Path(path))
    if labels is None:
        raise InputError("--vcf-out: no variant was scored")
    names = [f"ENFORMER_{name}_{kind}" for name in assay_families(labels) for kind in ("SAD", "TRACK")]
    missing = [None if name.endswith("_SAD") else "." for name in names]
    pending = {chrom: next(rows, None) for chrom, rows in per_file.items()}
    plain = dest.with_name(f"{dest.name}.{os.getpid()}.tmp.vcf")
    try:
        reader = pysam.VariantFile(vcf)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {vcf}: {error}") from None
    try:
        header = reader.header.copy()
        for line in provenance + info_header(labels):
            header.add_line(line)
        with pysam.VariantFile(str(plain), "w", header=header) as out:
            for rec in _records(reader, vcf, regions, chroms):
                rec.translate(out.header)
                values = [[] for _ in names]
                for alt in rec.alts or (".",):
                    nxt = pending.get(rec.chrom)
                    if nxt is not None and nxt[0] == (rec.pos, rec.ref.upper(), alt.upper()):
                        found = nxt[1]
                        pending[rec.chrom] = next(per_file[rec.chrom], None)
                    else:  # skipped allele: no row; missing values ('.')
                        found = missing
                    for field, value in zip(values, found, strict=True):
                        field.append(value)
                scored = any(v not in (None, ".") for field in values for v in field)
                for name, field in zip(names, values, strict=True):  # ours replace any fields of these names
                    if scored:
                        rec.info[name] = tuple(field)
                    elif name in rec.info:
                        del rec.info[name]
                out.write(rec)
        unmatched = [chrom for chrom, nxt in pending.items() if nxt is not None]
        if unmatched:
            raise InputError(f"--vcf-out: scored rows of {unmatched[0]} do not match the records of {vcf}; "
                             "was the VCF changed during the run?")
    except BaseException:
        plain.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    return bgzip_and_index(plain, dest, preset="vcf")


def _records(reader: pysam.VariantFile, vcf: str, regions: Sequence[str], chroms: Sequence[str]) -> Iterator:
    """The records the run read: all, or those whose POS lies in ``regions``/``chroms`` (through the
    index, merged as the run merged them). A malformed record is an :class:`InputError`."""
    spans = [parse_region(text) for text in regions] + [(name, 1, CONTIG_END) for name in chroms]
    try:
        if not spans:
            yield from reader
            return
        for chrom, start, end in merge_spans(spans, list(reader.index.keys()), vcf):
            for rec in reader.fetch(chrom, start - 1, end):
                if start <= rec.pos <= end:
                    yield rec
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {vcf}: {error}") from None
