"""One scoring run: stream variants, build windows, score in batches, stage and publish the files."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .errors import EnformerVepError, InputError
from .genome import Genome, GenomeBlocks
from .rundir import RunDirectory
from .scoring import STATISTICS, VariantScorer, default_device, default_precision, to_float16
from .shards import Part, record_layout, shard_part
from .targets import Targets, head_targets, select_tracks
from .variants import Allele, Skip, contig_length_differences, open_vcf, read_variants
from .vcf_index import index_record_counts
from .vcf_out import write_annotated_vcf
from .weights import default_model_source, load_model, source_digest
from .windows import allele_windows, ref_matches

log = logging.getLogger("enformer_vep")


@dataclasses.dataclass
class ScoreOptions:
    """Everything ``enformer-score VCF`` takes, one field per option (``enformer-score score --help``
    and README describe each; ``None`` means the option's default)."""

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
    devices: tuple[str, ...] = ()  # several: one worker process per device; ("all",): every CUDA device
    shard: tuple[int, int] | None = None  # (K, N): score only shard K of N (1-based)
    vcf_out: str | None = None  # the input VCF annotated with the strongest SAD per assay family
    batch_size: int | None = None  # None: auto
    precision: str | None = None  # None: fp32 on CPU, bf16/tf32 on CUDA
    compile: bool = False  # torch.compile the conv tower and the transformer
    reuse: bool | None = None  # reference-trunk reuse for SNV/MNP; None: on CUDA only
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

    def head_tracks(self, heads: dict[str, int]) -> tuple[Targets, np.ndarray]:
        """The scored head's track table and the columns ``tracks`` chooses (int64 ``[T]``)."""
        targets = head_targets(self.organism, heads, self.targets)
        return targets, select_tracks(self.tracks, targets)

    def output_settings(self) -> dict:
        """The options that shape the output (a rerun must repeat them to resume)."""
        keep = ("regions", "chroms", "pass_only", "ref_mismatch", "stats", "rc", "shifts", "tracks", "reuse",
                "compile", "organism", "targets", "percentiles", "checkpoint_every", "prefix")
        return {k: v for k, v in dataclasses.asdict(self).items() if k in keep}


@dataclasses.dataclass
class Summary:
    scored: int
    skipped: collections.Counter
    ref_mismatch_scored: int
    clipped: dict
    seconds: float
    files: dict
    contig_lengths: list = dataclasses.field(default_factory=list)  # variants.contig_length_differences

    @classmethod
    def from_done(cls, done: dict, out: Path, seconds: float) -> Summary:
        """The summary a completion record (``done.json``) holds."""
        counts = done["summary"]
        files = {entry["chrom"]: out / name for name, entry in done["files"].items() if "chrom" in entry}
        return cls(counts["scored"], collections.Counter(counts["skipped"]), counts["ref_mismatch_scored"],
                   counts["clipped"], seconds, files)

    def lines(self) -> list[str]:
        rate = self.scored / self.seconds if self.seconds > 0 else float("nan")
        out = [f"scored {self.scored} variant alleles in {self.seconds:.1f} s ({rate:.2f} variants/s)"]
        out += [f"skipped {n}: {reason}" for reason, n in sorted(self.skipped.items())]
        if self.ref_mismatch_scored:
            out.append(f"scored despite a REF mismatch: {self.ref_mismatch_scored}")
        out += [f"{name}: {n} values clipped to the float16 range" for name, n in self.clipped.items() if n]
        out += [_length_message(d) for d in self.contig_lengths]
        out += [f"wrote {path}" for path in self.files.values()]
        return out


def _length_message(difference: dict) -> str:
    return (f"contig {difference['vcf']}: the VCF header says {difference['vcf_length']:,} bp, the FASTA's "
            f"{difference['fasta']} has {difference['fasta_length']:,} bp (another assembly?)")


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
        self.bar = tqdm(total=total, unit="record", desc="scoring",
                        disable=not (sys.stderr.isatty() if enabled is None else enabled))
        self.enabled = enabled is not False
        self.every, self.count, self.start, self.last = every, 0, time.monotonic(), time.monotonic()

    def update(self, n: int = 1) -> None:
        self.count += n
        self.bar.update(n)
        now = time.monotonic()
        if self.bar.disable and self.enabled and now - self.last >= self.every:
            self.last = now
            log.info("processed %d records (%.1f/s)", self.count, self.count / (now - self.start))

    def close(self) -> None:
        self.bar.close()


def resolve_devices(devices: tuple[str, ...]) -> list[str]:
    """``--devices``: names as given, or ``all`` = every CUDA device."""
    if devices == ("all",):
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError("--devices all: no CUDA device is visible")
        return [f"cuda:{i}" for i in range(count)]
    return list(devices)


def score_vcf(options: ScoreOptions, model=None) -> Summary:
    """Score every ALT allele of ``options.vcf`` (or of its shard): the ``enformer-score`` job.

    Parameters
    ----------
    options : ScoreOptions
        The command's options (VCF, FASTA, output directory, statistics, tracks, devices...).
    model : optional
        An in-memory model overriding ``options.model`` (tests, benchmarks; one device only): an
        :class:`Enformer` or anything with ``predict_tracks(x [B, L, 4], head, tracks) -> [B, 896, T]``.

    Returns
    -------
    Summary
        ``scored`` alleles, ``skipped`` per reason, clipped values per statistic, ``seconds``, the
        written ``files`` ``{chrom: path}`` and ``contig_lengths`` differences; ``lines()`` words it.

    Raises
    ------
    InputError
        Unreadable or malformed VCF/BCF, stale index, unknown region contig, no contig shared with
        the FASTA, REF mismatch with ``ref_mismatch="error"``, other settings in ``out_dir``, or
        nothing scored. ``OSError`` for a full disk (rerun to resume).
    """
    started = time.monotonic()
    genome = Genome(options.fasta)
    devices = resolve_devices(options.devices) if options.devices else [default_device(options.device)]
    if model is not None and len(devices) > 1:
        raise InputError("an in-memory model runs on one device; pass --model to use several")
    part = None
    if options.vcf_out and options.shard:
        raise InputError("--vcf-out annotates a whole run: give it to `enformer-score merge` instead of the shards")
    if options.vcf_out and "SAD" not in options.stats:
        raise InputError("--vcf-out needs SAD among --stats")
    if options.shard:
        layout = record_layout(options.vcf, genome.contigs, regions=options.regions, chroms=options.chroms)
        part = shard_part(layout, options.checkpoint_every, *options.shard)
    # opened first: a bad VCF, index or region fails before the model loads
    read_variants(options.vcf, genome.contigs, regions=options.regions, chroms=options.chroms)
    length_differences = contig_length_differences(options.vcf, genome.contigs)
    for difference in length_differences:
        log.warning(_length_message(difference))
    if model is None:
        source = options.model or default_model_source()
        model, model_sha256 = load_model(source, device=devices[0] if len(devices) == 1 else "cpu"), \
            source_digest(source)
    else:
        source, model_sha256 = "<in-memory model>", _model_digest(model)
        model = model.to(devices[0])
    targets, tracks = options.head_tracks(model.config.heads)
    precision = options.precision or default_precision(torch.device(devices[0]))
    if options.reuse is None:
        options = dataclasses.replace(options, reuse=torch.device(devices[0]).type == "cuda")
    settings = options.output_settings() | {"prefix": options.prefix or _default_prefix(options.vcf),
                                            "precision": precision}
    provenance = {"enformer_vep_version": __version__, "model_sha256": model_sha256,
                  "vcf": os.path.abspath(options.vcf), "fasta": os.path.abspath(options.fasta),
                  "fasta_index_sha256": genome.index_checksum()}
    vcf_stat = os.stat(options.vcf)
    fingerprint = provenance | {"contig_length_differences": length_differences,
                                "vcf_size": vcf_stat.st_size, "vcf_mtime_ns": vcf_stat.st_mtime_ns,
                                "options": settings}
    if options.shard:
        fingerprint["shard"] = "{}/{}".format(*options.shard)
    run = RunDirectory(options.out_dir, settings["prefix"], fingerprint, overwrite=options.overwrite)
    attrs = provenance | {"model_source": str(source), "options": json.dumps(settings, sort_keys=True),
                          "statistics": json.dumps({k: STATISTICS[k] for k in options.stats})}

    done = run.completed()
    if done is None:
        if len(devices) == 1:
            blocks = _score_part(options, part, devices[0], 0, 1, run, model=model, progress=options.progress)
        else:
            del model
            blocks = _run_workers(options, part, devices, run)
        extra = {"shard": None} if part is None else {
            "shard": [part.shard, part.shards], "layout": [list(c) for c in layout.contigs],
            "layout_sha256": layout.digest(), "checkpoint_every": options.checkpoint_every,
            "blocks": sorted([chrom, index] for chrom, index in part.blocks)}
        done = run.finish(blocks, targets.subset(tracks), options.stats, attrs, percentiles=options.percentiles,
                          extra=extra)
    summary = Summary.from_done(done, run.out, time.monotonic() - started)
    summary.contig_lengths = length_differences
    if summary.scored == 0:
        detail = ", ".join(f"{n} {reason}" for reason, n in summary.skipped.items()) or "the VCF holds no records"
        if part is None:
            raise InputError(f"no variant was scored ({detail}); see {run.out / 'skipped.tsv'}")
        log.warning("shard %d/%d scored no variant (%s)", part.shard, part.shards, detail)
    if options.vcf_out:  # rebuilt on every run: cheap, and never stale
        write_annotated_vcf(options.vcf, summary.files, options.vcf_out, regions=options.regions, chroms=options.chroms)
    return summary


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


def _score_part(options: ScoreOptions, part: Part | None, device: str, worker: int, workers: int,
                run: RunDirectory, *, model=None, progress: bool | None = False) -> list[tuple[str, int]]:
    """Stage this worker's blocks of ``part`` (None: the whole stream): the ``worker``-th of every
    ``workers`` blocks in stream order. Returns every block of the part, in stream order."""
    genome = Genome(options.fasta)
    if part is not None and not part.blocks:
        return []
    chroms = options.chroms if part is None or part.read_chroms is None else part.read_chroms
    variants = read_variants(options.vcf, genome.contigs, regions=options.regions, chroms=chroms,
                             pass_only=options.pass_only)
    if model is None:
        model = load_model(options.model, device=device)
    _, tracks = options.head_tracks(model.config.heads)
    scorer = VariantScorer(model, head=options.organism, tracks=tracks, stats=options.stats, rc=options.rc,
                           shifts=options.shifts, device=device, batch_size=options.batch_size,
                           precision=options.precision, reuse=options.reuse, compile=options.compile)
    if part is not None:
        total = part.records
    else:
        total = None if options.regions or options.chroms else _indexed_record_count(options.vcf)
    offset = 0 if part is None else part.record_offset
    blocks, records = _stream(options, part, variants, genome, scorer, run, worker, workers, offset,
                              _Progress(progress, total))
    if part is not None and (set(blocks) != part.blocks or records != part.records):
        raise InputError(f"{options.vcf} does not hold the records its index counts ({part.records} expected in "
                         f"shard {part.shard}/{part.shards}, {records} read): rebuild the index")
    return blocks


@dataclasses.dataclass
class _Block:
    chrom: str
    index: int
    in_part: bool  # one of the blocks this run (or shard) covers
    mine: bool  # in the part, this worker's, and not staged yet
    rows: list = dataclasses.field(default_factory=list)
    skips: list = dataclasses.field(default_factory=list)
    mismatched: int = 0


def _stream(options: ScoreOptions, part: Part | None, variants, genome: Genome, scorer: VariantScorer,
            run: RunDirectory, worker: int, workers: int, offset: int,
            progress: _Progress) -> tuple[list[tuple[str, int]], int]:
    """Read the stream block by block, scoring and staging the blocks this worker owns and has not
    staged yet. Returns the part's blocks in stream order and how many records they hold."""
    size = options.checkpoint_every
    seen: collections.Counter = collections.Counter()  # records read per contig
    current: dict[str, _Block] = {}  # the block being read, per contig
    blocks: list[tuple[str, int]] = []
    records = 0
    window_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="windows")
    blocks_reader = GenomeBlocks(Genome(options.fasta))  # the window thread's own reader

    def flush(block: _Block) -> None:
        if block.mine:
            _score_chunk(run, scorer, window_thread, blocks_reader, block)

    last_record, block = -1, None
    try:
        for item in variants:
            if item.record != last_record:
                last_record = item.record
                progress.update()
                index = seen[item.chrom] // size
                seen[item.chrom] += 1
                block = current.get(item.chrom)
                if block is None or block.index != index:
                    if block is not None:
                        flush(block)
                    in_part = part is None or (item.chrom, index) in part.blocks
                    mine = in_part and len(blocks) % workers == worker and not run.chunk_done(item.chrom, index)
                    if in_part:
                        blocks.append((item.chrom, index))
                    block = current[item.chrom] = _Block(item.chrom, index, in_part, mine)
                records += block.in_part
            if not block.mine:
                continue
            item, mismatch = _checked(item, genome, options.ref_mismatch)
            if isinstance(item, Skip):
                block.skips.append(dataclasses.replace(item, record=item.record + offset))
            else:
                block.rows.append(item)
                block.mismatched += mismatch
        for block in current.values():
            flush(block)
    finally:
        progress.close()
        window_thread.shutdown()
    return blocks, records


def _run_workers(options: ScoreOptions, part: Part | None, devices: list[str],
                 run: RunDirectory) -> list[tuple[str, int]]:
    """One process per device, each staging its share of the blocks; the first failure stops all."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    results = context.Queue()
    processes = [context.Process(target=_worker_main, name=f"enformer-vep {device}", daemon=True,
                                 args=(results, options, part, device, w, len(devices), run.out, run.prefix))
                 for w, device in enumerate(devices)]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[str, object]] = {}
    try:
        while len(outcomes) < len(processes):
            try:
                w, status, value = results.get(timeout=1.0)
                outcomes[w] = (status, value)
                if status == "error":
                    raise EnformerVepError(f"worker on {devices[w]}: {value}")
            except queue.Empty:
                for w, process in enumerate(processes):
                    if w not in outcomes and not process.is_alive() and results.empty():
                        raise EnformerVepError(f"the worker on {devices[w]} died (exit code {process.exitcode}); "
                                               "rerun the same command to resume") from None
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    return outcomes[0][1]


def _worker_main(results, options: ScoreOptions, part: Part | None, device: str, worker: int, workers: int,
                 out: Path, prefix: str) -> None:
    # CPU workers keep torch's default thread count: CPU sums depend on it, and must match one process's
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{device}] %(message)s", stream=sys.stderr)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        run = RunDirectory(out, prefix, {}, attach=True)
        blocks = _score_part(options, part, device, worker, workers, run,
                             progress=options.progress if worker == 0 else False)
        results.put((worker, "ok", blocks))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which stops the run
        results.put((worker, "error", str(error)))


def _exit_with_parent(parent: int) -> None:
    """A worker outlives a killed parent otherwise, and would race the rerun for the same blocks."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _score_chunk(run: RunDirectory, scorer: VariantScorer, window_thread: ThreadPoolExecutor, blocks: GenomeBlocks,
                 block: _Block) -> None:
    """Score a block's rows in groups of ``batch_size`` variants and stage it with its skipped rows.

    The next group's windows are built on ``window_thread`` while the device scores this one.
    """
    def windows(group: list[Allele]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [allele_windows(blocks, r.fasta_chrom, r.pos, r.ref, r.alt) for r in group]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    rows, size = block.rows, scorer.batch_size
    groups = [rows[start:start + size] for start in range(0, len(rows), size)]
    parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    pending = window_thread.submit(windows, groups[0]) if groups else None
    for k in range(len(groups)):
        ref, alt = pending.result()
        if k + 1 < len(groups):
            pending = window_thread.submit(windows, groups[k + 1])
        for name, values in scorer.score(ref, alt).items():
            parts[name].append(values)
    stats16, clipped = {}, {}
    for name, values in parts.items():
        stats16[name], clipped[name] = to_float16(np.concatenate(values))
    run.write_chunk(block.chrom, block.index, rows, stats16, clipped, block.skips, block.mismatched)


def _indexed_record_count(vcf: str) -> int | None:
    """Records in an indexed VCF/BCF from its index's statistics (for the progress bar's ETA); None
    without an index or statistics."""
    handle = open_vcf(vcf)
    try:
        counts = index_record_counts(vcf, list(handle.seqnames))
    except InputError:  # an unreadable index is only refused where records are read through it
        counts = None
    finally:
        handle.close()
    return None if counts is None else sum(counts.values())
