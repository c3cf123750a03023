"""Per-chromosome HDF5 files in the Basenji layout (SPEC §5), written so that no torn file is ever trusted.

A run reads the VCF in *blocks*: up to ``checkpoint_every`` consecutive records of one
contig, numbered per contig from 0. Each block's scored rows and skipped rows are staged
in ``OUT/.partial/`` as one chunk file, written to a temporary name, fsync'ed and renamed,
so a staged chunk is always whole; a rerun of the same command keeps the chunks that exist
and scores the rest. When every block is staged, each chromosome's HDF5 file and
``skipped.tsv`` are rebuilt from the chunks (temporary name, then rename) and
``OUT/done.json`` — the completion record, with every file's SHA-256 — is written last.
A directory without a verified ``done.json`` is unfinished, whatever files it holds.
``OUT/run.json`` records what the run was made with; a rerun with other settings is refused.

Files are written in fixed row blocks, whatever their sources' sizes, so the same rows give
byte-identical files (after a resume, and after ``merge`` of shards).
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from .atomic import atomic_path, atomic_write
from .errors import InputError
from .scoring import STATISTICS
from .targets import Targets
from .text import from_bytes, to_bytes
from .variants import Allele, Skip

log = logging.getLogger("enformer_vep")

# Basenji's quantiles: 99 + 80 + 100 = 279 levels
PERCENTILES = np.concatenate([np.arange(0.001, 0.1, 0.001), np.arange(0.1, 0.9, 0.01), np.arange(0.9, 1, 0.001)])
ROW_CHUNK = 64  # HDF5 chunk rows: reading one variant's tracks touches one chunk
WRITE_ROWS = 64 * ROW_CHUNK  # rows per HDF5 write: whole chunks, the same for every source layout
ROW_FIELDS = ("snp", "chr", "pos", "ref", "alt")
SKIPPED_COLUMNS = ("chrom", "pos", "id", "ref", "alt", "reason", "record")
DONE = "done.json"


def _safe(name: str) -> str:
    """A file-name form of a contig name; names that had to change get a hash so none collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return safe if safe == name else f"{safe}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def write_json(path: Path, value) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=1, sort_keys=True).encode() + b"\n"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def byte_strings(values: Iterable[str]) -> np.ndarray:
    """Fixed-width bytes ``S``, the string layout of every HDF5 file we write: UTF-8, and a VCF's
    bytes that are not UTF-8 as they were (enformer_vep.text)."""
    encoded = [to_bytes(v) for v in values]
    return np.array(encoded, dtype=f"S{max([1] + [len(v) for v in encoded])}")


def read_done(out: Path) -> dict | None:
    """The completion record of ``out`` if every file it lists is there with its SHA-256, else None
    (and a warning naming the first file that does not match)."""
    path = Path(out) / DONE
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
        for name, entry in done["files"].items():
            if not (Path(out) / name).is_file() or sha256_file(Path(out) / name) != entry["sha256"]:
                log.warning("%s: %s is missing or differs from its checksum in %s", out, name, DONE)
                return None
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s: %s is unreadable", out, path)
        return None
    return done


class RunDirectory:
    """The output directory of one scoring run: staged chunks, final files, provenance.

    ``attach`` joins a directory another process (the run's parent) has already checked and
    prepared: a device worker stages chunks there and leaves the rest to the parent.
    """

    def __init__(self, out_dir: str | Path, prefix: str, fingerprint: Mapping, *, overwrite: bool = False,
                 attach: bool = False):
        self.out = Path(out_dir)
        self.prefix = prefix
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.work = self.out / ".partial"
        if attach:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".enformer-vep-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise InputError(f"cannot write to output directory {self.out}: {error.strerror or error}") from None
        if overwrite:
            self.clear()
            (self.out / "run.json").unlink(missing_ok=True)
        self._check_previous_run()
        for leftover in self.out.glob("*.tmp"):  # from a process killed while writing them
            if re.fullmatch(r"(run\.json|done\.json|skipped\.tsv)\.\d+\.tmp", leftover.name):
                leftover.unlink(missing_ok=True)
        write_json(self.out / "run.json", self.fingerprint)

    def _outputs(self) -> list[Path]:
        return sorted(self.out.glob(f"{glob_escape(self.prefix)}.*.h5"))

    def clear(self) -> None:
        """Remove every result of a previous run here (not run.json: the next one is written anyway)."""
        for path in self._outputs() + [self.out / "skipped.tsv", self.out / DONE]:
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

    def completed(self) -> dict | None:
        """The verified completion record of a finished run (leftover staging removed), or None.
        Results that fail verification are removed so that the run is redone, never trusted."""
        done = read_done(self.out)
        if done is None:
            if (self.out / DONE).exists():
                self.clear()
            return None
        shutil.rmtree(self.work, ignore_errors=True)
        return done

    # --- staging ------------------------------------------------------------------------

    def final_path(self, chrom: str) -> Path:
        return self.out / f"{self.prefix}.{_safe(chrom)}.h5"

    def _chunk_path(self, chrom: str, block: int) -> Path:
        return self.work / _safe(chrom) / f"{block:07d}.npz"

    def chunk_done(self, chrom: str, block: int) -> bool:
        return self._chunk_path(chrom, block).is_file()

    def write_chunk(self, chrom: str, block: int, rows: Sequence[Allele], stats: Mapping[str, np.ndarray],
                    clipped: Mapping[str, int], skips: Sequence[Skip] = (), mismatched: int = 0) -> None:
        """Stage one block: scored rows ``[n]`` with their statistics ``{name: [n, T] float16}``, and
        its skipped rows (``record`` = their 0-based ordinal in the VCF stream)."""
        arrays = {
            "snp": byte_strings(r.id for r in rows), "chr": byte_strings(r.chrom for r in rows),
            "pos": np.array([r.pos for r in rows], dtype=np.uint32),
            "ref": byte_strings(r.ref for r in rows), "alt": byte_strings(r.alt for r in rows),
            "skipped": byte_strings("\t".join(map(str, (s.chrom, s.pos, s.id, s.ref, s.alt, s.reason, s.record + 1)))
                                for s in skips),
            "skipped_record": np.array([s.record for s in skips], dtype=np.int64),
            "mismatched": np.int64(mismatched),
        }
        arrays.update({f"stat_{k}": v for k, v in stats.items()})
        arrays.update({f"clipped_{k}": np.int64(v) for k, v in clipped.items()})
        path = self._chunk_path(chrom, block)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    # --- assembly -----------------------------------------------------------------------

    def finish(self, blocks: Iterable[tuple[str, int]], targets: Targets, stats: Sequence[str], attrs: Mapping,
               *, percentiles: bool = False, extra: Mapping | None = None) -> dict:
        """Build every file from the staged ``blocks`` (each must be staged), then write the completion
        record (with ``extra`` entries) and remove the staging. Returns the completion record."""
        by_chrom: dict[str, list[int]] = {}
        for chrom, block in blocks:
            by_chrom.setdefault(chrom, []).append(block)
        missing = [f"{chrom} block {b}" for chrom, bs in by_chrom.items() for b in bs if not self.chunk_done(chrom, b)]
        if missing:
            raise InputError(f"{self.work} lacks staged blocks ({', '.join(missing[:5])}); rerun the same command")
        chunks = {chrom: [self._chunk_path(chrom, b) for b in sorted(bs)] for chrom, bs in by_chrom.items()}
        sources = {chrom: [ChunkSource(p, stats) for p in paths] for chrom, paths in chunks.items()}
        return self.publish(sources, [ChunkSource.skipped_lines(paths) for paths in chunks.values()], targets, stats,
                            attrs, percentiles=percentiles, extra=extra or {},
                            ref_mismatch_scored=sum(s.mismatched for group in sources.values() for s in group))

    def publish(self, sources: Mapping[str, Sequence], skipped: Sequence[Iterator[tuple[int, str]]], targets: Targets,
                stats: Sequence[str], attrs: Mapping, *, percentiles: bool, extra: Mapping,
                ref_mismatch_scored: int) -> dict:
        """Write each chromosome's file from its ``sources`` (see :func:`write_scores`; none for a
        chromosome without rows), ``skipped.tsv`` from the ``(record, line)`` streams merged in record
        order, then ``done.json`` last (with ``extra``), and drop the staging. Returns ``done.json``."""
        self.work.mkdir(exist_ok=True)
        attrs = attrs | {"run_fingerprint": json.dumps(self.fingerprint, sort_keys=True)}
        summary = {"scored": 0, "ref_mismatch_scored": ref_mismatch_scored, "clipped": dict.fromkeys(stats, 0)}
        files = {}
        for chrom, chrom_sources in sources.items():
            rows = sum(s.size for s in chrom_sources)
            if rows:
                write_scores(self.final_path(chrom), chrom_sources, targets, stats, attrs, percentiles=percentiles,
                             tmp_dir=self.work)
                files[self.final_path(chrom).name] = {"chrom": chrom, "rows": rows}
                summary["scored"] += rows
                for name in stats:
                    summary["clipped"][name] += sum(s.clipped[name] for s in chrom_sources if s.size)
        lines = heapq.merge(*skipped, key=lambda x: x[0])
        summary["skipped"] = write_skipped(self.out / "skipped.tsv", (line for _, line in lines))
        for name in list(files) + ["skipped.tsv"]:
            files.setdefault(name, {})["sha256"] = sha256_file(self.out / name)
        done = {"files": files, "summary": summary, **extra}
        write_json(self.out / DONE, done)
        shutil.rmtree(self.work, ignore_errors=True)
        return done


class ChunkSource:
    """Rows of one staged chunk file, for :func:`write_scores`."""

    def __init__(self, path: Path, stats: Sequence[str]):
        self.path, self.stats = path, stats
        with np.load(path) as chunk:
            self.size = len(chunk["pos"])
            self.widths = {f: chunk[f].dtype.itemsize for f in ("snp", "chr", "ref", "alt")}
            self.clipped = {name: int(chunk[f"clipped_{name}"]) for name in stats} if self.size else {}
            self.mismatched = int(chunk["mismatched"])

    def pieces(self) -> Iterator[dict[str, np.ndarray]]:
        with np.load(self.path) as chunk:
            yield {f: chunk[f] for f in ROW_FIELDS} | {name: chunk[f"stat_{name}"] for name in self.stats}

    @staticmethod
    def skipped_lines(paths: Sequence[Path]) -> Iterator[tuple[int, str]]:
        """(record, skipped.tsv line) of the chunks, in their order."""
        for path in paths:
            with np.load(path) as chunk:
                yield from zip(chunk["skipped_record"].tolist(), (from_bytes(s) for s in chunk["skipped"]))


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
        self.buffered += len(piece["pos"])
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
            datasets[name] = f.create_dataset(name, (n, n_tracks), dtype=np.float16, chunks=(min(n, ROW_CHUNK), n_tracks),
                                              compression="gzip", compression_opts=4, shuffle=True, track_times=False)
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


def find_variant(out_dir: str | Path, key: str) -> dict:
    """The row of a finished run whose ``snp`` (VCF ID) is ``key``, or whose ``chr:pos`` or
    ``chr:pos:ref:alt`` is; the first in VCF order. Returns ``chrom, pos, ref, alt, snp`` and its
    statistics ``{name: [T] float32}`` with ``target_ids``."""
    done = read_done(Path(out_dir))
    if done is None:
        raise InputError(f"{out_dir} holds no finished run (no verified done.json)")
    parts = key.split(":")
    for name in done["files"]:
        if not name.endswith(".h5"):
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
