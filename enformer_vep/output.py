"""Per-chromosome HDF5 files in the Basenji layout (SPEC §5), written so that no torn file is ever trusted.

Scored rows are staged in ``OUT/.partial/`` as numbered chunk files, each written to a
temporary name and renamed when complete; a rerun of the same command reuses the chunks
that exist and scores the rest. When every row is staged, each chromosome's HDF5 file is
assembled from its chunks under a temporary name and renamed into place, so the final
files are identical whether or not the run was interrupted. ``OUT/run.json`` records what
the run was made with; a rerun with different options is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from .errors import InputError
from .scoring import STATISTICS
from .targets import Targets
from .variants import Allele, Skip

# Basenji's quantiles: 99 + 80 + 100 = 279 levels
PERCENTILES = np.concatenate([np.arange(0.001, 0.1, 0.001), np.arange(0.1, 0.9, 0.01), np.arange(0.9, 1, 0.001)])
ROW_CHUNK = 64  # HDF5 chunk rows: reading one variant's tracks touches one chunk
_ROW_FIELDS = ("snp", "chr", "pos", "ref", "alt")


def _safe(name: str) -> str:
    """A file-name form of a contig name; names that had to change get a hash so none collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return safe if safe == name else f"{safe}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _fsync_write(path: Path, write) -> None:
    """Write through ``write(file)`` to a temporary name, fsync, then rename: all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDirectory:
    """The output directory of one scoring run: staged chunks, final files, provenance."""

    def __init__(self, out_dir: str | Path, prefix: str, fingerprint: Mapping, *, overwrite: bool = False):
        self.out = Path(out_dir)
        self.prefix = prefix
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.work = self.out / ".partial"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".enformer-vep-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise InputError(f"cannot write to output directory {self.out}: {error.strerror or error}") from None
        if overwrite:
            self._clear()
        self._check_previous_run()
        self.work.mkdir(exist_ok=True)
        _fsync_write(self.out / "run.json", lambda f: f.write(
            json.dumps(self.fingerprint, indent=1, sort_keys=True).encode() + b"\n"))

    def _outputs(self) -> list[Path]:
        return sorted(self.out.glob(f"{glob_escape(self.prefix)}.*.h5"))

    def _clear(self) -> None:
        for path in self._outputs() + [self.out / "run.json", self.out / "skipped.tsv"]:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def _check_previous_run(self) -> None:
        recorded = self.out / "run.json"
        previous = json.loads(recorded.read_text()) if recorded.is_file() else None
        if previous is None and (self._outputs() or self.work.exists()):
            previous = {"unknown": "output files without run.json"}
        if previous is not None and previous != self.fingerprint:
            changed = sorted(k for k in set(previous) | set(self.fingerprint)
                             if previous.get(k) != self.fingerprint.get(k))
            raise InputError(f"{self.out} holds a run made with different settings ({', '.join(changed)}): "
                             f"rerun the same command to resume it, add --overwrite to start afresh, "
                             f"or choose another output directory")

    # --- staging ------------------------------------------------------------------------

    def final_path(self, chrom: str) -> Path:
        return self.out / f"{self.prefix}.{_safe(chrom)}.h5"

    def _chunk_path(self, chrom: str, index: int) -> Path:
        return self.work / _safe(chrom) / f"{index:07d}.npz"

    def chunk_done(self, chrom: str, index: int) -> bool:
        return self.final_path(chrom).is_file() or self._chunk_path(chrom, index).is_file()

    def write_chunk(self, chrom: str, index: int, rows: Sequence[Allele],
                    stats: Mapping[str, np.ndarray], clipped: Mapping[str, int]) -> None:
        """Stage rows ``[n]`` with their statistics ``{name: [n, T] float16}``."""
        arrays = {
            "snp": np.array([r.id for r in rows], dtype=object).astype("S"),
            "chr": np.array([r.chrom for r in rows], dtype=object).astype("S"),
            "pos": np.array([r.pos for r in rows], dtype=np.uint32),
            "ref": np.array([r.ref for r in rows], dtype=object).astype("S"),
            "alt": np.array([r.alt for r in rows], dtype=object).astype("S"),
        }
        arrays.update({f"stat_{k}": v for k, v in stats.items()})
        arrays.update({f"clipped_{k}": np.int64(v) for k, v in clipped.items()})
        path = self._chunk_path(chrom, index)
        path.parent.mkdir(exist_ok=True)
        _fsync_write(path, lambda f: np.savez(f, **arrays))

    def open_skipped(self):
        """``skipped.tsv`` under construction (renamed into place by :meth:`finish`)."""
        f = open(self.work / "skipped.tsv.tmp", "w")
        f.write("chrom\tpos\tid\tref\talt\treason\n")
        return f

    # --- assembly -----------------------------------------------------------------------

    def finish(self, chroms: Iterable[str], targets: Targets, stats: Sequence[str], attrs: Mapping,
               *, percentiles: bool = False) -> dict[str, Path]:
        """Assemble every chromosome's file from its chunks, then publish ``skipped.tsv``."""
        paths = {}
        for chrom in chroms:
            paths[chrom] = self.final_path(chrom)
            if not paths[chrom].is_file():
                self._assemble(chrom, targets, stats, attrs, percentiles)
        skipped = self.work / "skipped.tsv.tmp"
        with open(skipped, "rb") as f:
            os.fsync(f.fileno())
        os.replace(skipped, self.out / "skipped.tsv")
        shutil.rmtree(self.work)
        return paths

    def clipped_counts(self, chroms: Iterable[str], stats: Sequence[str]) -> dict[str, int]:
        """Values clipped to the float16 range, per statistic, over the finished files."""
        totals = dict.fromkeys(stats, 0)
        for chrom in chroms:
            with h5py.File(self.final_path(chrom), "r") as f:
                for name in stats:
                    totals[name] += int(f[name].attrs["clipped"])
        return totals

    def _chunks(self, chrom: str) -> list[Path]:
        return sorted((self.work / _safe(chrom)).glob("*.npz"))

    def _assemble(self, chrom: str, targets: Targets, stats: Sequence[str], attrs: Mapping,
                  percentiles: bool) -> None:
        chunks = self._chunks(chrom)
        expected = [self._chunk_path(chrom, i) for i in range(len(chunks))]
        if chunks != expected:
            raise InputError(f"staged chunks of {chrom} in {self.work} are not contiguous; rerun with --overwrite")
        sizes, widths = [], dict.fromkeys(_ROW_FIELDS, 1)
        for path in chunks:
            with np.load(path) as chunk:
                sizes.append(len(chunk["pos"]))
                for field in ("snp", "chr", "ref", "alt"):
                    widths[field] = max(widths[field], chunk[field].dtype.itemsize)
        n, n_tracks = sum(sizes), len(targets)
        tmp = self.work / (self.final_path(chrom).name + ".tmp")
        with h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["run_fingerprint"] = json.dumps(self.fingerprint, sort_keys=True)
            datasets = {field: f.create_dataset(field, (n,), dtype=np.uint32 if field == "pos" else f"S{widths[field]}",
                                                track_times=False) for field in _ROW_FIELDS}
            row_chunks = (min(n, ROW_CHUNK), n_tracks)
            for name in stats:
                datasets[name] = f.create_dataset(name, (n, n_tracks), dtype=np.float16, chunks=row_chunks,
                                                  compression="gzip", compression_opts=4, shuffle=True,
                                                  track_times=False)
                datasets[name].attrs["formula"] = STATISTICS[name]
            clipped = dict.fromkeys(stats, 0)
            start = 0
            for path, size in zip(chunks, sizes):
                with np.load(path) as chunk:
                    for field in _ROW_FIELDS:
                        datasets[field][start:start + size] = chunk[field]
                    for name in stats:
                        datasets[name][start:start + size] = chunk[f"stat_{name}"]
                        clipped[name] += int(chunk[f"clipped_{name}"])
                start += size
            for name in stats:
                datasets[name].attrs["clipped"] = clipped[name]
            f.create_dataset("target_ids", data=np.array(targets.ids, dtype=object).astype("S"), track_times=False)
            f.create_dataset("target_labels", data=np.array(targets.labels, dtype=object).astype("S"),
                             track_times=False)
            f["ref_allele"] = h5py.SoftLink("/ref")  # Basenji's own names for the alleles
            f["alt_allele"] = h5py.SoftLink("/alt")
            if percentiles:
                _write_percentiles(f, stats)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.final_path(chrom))


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


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def write_skip(handle, skip: Skip) -> None:
    handle.write(f"{skip.chrom}\t{skip.pos}\t{skip.id}\t{skip.ref}\t{skip.alt}\t{skip.reason}\n")
