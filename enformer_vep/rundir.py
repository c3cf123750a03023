"""The resume protocol of a run's output directory: staged blocks, ``run.json``, ``done.json``
(docs/spec.md §7).

A run reads the VCF in *blocks*: up to ``checkpoint_every`` consecutive records of one
contig, numbered per contig from 0. Each block's scored rows and skipped rows are staged
in ``OUT/.partial/`` as one chunk file, written to a temporary name, fsync'ed and renamed,
so a staged chunk is always whole; a rerun of the same command keeps the chunks that exist
and scores the rest. When every block is staged, each chromosome's HDF5 file and
``skipped.tsv`` are rebuilt from the chunks (temporary name, then rename) and
``OUT/done.json`` — the completion record, with every file's SHA-256 — is written last.
A directory without a verified ``done.json`` is unfinished, whatever files it holds.
``OUT/run.json`` records what the run was made with; a rerun with other settings is refused.
"""
from __future__ import annotations

import glob
import hashlib
import heapq
import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_write, sha256_file
from .errors import InputError
from .output import (
    GENE_FIELDS,
    GENE_NUMBERS,
    ROW_FIELDS,
    byte_strings,
    genes_file,
    write_gene_scores,
    write_scores,
    write_skipped,
)
from .targets import Targets
from .text import from_bytes
from .variants import Allele, Skip

log = logging.getLogger("enformer_vep")

DONE = "done.json"


def _safe(name: str) -> str:
    """A file-name form of a contig name; names that had to change get a hash so none collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return safe if safe == name else f"{safe}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def write_json(path: Path, value) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=1, sort_keys=True).encode() + b"\n"))


class UnverifiedRun(InputError):
    """A run directory whose completion record does not verify: ``problem`` says what is wrong, the
    message adds what to do (which depends on who asks: a rerun of the scoring command redoes it)."""

    def __init__(self, problem: str, action: str):
        super().__init__(f"{problem}: {action}")
        self.problem = problem


def verify_done(directory: str | Path, what: str | None = None) -> dict:
    """The completion record of a finished run in ``directory`` (a run, shard or merge), every file it
    lists checked against its SHA-256. ``what`` names the directory in messages (default: its path).

    Raises :class:`UnverifiedRun` (an :class:`InputError`) saying what is wrong: no ``done.json``
    (unfinished), an unreadable one, a listed file missing, or one that differs from its checksum (torn
    or altered)."""
    directory = Path(directory)
    what = what or str(directory)
    path = directory / DONE
    if not path.is_file():
        raise UnverifiedRun(f"{what} is an unfinished run (no {DONE})", "rerun its command to finish it")
    try:
        done = json.loads(path.read_text())
        listed = {name: entry["sha256"] for name, entry in done["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UnverifiedRun(f"{what}: {path} is unreadable", "rerun its command") from None
    for name, digest in listed.items():
        if not (directory / name).is_file():
            raise UnverifiedRun(f"{what} lacks {name}, listed in its {DONE}", "rerun its command")
        if sha256_file(directory / name) != digest:
            raise UnverifiedRun(f"{what}: {name} differs from its checksum in {DONE} (torn or altered)",
                                "rerun its command with --overwrite")
    return done


def read_done(out: Path) -> dict | None:
    """:func:`verify_done`, or None (with a warning saying why and that the run is redone) for a run
    that is not finished."""
    if not (Path(out) / DONE).is_file():
        return None
    try:
        return verify_done(out)
    except UnverifiedRun as error:
        log.warning("%s: the run is redone", error.problem)
        return None


def settings_diff(before: Mapping, now: Mapping) -> str:
    """What differs between two run fingerprints, as ``name: before -> now``; the command's options
    (the ``options`` entry) by their own names."""
    def flat(fingerprint: Mapping) -> dict:
        out = {k: v for k, v in fingerprint.items() if k != "options"}
        out.update({f"--{k.replace('_', '-')}": v for k, v in (fingerprint.get("options") or {}).items()})
        return out

    a, b = flat(before), flat(now)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in changed)


def _short(value, limit: int = 60) -> str:
    text = "(none)" if value is None else json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
        return sorted(self.out.glob(f"{glob.escape(self.prefix)}.*.h5"))

    def clear(self) -> None:
        """Remove every result of a previous run here, the annotated VCF its ``done.json`` records
        included (not run.json: the next one is written anyway)."""
        try:
            annotated = json.loads((self.out / DONE).read_text()).get("vcf_out")
        except (OSError, ValueError, AttributeError):
            annotated = None
        if annotated:
            for path in (Path(annotated), Path(annotated + ".tbi")):
                path.unlink(missing_ok=True)
        for path in self._outputs() + [self.out / "skipped.tsv", self.out / DONE]:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def _check_previous_run(self) -> None:
        recorded = self.out / "run.json"
        previous = json.loads(recorded.read_text()) if recorded.is_file() else None
        if previous is None and (self._outputs() or self.work.exists()):
            previous = {"unknown": "output files without run.json"}
        if previous is not None and previous != self.fingerprint:
            what = "a finished run" if (self.out / DONE).is_file() else "an unfinished run"
            action = ("add --overwrite to replace it" if what == "a finished run" else
                      "rerun its own command to resume it, add --overwrite to start afresh")
            changed = settings_diff(previous, self.fingerprint)
            raise InputError(f"{self.out} holds {what} made with other settings ({changed}): {action}, or "
                             f"choose another output directory")

    def withdraw(self) -> None:
        """Take back the completion record of a run that turned out unusable (it scored nothing):
        the directory is then unfinished, and a rerun redoes it."""
        (self.out / DONE).unlink(missing_ok=True)

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

    def genes_path(self, chrom: str) -> Path:
        return genes_file(self.final_path(chrom))

    def _chunk_path(self, chrom: str, block: int) -> Path:
        return self.work / _safe(chrom) / f"{block:07d}.npz"

    def chunk_done(self, chrom: str, block: int) -> bool:
        return self._chunk_path(chrom, block).is_file()

    def write_chunk(self, chrom: str, block: int, rows: Sequence[Allele], stats: Mapping[str, np.ndarray],
                    clipped: Mapping[str, int], skips: Sequence[Skip] = (), mismatched: int = 0,
                    genes: Mapping[str, np.ndarray] | None = None) -> None:
        """Stage one block: scored rows ``[n]`` with their statistics ``{name: [n, T] float16}``, and
        its skipped rows (``record`` = their 0-based ordinal in the VCF stream). ``genes``: the block's
        (allele, gene) rows, ``si`` counted from the block's first row, fields and ``{gene statistic:
        [P, T] float16}`` with ``clipped_<name>`` counts (``pipeline.gene_rows``)."""
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
        arrays.update({f"gene_{k}": v for k, v in (genes or {}).items()})
        path = self._chunk_path(chrom, block)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    # --- assembly -----------------------------------------------------------------------

    def finish(self, blocks: Iterable[tuple[str, int]], targets: Targets, stats: Sequence[str], attrs: Mapping,
               *, percentiles: bool = False, extra: Mapping | None = None, gene_stats: Sequence[str] | None = None,
               gene_attrs: Mapping | None = None) -> dict:
        """Build every file from the staged ``blocks`` (each must be staged), then write the completion
        record (with ``extra`` entries) and remove the staging. Returns the completion record. With
        ``gene_stats``, also each chromosome's genes file (with ``gene_attrs``)."""
        by_chrom: dict[str, list[int]] = {}
        for chrom, block in blocks:
            by_chrom.setdefault(chrom, []).append(block)
        missing = [f"{chrom} block {b}" for chrom, bs in by_chrom.items() for b in bs if not self.chunk_done(chrom, b)]
        if missing:
            raise InputError(f"{self.work} lacks staged blocks ({', '.join(missing[:5])}); rerun the same command")
        chunks = {chrom: [self._chunk_path(chrom, b) for b in sorted(bs)] for chrom, bs in by_chrom.items()}
        sources = {chrom: [ChunkSource(p, stats) for p in paths] for chrom, paths in chunks.items()}
        genes = None if gene_stats is None else {
            chrom: [GeneChunkSource(p, gene_stats) for p in paths] for chrom, paths in chunks.items()}
        return self.publish(sources, [ChunkSource.skipped_lines(paths) for paths in chunks.values()], targets, stats,
                            attrs, percentiles=percentiles, extra=extra or {},
                            ref_mismatch_scored=sum(s.mismatched for group in sources.values() for s in group),
                            genes=genes, gene_stats=gene_stats, gene_attrs=gene_attrs)

    def publish(self, sources: Mapping[str, Sequence], skipped: Sequence[Iterator[tuple[int, str]]], targets: Targets,
                stats: Sequence[str], attrs: Mapping, *, percentiles: bool, extra: Mapping,
                ref_mismatch_scored: int, genes: Mapping[str, Sequence] | None = None,
                gene_stats: Sequence[str] | None = None, gene_attrs: Mapping | None = None) -> dict:
        """Write each chromosome's file from its ``sources`` (see :func:`write_scores`; none for a
        chromosome without rows), and with ``genes`` (per chromosome, one source per variant source, see
        :func:`write_gene_scores`) its genes file; ``skipped.tsv`` from the ``(record, line)`` streams
        merged in record order, then ``done.json`` last (with ``extra``), and drop the staging. Returns
        ``done.json``."""
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
                if genes is not None:
                    offsets = np.cumsum([0] + [s.size for s in chrom_sources])[:-1].tolist()
                    pairs = list(zip(offsets, genes[chrom], strict=True))
                    write_gene_scores(self.genes_path(chrom), pairs, targets, gene_stats,
                                      (gene_attrs or attrs) | {"run_fingerprint": attrs["run_fingerprint"]},
                                      tmp_dir=self.work)
                    files[self.genes_path(chrom).name] = {"genes_of": chrom, "rows": sum(g.size for _, g in pairs)}
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
                yield from zip(chunk["skipped_record"].tolist(), (from_bytes(s) for s in chunk["skipped"]), strict=True)


class GeneChunkSource:
    """(allele, gene) rows of one staged chunk file, for :func:`write_gene_scores` (``si`` counted from
    the chunk's first row)."""

    def __init__(self, path: Path, stats: Sequence[str]):
        self.path, self.stats = path, stats
        with np.load(path) as chunk:
            self.size = len(chunk["gene_si"]) if "gene_si" in chunk else 0
            self.widths = {f: chunk[f"gene_{f}"].dtype.itemsize for f in GENE_FIELDS} if self.size else {}
            self.clipped = {name: int(chunk[f"gene_clipped_{name}"]) for name in stats} if self.size else {}

    def pieces(self) -> Iterator[dict[str, np.ndarray]]:
        with np.load(self.path) as chunk:
            yield {f: chunk[f"gene_{f}"] for f in (*GENE_NUMBERS, *GENE_FIELDS)} | \
                {name: chunk[f"gene_stat_{name}"] for name in self.stats}
