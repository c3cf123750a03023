"""One scoring run: stream variants, build windows, score in batches, stage and publish the files."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .errors import InputError
from .genome import Genome, GenomeBlocks
from .output import RunDirectory, write_skip
from .scoring import STATISTICS, VariantScorer, to_float16
from .targets import Targets, packaged_targets, read_targets, select_tracks
from .variants import Allele, Skip, read_variants
from .weights import default_model_source, load_model, source_digest
from .windows import allele_windows, ref_matches

log = logging.getLogger("enformer_vep")


@dataclasses.dataclass
class ScoreOptions:
    """Everything ``enformer-score VCF`` takes (see the CLI's --help for each option)."""

    vcf: str
    fasta: str
    out_dir: str
    model: str | None = None
    prefix: str | None = None
    regions: tuple[str, ...] = ()
    chroms: tuple[str, ...] = ()
    pass_only: bool = False
    ref_mismatch: str = "skip"
    device: str | None = None
    batch_size: int | None = None  # None: auto
    precision: str | None = None  # None: fp32 on CPU, tf32 on CUDA
    stats: tuple[str, ...] = ("SAD", "SAR")
    rc: bool = False
    shifts: tuple[int, ...] = (0,)
    tracks: str | None = None
    organism: str = "human"
    targets: str | None = None
    percentiles: bool = False
    overwrite: bool = False
    checkpoint_every: int = 1024
    progress: bool | None = None  # None: a bar on a terminal, periodic log lines otherwise

    def output_settings(self) -> dict:
        """The options that shape the output (a rerun must repeat them to resume)."""
        keep = ("regions", "chroms", "pass_only", "ref_mismatch", "stats", "rc", "shifts", "tracks",
                "organism", "targets", "percentiles", "checkpoint_every", "prefix")
        return {k: v for k, v in dataclasses.asdict(self).items() if k in keep}


@dataclasses.dataclass
class Summary:
    scored: int
    skipped: collections.Counter
    ref_mismatch_scored: int
    clipped: dict
    seconds: float
    files: dict

    def lines(self) -> list[str]:
        rate = self.scored / self.seconds if self.seconds > 0 else float("nan")
        out = [f"scored {self.scored} variant alleles in {self.seconds:.1f} s ({rate:.2f} variants/s)"]
        out += [f"skipped {n}: {reason}" for reason, n in sorted(self.skipped.items())]
        if self.ref_mismatch_scored:
            out.append(f"scored despite a REF mismatch: {self.ref_mismatch_scored}")
        out += [f"{name}: {n} values clipped to the float16 range" for name, n in self.clipped.items() if n]
        out += [f"wrote {path}" for path in self.files.values()]
        return out


def _default_prefix(vcf: str) -> str:
    name = Path(vcf).name
    for suffix in (".gz", ".bgz", ".vcf", ".bcf"):
        name = name.removesuffix(suffix)
    return name or "scores"


def _model_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line every ``every`` seconds."""

    def __init__(self, enabled: bool | None, total: int | None, every: float = 30.0):
        self.bar = tqdm(total=total, unit="variant", desc="scoring",
                        disable=not (sys.stderr.isatty() if enabled is None else enabled))
        self.every, self.count, self.start, self.last = every, 0, time.monotonic(), time.monotonic()

    def update(self, n: int = 1) -> None:
        self.count += n
        self.bar.update(n)
        now = time.monotonic()
        if self.bar.disable and now - self.last >= self.every:
            self.last = now
            log.info("processed %d records (%.1f/s)", self.count, self.count / (now - self.start))

    def close(self) -> None:
        self.bar.close()


def score_vcf(options: ScoreOptions, model=None) -> Summary:
    """Score every ALT allele of ``options.vcf``; ``model`` overrides ``options.model`` (tests)."""
    started = time.monotonic()
    genome = Genome(options.fasta)
    # opened first: a bad VCF, index or region fails before the model loads
    variants = read_variants(options.vcf, genome.contigs, regions=options.regions, chroms=options.chroms,
                             pass_only=options.pass_only)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        source = options.model or default_model_source()
        model, model_sha256 = load_model(source, device=device), source_digest(source)
    else:
        source, model_sha256 = "<in-memory model>", _model_digest(model)
        model = model.to(device)
    targets = _targets(options, model.config.heads)
    tracks = select_tracks(options.tracks, targets)
    scorer = VariantScorer(model, head=options.organism, tracks=tracks, stats=options.stats, rc=options.rc,
                           shifts=options.shifts, device=device, batch_size=options.batch_size,
                           precision=options.precision)
    settings = options.output_settings() | {"prefix": options.prefix or _default_prefix(options.vcf),
                                            "precision": scorer.precision}
    provenance = {"enformer_vep_version": __version__, "model_sha256": model_sha256,
                  "vcf": os.path.abspath(options.vcf), "fasta": os.path.abspath(options.fasta),
                  "fasta_index_sha256": genome.index_checksum()}
    vcf_stat = os.stat(options.vcf)
    run = RunDirectory(options.out_dir, settings["prefix"], provenance | {
        "vcf_size": vcf_stat.st_size, "vcf_mtime_ns": vcf_stat.st_mtime_ns, "options": settings},
        overwrite=options.overwrite)
    attrs = provenance | {"model_source": str(source), "options": json.dumps(settings, sort_keys=True),
                          "statistics": json.dumps({k: STATISTICS[k] for k in options.stats})}

    total = None if options.regions or options.chroms else _indexed_record_count(options.vcf)
    scored, mismatched, skipped, chroms = _stream(options, variants, genome, scorer, run, total)
    if scored == 0:
        run.finish([], targets, options.stats, attrs)
        detail = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "the VCF holds no records"
        raise InputError(f"no variant was scored ({detail}); see {run.out / 'skipped.tsv'}")
    files = run.finish(chroms, targets.subset(tracks), options.stats, attrs, percentiles=options.percentiles)
    return Summary(scored, skipped, mismatched, run.clipped_counts(chroms, options.stats),
                   time.monotonic() - started, files)


def _targets(options: ScoreOptions, heads: dict[str, int]) -> Targets:
    """The track table of the scored head, checked against the head's size."""
    if options.organism not in heads:
        raise InputError(f"the model has no {options.organism!r} head (it has {', '.join(heads)})")
    targets = read_targets(options.targets) if options.targets else packaged_targets(options.organism)
    if len(targets) != heads[options.organism]:
        raise InputError(f"the model's {options.organism} head has {heads[options.organism]} tracks but the track "
                         f"table has {len(targets)}: pass the matching table with --targets")
    return targets


def _checked(item: Allele | Skip, genome: Genome, policy: str) -> tuple[Allele | Skip, bool]:
    """Apply ``--ref-mismatch`` to an allele: (the allele or its Skip, whether REF mismatched)."""
    if isinstance(item, Skip):
        return item, False
    ok, fasta_ref = ref_matches(genome, item.fasta_chrom, item.pos, item.ref)
    if ok or policy == "score":
        return item, not ok
    if policy == "error":
        raise InputError(f"REF mismatch at {item.chrom}:{item.pos}: VCF has {item.ref}, FASTA has {fasta_ref} "
                         f"(--ref-mismatch skip|score to go on)")
    return Skip(item.chrom, item.pos, item.id, item.ref, item.alt, f"REF mismatch (FASTA has {fasta_ref})",
                item.record), True


def _stream(options: ScoreOptions, variants, genome: Genome, scorer: VariantScorer, run: RunDirectory,
            total: int | None) -> tuple[int, int, collections.Counter, list[str]]:
    """Score the stream checkpoint by checkpoint; returns (scored, scored despite a REF mismatch,
    skipped per reason, chromosomes in order of first appearance)."""
    skipped: collections.Counter = collections.Counter()
    pending: dict[str, list[Allele]] = {}
    chunk_index: dict[str, int] = collections.Counter()
    scored = mismatched = 0
    window_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="windows")
    blocks = GenomeBlocks(Genome(options.fasta))  # the window thread's own reader

    def flush(chrom: str) -> None:
        rows = pending.pop(chrom, [])
        if rows and not run.chunk_done(chrom, chunk_index[chrom]):
            _score_chunk(run, scorer, window_thread, blocks, chrom, chunk_index[chrom], rows)
        chunk_index[chrom] += 1

    progress = _Progress(options.progress, total)
    last_record = -1
    with run.open_skipped() as skip_file:
        try:
            for item in variants:
                if item.record != last_record:
                    progress.update(item.record - last_record)
                    last_record = item.record
                item, mismatch = _checked(item, genome, options.ref_mismatch)
                if isinstance(item, Skip):
                    skipped[item.reason.split(" (")[0]] += 1
                    write_skip(skip_file, item)
                    continue
                scored += 1
                mismatched += mismatch
                pending.setdefault(item.chrom, []).append(item)
                if len(pending[item.chrom]) == options.checkpoint_every:
                    flush(item.chrom)
            for chrom in list(pending):
                flush(chrom)
        finally:
            progress.close()
            window_thread.shutdown()
    return scored, mismatched, skipped, list(chunk_index)


def _score_chunk(run: RunDirectory, scorer: VariantScorer, window_thread: ThreadPoolExecutor, blocks: GenomeBlocks,
                 chrom: str, index: int, rows: list[Allele]) -> None:
    """Score ``rows`` in groups of ``batch_size`` variants and stage them as chunk ``index``.

    The next group's windows are built on ``window_thread`` while the device scores this one.
    """
    def windows(group: list[Allele]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [allele_windows(blocks, r.fasta_chrom, r.pos, r.ref, r.alt) for r in group]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    size = scorer.batch_size
    groups = [rows[start:start + size] for start in range(0, len(rows), size)]
    parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    pending = window_thread.submit(windows, groups[0])
    for k in range(len(groups)):
        ref, alt = pending.result()
        if k + 1 < len(groups):
            pending = window_thread.submit(windows, groups[k + 1])
        for name, values in scorer.score(ref, alt).items():
            parts[name].append(values)
    stats16, clipped = {}, {}
    for name, values in parts.items():
        stats16[name], clipped[name] = to_float16(np.concatenate(values))
    run.write_chunk(chrom, index, rows, stats16, clipped)


def _indexed_record_count(vcf: str) -> int | None:
    """Records in an indexed VCF/BCF (for the progress bar's ETA); None without an index."""
    if not any(os.path.exists(vcf + ext) for ext in (".tbi", ".csi")):
        return None
    try:
        import cyvcf2
        return int(cyvcf2.VCF(vcf, lazy=True).num_records)
    except Exception:  # noqa: BLE001 - unindexed or unreadable: no total, read_variants reports real errors
        return None
