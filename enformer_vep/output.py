"""Per-chromosome HDF5 files in the Basenji layout (docs/spec.md §6.1), ``skipped.tsv``, and
finding a variant in a finished run.

Files are written in fixed row blocks, whatever their sources' sizes, so the same rows give
byte-identical files (after a resume, and after ``merge`` of shards). How a run stages its
rows and publishes these files is :mod:`enformer_vep.rundir`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from .atomic import atomic_path, atomic_write
from .errors import InputError
from .scoring import GENE_STATISTICS, STATISTICS
from .targets import Targets
from .text import from_bytes, to_bytes

# Basenji's quantiles: 99 + 80 + 100 = 279 levels
PERCENTILES = np.concatenate([np.arange(0.001, 0.1, 0.001), np.arange(0.1, 0.9, 0.01), np.arange(0.9, 1, 0.001)])
ROW_CHUNK = 64  # HDF5 chunk rows: reading one variant's tracks touches one chunk
WRITE_ROWS = 64 * ROW_CHUNK  # rows per HDF5 write: whole chunks, the same for every source layout
ROW_FIELDS = ("snp", "chr", "pos", "ref", "alt")
GENE_FIELDS = ("gene_id", "gene_name", "gene_type", "strand")  # byte strings of a genes file
GENE_NUMBERS = {"si": np.uint32, "tss_distance": np.int32, "n_tss": np.uint16}
SKIPPED_COLUMNS = ("chrom", "pos", "id", "ref", "alt", "reason", "record")


def byte_strings(values: Iterable[str]) -> np.ndarray:
    """Fixed-width bytes ``S``, the string layout of every HDF5 file we write: UTF-8, and a VCF's
    bytes that are not UTF-8 as they were (enformer_vep.text)."""
    encoded = [to_bytes(v) for v in values]
    return np.array(encoded, dtype=f"S{max([1] + [len(v) for v in encoded])}")


def write_skipped(path: Path, lines: Iterable[str]) -> dict[str, int]:
    """``skipped.tsv`` from its data lines (without header), atomically; returns the count per reason."""
    counts: dict[str, int] = {}

    def write(f):
        f.write(("\t".join(SKIPPED_COLUMNS) + "\n").encode())
        for line in lines:
            reason = line.split("\t")[5].split(" (")[0]
            counts[reason] = counts.get(reason, 0) + 1
            f.write(to_bytes(line) + b"\n")

    atomic_write(path, write)
    return dict(sorted(counts.items()))


class _RowWriter:
    """Writes rows to the datasets in fixed blocks of :data:`WRITE_ROWS` rows (whole HDF5 chunks),
    so the file's bytes do not depend on how the rows arrive."""

    def __init__(self, datasets: Mapping[str, h5py.Dataset]):
        self.datasets, self.buffer, self.buffered, self.start = datasets, {k: [] for k in datasets}, 0, 0

    def add(self, piece: Mapping[str, np.ndarray]) -> None:
        for name, values in piece.items():
            self.buffer[name].append(values)
        self.buffered += len(next(iter(piece.values())))
        if self.buffered >= WRITE_ROWS:
            self.flush(WRITE_ROWS * (self.buffered // WRITE_ROWS))

    def flush(self, rows: int | None = None) -> None:
        rows = self.buffered if rows is None else rows
        for name, parts in self.buffer.items():
            values = np.concatenate(parts) if len(parts) > 1 else parts[0]
            self.datasets[name][self.start:self.start + rows] = values[:rows]
            self.buffer[name] = [values[rows:]]
        self.start += rows
        self.buffered -= rows


def write_scores(path: Path, sources: Sequence, targets: Targets, stats: Sequence[str], attrs: Mapping, *,
                 percentiles: bool, tmp_dir: Path) -> None:
    """One chromosome's file at ``path`` from ``sources`` (each with ``size``, ``widths``, ``clipped``
    and ``pieces()`` yielding row arrays), built under a temporary name in ``tmp_dir`` and renamed."""
    n, n_tracks = sum(s.size for s in sources), len(targets)
    widths = {f: max([1] + [s.widths[f] for s in sources if s.size]) for f in ("snp", "chr", "ref", "alt")}
    with atomic_path(path, tmp_dir) as tmp, h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
        for key, value in sorted(attrs.items()):
            f.attrs[key] = value
        datasets = {field: f.create_dataset(field, (n,), dtype=np.uint32 if field == "pos" else f"S{widths[field]}",
                                            track_times=False) for field in ROW_FIELDS}
        for name in stats:
            datasets[name] = f.create_dataset(name, (n, n_tracks), dtype=np.float16,
                                              chunks=(min(n, ROW_CHUNK), n_tracks), compression="gzip",
                                              compression_opts=4, shuffle=True, track_times=False)
            datasets[name].attrs["formula"] = STATISTICS[name]
            datasets[name].attrs["clipped"] = sum(s.clipped[name] for s in sources if s.size)
        writer = _RowWriter(datasets)
        for source in sources:
            if source.size:
                for piece in source.pieces():
                    writer.add(piece)
        writer.flush()
        f.create_dataset("target_ids", data=byte_strings(targets.ids), track_times=False)
        f.create_dataset("target_labels", data=byte_strings(targets.labels), track_times=False)
        f["ref_allele"] = h5py.SoftLink("/ref")  # Basenji's own names for the alleles
        f["alt_allele"] = h5py.SoftLink("/alt")
        if percentiles:
            _write_percentiles(f, stats)


def genes_file(variant_file: Path) -> Path:
    """The genes file ``PREFIX.CHROM.genes.h5`` beside a variant file ``PREFIX.CHROM.h5``."""
    return variant_file.with_name(variant_file.name[:-len(".h5")] + ".genes.h5")


def write_gene_scores(path: Path, sources: Sequence[tuple[int, object]], targets: Targets, stats: Sequence[str],
                      attrs: Mapping, *, tmp_dir: Path) -> None:
    """One chromosome's genes file (docs/spec.md §6.1.1) at ``path`` from ``(row offset, source)`` pairs:
    each source has ``size`` (pairs), ``widths`` (of :data:`GENE_FIELDS`), ``clipped`` and ``pieces()``
    yielding its rows with ``si`` counted from its own first variant row, to which ``row offset`` (that
    row's index in the chromosome's variant file) is added. Fixed row blocks: byte-identical files
    whatever the sources."""
    n, n_tracks = sum(s.size for _, s in sources), len(targets)
    widths = {f: max([1] + [s.widths[f] for _, s in sources if s.size]) for f in GENE_FIELDS}
    with atomic_path(path, tmp_dir) as tmp, h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
        for key, value in sorted(attrs.items()):
            f.attrs[key] = value
        datasets = {field: f.create_dataset(field, (n,), dtype=dtype, track_times=False)
                    for field, dtype in GENE_NUMBERS.items()}
        datasets.update({field: f.create_dataset(field, (n,), dtype=f"S{widths[field]}", track_times=False)
                         for field in GENE_FIELDS})
        for name in stats:
            datasets[name] = f.create_dataset(name, (n, n_tracks), dtype=np.float16,
                                              chunks=(max(1, min(n, ROW_CHUNK)), n_tracks), compression="gzip",
                                              compression_opts=4, shuffle=True, track_times=False)
            datasets[name].attrs["formula"] = GENE_STATISTICS[name]
            datasets[name].attrs["clipped"] = sum(s.clipped[name] for _, s in sources if s.size)
        writer = _RowWriter(datasets)
        for offset, source in sources:
            if source.size:
                for piece in source.pieces():
                    writer.add(piece | {"si": (piece["si"].astype(np.int64) + offset).astype(np.uint32)})
        if writer.buffered:
            writer.flush()
        f.create_dataset("target_ids", data=byte_strings(targets.ids), track_times=False)
        f.create_dataset("target_labels", data=byte_strings(targets.labels), track_times=False)


def _write_percentiles(f: h5py.File, stats: Sequence[str], max_block_bytes: int = 1 << 29) -> None:
    """``percentiles`` [279] and ``<STAT>_pct`` [T, 279]: per-track quantiles over all rows."""
    f.create_dataset("percentiles", data=PERCENTILES, track_times=False)
    for name in stats:
        data = f[name]
        n, n_tracks = data.shape
        block = max(1, max_block_bytes // (4 * n))  # tracks per pass: bounded memory
        pct = np.empty((n_tracks, len(PERCENTILES)), np.float16)
        for start in range(0, n_tracks, block):
            values = data[:, start:start + block].astype(np.float32)
            pct[start:start + block] = np.percentile(values, 100 * PERCENTILES, axis=0).T
        f.create_dataset(f"{name}_pct", data=pct, track_times=False)


def find_variant(out_dir: str | Path, key: str) -> dict:
    """The row of a finished run whose ``snp`` (VCF ID) is ``key``, or whose ``chr:pos`` or
    ``chr:pos:ref:alt`` is; the first in VCF order. Returns ``chrom, pos, ref, alt, snp`` and its
    statistics ``{name: [T] float32}`` with ``target_ids``."""
    from .rundir import verify_done

    done = verify_done(Path(out_dir))
    parts = key.split(":")
    for name, entry in done["files"].items():
        if "chrom" not in entry:  # skipped.tsv, genes files
            continue
        with h5py.File(Path(out_dir) / name, "r") as f:
            snp = np.array([from_bytes(s) for s in f["snp"][:]], dtype=object)
            hit = np.flatnonzero(snp == key)
            if not len(hit) and len(parts) in (2, 4) and parts[1].isdigit():
                match = (np.char.decode(f["chr"][:]) == parts[0]) & (f["pos"][:] == int(parts[1]))
                if len(parts) == 4:
                    match &= (np.char.decode(f["ref"][:]) == parts[2].upper()) & \
                             (np.char.decode(f["alt"][:]) == parts[3].upper())
                hit = np.flatnonzero(match)
            if len(hit):
                i = int(hit[0])
                stats = {s: f[s][i].astype(np.float32) for s in STATISTICS if s in f}
                return {"chrom": f["chr"][i].decode(), "pos": int(f["pos"][i]), "ref": f["ref"][i].decode(),
                        "alt": f["alt"][i].decode(), "snp": snp[i], "stats": stats,
                        "target_ids": [t.decode() for t in f["target_ids"][:]]}
    raise InputError(f"no variant {key!r} in {out_dir} (give its VCF ID, chr:pos or chr:pos:ref:alt)")
