"""``--vcf-out``: the input VCF with each ALT allele's strongest effect per assay family in INFO.

For every assay family (the part of a track description before ':', e.g. CAGE, DNASE, CHIP),
an allele gets ``ENFORMER_<FAMILY>_SAD``, the SAD of the family's track with the largest
|SAD|, and ``ENFORMER_<FAMILY>_TRACK``, that track's identifier (both Number=A; '.' for an
allele that was not scored). With genes scored (``--genes``), ``ENFORMER_GENE`` and
``ENFORMER_GENE_logSED`` name the allele's gene with the largest |logSED| over the CAGE tracks
(all tracks when none is CAGE) and give that logSED. Values come from the finished HDF5 files,
matched to the VCF's alleles in order; the result is bgzip-compressed and tabix-indexed.
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
from .output import genes_file
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


def strongest_genes(path: Path, rows: int) -> tuple[list[str], np.ndarray] | None:
    """Per row of the variant file ``path``: the name of its gene with the largest |logSED| over the CAGE
    tracks (all tracks when none is CAGE; the first such gene on a tie) and that logSED (``'.'`` and NaN
    for a row without genes); None when the run has no genes file with logSED. Reads blocks of rows."""
    source = genes_file(path)
    if not source.is_file():
        return None
    with h5py.File(source, "r") as f:
        if "logSED" not in f:
            return None
        columns = assay_families([t.decode() for t in f["target_labels"][:]]).get("CAGE")
        columns = np.arange(f["logSED"].shape[1]) if columns is None else columns
        si, strength, value = [], [], []
        for start in range(0, len(f["si"]), BLOCK_ROWS):
            block = f["logSED"][start:start + BLOCK_ROWS][:, columns].astype(np.float32)
            best = np.abs(block).argmax(axis=1)
            chosen = block[np.arange(len(block)), best]
            si.append(f["si"][start:start + BLOCK_ROWS].astype(np.int64))
            strength.append(np.abs(chosen))
            value.append(chosen)
        si, strength, value = (np.concatenate(a) if a else np.empty(0) for a in (si, strength, value))
        order = np.lexsort((np.arange(len(si)), -strength, si))  # per row: strongest first, then gene order
        rows_with_genes, first = np.unique(si[order], return_index=True)
        winners = order[first]
        names = f["gene_name"][np.sort(winners)] if len(winners) else np.empty(0, "S1")
        name_of = dict(zip(np.sort(winners).tolist(), (n.decode() for n in names), strict=True))
    gene = ["."] * rows
    logsed = np.full(rows, np.nan, np.float32)
    for row, pair in zip(rows_with_genes.tolist(), winners.tolist(), strict=True):
        gene[row], logsed[row] = name_of[pair], value[pair]
    return gene, logsed


def _strongest(path: Path) -> Iterator[tuple[tuple[int, str, str], list]]:
    """((pos, ref, alt), INFO values per family [SAD, TRACK, SAD, TRACK...], then [GENE, logSED] with genes)
    of a file's rows, in order."""
    with h5py.File(path, "r") as f:
        genes = strongest_genes(path, len(f["pos"]))
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
                if genes is not None:
                    name, logsed = genes[0][start + row], genes[1][start + row]
                    values += [name, None if name == "." else float(f"{logsed:.4g}")]
                yield key, values


PROVENANCE = ("enformer_vep_version", "model_source", "model_sha256", "fasta", "fasta_index_sha256", "annotation",
              "annotation_sha256", "options")


def provenance_header(attrs: Mapping) -> list[str]:
    """``##enformer_vep_<key>=value`` meta lines of the scores' provenance (the HDF5 file attributes):
    version, model source and SHA-256, FASTA and its index checksum, the run's options (JSON)."""
    lines = []
    for key in PROVENANCE:
        if key in attrs:
            value = attrs[key].decode() if isinstance(attrs[key], bytes) else str(attrs[key])
            lines.append(f"##{key if key.startswith('enformer_vep') else 'enformer_vep_' + key}={value}")
    return lines


def info_header(labels: Sequence[str], genes: bool = False) -> list[str]:
    lines = []
    for name in assay_families(labels):
        lines.append(f'##INFO=<ID=ENFORMER_{name}_SAD,Number=A,Type=Float,Description="enformer-vep: SAD '
                     f'(sum over bins of alt - ref predictions) of the {name} track with the largest |SAD| for '
                     f'this ALT allele">')
        lines.append(f'##INFO=<ID=ENFORMER_{name}_TRACK,Number=A,Type=String,Description="enformer-vep: '
                     f'identifier of the {name} track in ENFORMER_{name}_SAD">')
    if genes:
        lines.append('##INFO=<ID=ENFORMER_GENE,Number=A,Type=String,Description="enformer-vep: the gene (TSS '
                     'among the output bins) with the largest |logSED| over CAGE tracks for this ALT allele">')
        lines.append('##INFO=<ID=ENFORMER_GENE_logSED,Number=A,Type=Float,Description="enformer-vep: logSED '
                     '(log2(sum of alt over the TSS bins + 1) - log2(sum of ref + 1)) of ENFORMER_GENE, at its '
                     'track of largest |logSED|">')
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
    labels, per_file, provenance, with_genes = None, {}, [], False
    for chrom, path in files.items():
        with h5py.File(path, "r") as f:
            if "SAD" not in f:
                raise InputError("--vcf-out needs SAD among --stats")
            labels = labels or [t.decode() for t in f["target_labels"][:]]
            provenance = provenance or provenance_header(f.attrs)
        if genes_file(Path(path)).is_file():
            with h5py.File(genes_file(Path(path)), "r") as f:
                with_genes = with_genes or "logSED" in f
        per_file[chrom] = _strongest(Path(path))
    if labels is None:
        raise InputError("--vcf-out: no variant was scored")
    names = [f"ENFORMER_{name}_{kind}" for name in assay_families(labels) for kind in ("SAD", "TRACK")]
    names += ["ENFORMER_GENE", "ENFORMER_GENE_logSED"] if with_genes else []
    missing = [None if name.endswith(("_SAD", "_logSED")) else "." for name in names]
    pending = {chrom: next(rows, None) for chrom, rows in per_file.items()}
    plain = dest.with_name(f"{dest.name}.{os.getpid()}.tmp.vcf")
    try:
        reader = pysam.VariantFile(vcf)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {vcf}: {error}") from None
    try:
        header = reader.header.copy()
        for line in provenance + info_header(labels, with_genes):
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
