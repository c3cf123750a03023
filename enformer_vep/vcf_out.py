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
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import h5py
import numpy as np

from .errors import InputError
from .tabix import bgzip_and_index
from .variants import open_records

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


def _strongest(path: Path) -> Iterator[tuple[tuple[int, str, str], list[str]]]:
    """((pos, ref, alt), INFO values per family [SAD, TRACK, SAD, TRACK...]) of a file's rows, in order."""
    with h5py.File(path, "r") as f:
        ids = [t.decode() for t in f["target_ids"][:]]
        families = assay_families([t.decode() for t in f["target_labels"][:]])
        for start in range(0, len(f["pos"]), BLOCK_ROWS):
            sad = f["SAD"][start:start + BLOCK_ROWS].astype(np.float32)
            keys = zip(f["pos"][start:start + BLOCK_ROWS].tolist(),
                       (r.decode() for r in f["ref"][start:start + BLOCK_ROWS]),
                       (a.decode() for a in f["alt"][start:start + BLOCK_ROWS]))
            best = {name: cols[np.abs(sad[:, cols]).argmax(axis=1)] for name, cols in families.items()}
            for row, key in enumerate(keys):
                values = []
                for name in families:
                    column = best[name][row]
                    values += [f"{sad[row, column]:.4g}", ids[column]]
                yield key, values


def info_header(labels: Sequence[str]) -> list[str]:
    lines = []
    for name in assay_families(labels):
        lines.append(f'##INFO=<ID=ENFORMER_{name}_SAD,Number=A,Type=Float,Description="enformer-vep: SAD '
                     f'(sum over bins of alt - ref predictions) of the {name} track with the largest |SAD| for '
                     f'this ALT allele">')
        lines.append(f'##INFO=<ID=ENFORMER_{name}_TRACK,Number=A,Type=String,Description="enformer-vep: '
                     f'identifier of the {name} track in ENFORMER_{name}_SAD">')
    return lines


def write_annotated_vcf(vcf: str, files: Mapping[str, Path], dest: str | Path, *, regions: Sequence[str] = (),
                        chroms: Sequence[str] = ()) -> Path:
    """``dest`` (.vcf.gz, with .tbi): the records of ``vcf`` that the run read (``regions``/``chroms`` as
    in the run) with INFO fields from the run's per-chromosome ``files`` ``{chrom: path}``."""
    dest = Path(dest)
    if not dest.name.endswith(".gz"):
        raise InputError(f"--vcf-out {dest}: the annotated VCF is bgzip-compressed; name it .vcf.gz")
    labels, per_file = None, {}
    for chrom, path in files.items():
        with h5py.File(path, "r") as f:
            if "SAD" not in f:
                raise InputError("--vcf-out needs SAD among --stats")
            labels = labels or [t.decode() for t in f["target_labels"][:]]
        per_file[chrom] = _strongest(Path(path))
    if labels is None:
        raise InputError("--vcf-out: no variant was scored")
    names = [f"ENFORMER_{name}_{kind}" for name in assay_families(labels) for kind in ("SAD", "TRACK")]
    n_fields = len(names)
    pending = {chrom: next(rows, None) for chrom, rows in per_file.items()}
    plain = dest.with_name(f"{dest.name}.{os.getpid()}.tmp.vcf")
    handle, records = open_records(vcf, regions=regions, chroms=chroms)
    try:
        with open(plain, "w") as out:
            header = handle.raw_header.splitlines(keepends=True)
            out.writelines(header[:-1] + [line + "\n" for line in info_header(labels)] + header[-1:])
            for rec in records:
                values = [[] for _ in range(n_fields)]
                for alt in rec.ALT or ["."]:
                    nxt = pending.get(rec.CHROM)
                    if nxt is not None and nxt[0] == (rec.POS, rec.REF.upper(), alt.upper()):
                        found = nxt[1]
                        pending[rec.CHROM] = next(per_file[rec.CHROM], None)
                    else:  # skipped allele: no row
                        found = ["."] * n_fields
                    for field, value in zip(values, found):
                        field.append(value)
                out.write(_with_info(str(rec), names, values))
    finally:
        handle.close()
    unmatched = [chrom for chrom, nxt in pending.items() if nxt is not None]
    if unmatched:
        plain.unlink()
        raise InputError(f"--vcf-out: scored rows of {unmatched[0]} do not match the records of {vcf}; "
                         "was the VCF changed during the run?")
    return bgzip_and_index(plain, dest, preset="vcf")


def _with_info(line: str, names: Sequence[str], values: list[list[str]]) -> str:
    """The VCF line with ``NAME=v1,v2`` added to its INFO column (our keys replace any already there)."""
    fields = line.rstrip("\n").split("\t")
    kept = [] if fields[7] == "." else [kv for kv in fields[7].split(";") if kv.split("=", 1)[0] not in names]
    if any(v != "." for field in values for v in field):
        kept += [f"{name}={','.join(field)}" for name, field in zip(names, values)]
    fields[7] = ";".join(kept) or "."
    return "\t".join(fields) + "\n"
