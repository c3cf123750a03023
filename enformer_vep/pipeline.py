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
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .atomic import sha256_file
from .errors import EnformerVepError, InputError, plural, preview
from .genes import GeneAnnotation, allele_gene_bins, read_annotation
from .genome import Genome, GenomeBlocks
from .output import byte_strings
from .rundir import RunDirectory
from .scoring import GENE_STATISTICS, STATISTICS, VariantScorer, default_device, default_precision, to_float16
from .shards import Part, record_layout, shard_part
from .targets import Targets, head_targets, select_tracks
from .text import from_bytes
from .variants import (
    UNKNOWN_CONTIG,
    Allele,
    Skip,
    canonical_selection,
    contig_length_differences,
    open_vcf,
    read_variants,
)
from .vcf_index import index_record_counts
from .vcf_out import check_vcf_out_path, write_annotated_vcf
from .weights import default_model_source, load_model, source_digest
from .windows import VARIANT_OFFSET, WINDOW, ref_matches

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
    tiles: bool = True  # with reuse: conv-tower tiles shared by a block's windows where they pay
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
    max_ref_mismatch: float = 0.1  # stop when more of the first REF_SAMPLE alleles mismatch the FASTA
    genes: str | None = None  # GTF, GFF3 or BED6 of TSSs: also score each gene near a variant (genes files)
    gene_types: tuple[str, ...] | None = None  # keep only these gene types; None: all
    tss_bins: int = 3  # output bins per TSS: its own and (tss_bins - 1) / 2 either side
    gene_stats: tuple[str, ...] = tuple(GENE_STATISTICS)

    def head_tracks(self, heads: dict[str, int]) -> tuple[Targets, np.ndarray]:
        """The scored head's track table and the columns ``tracks`` chooses (int64 ``[T]``)."""
        targets = head_targets(self.organism, heads, self.targets)
        return targets, select_tracks(self.tracks, targets)

    def output_settings(self) -> dict:
        """The options that shape the output (a rerun must repeat them to resume)."""
        keep = ("pass_only", "ref_mismatch", "stats", "rc", "shifts", "tracks", "reuse", "tiles", "compile",
                "organism", "targets", "percentiles", "checkpoint_every", "prefix", "genes", "gene_types",
                "tss_bins", "gene_stats")
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k in keep}
        # the records selected, named as the VCF names them: `1:1-9` and `chr1:1-9` are one setting
        return settings | {"regions": canonical_selection(self.vcf, self.regions, self.chroms), "chroms": []}


@dataclasses.dataclass
class Summary:
    scored: int
    skipped: collections.Counter
    ref_mismatch_scored: int
    clipped: dict
    seconds: float
    files: dict
    contig_lengths: list = dataclasses.field(default_factory=list)  # variants.contig_length_differences
    already_done: bool = False  # the run was complete (done.json verified) before this call
    gene_files: dict = dataclasses.field(default_factory=dict)  # {chrom: (genes file, (allele, gene) rows)}

    @classmethod
    def from_done(cls, done: dict, out: Path, seconds: float) -> Summary:
        """The summary a completion record (``done.json``) holds."""
        counts = done["summary"]
        files = {entry["chrom"]: out / name for name, entry in done["files"].items() if "chrom" in entry}
        genes = {entry["genes_of"]: (out / name, entry["rows"]) for name, entry in done["files"].items()
                 if "genes_of" in entry}
        return cls(counts["scored"], collections.Counter(counts["skipped"]), counts["ref_mismatch_scored"],
                   counts["clipped"], seconds, files, gene_files=genes)

    @property
    def ref_mismatches(self) -> tuple[int, int]:
        """(alleles whose REF differs from the FASTA, alleles whose REF was checked)."""
        skipped = self.skipped.get(REF_MISMATCH, 0)
        return skipped + self.ref_mismatch_scored, self.scored + skipped

    def lines(self) -> list[str]:
        if self.already_done:
            out = [f"the run was already complete (done.json verified): nothing was redone; "
                   f"{plural(self.scored, 'variant allele')} scored"]
        else:
            rate = self.scored / self.seconds if self.seconds > 0 else float("nan")
            out = [f"scored {plural(self.scored, 'variant allele')} in {self.seconds:.1f} s ({rate:.2f} variants/s)"]
        out += [f"skipped {n}: {reason}" for reason, n in sorted(self.skipped.items())]
        mismatched, checked = self.ref_mismatches
        if checked:
            out.append(f"REF differs from the FASTA for {mismatched} of {plural(checked, 'allele')} "
                       f"({mismatched / checked:.2%})")
        if self.ref_mismatch_scored:
            out.append(f"scored despite a REF mismatch: {self.ref_mismatch_scored}")
        out += [f"{name}: {n} values clipped to the float16 range" for name, n in self.clipped.items() if n]
        out += [_length_message(d) for d in self.contig_lengths]
        verb = "kept" if self.already_done else "wrote"
        out += [f"{verb} {path}" for path in self.files.values()]
        out += [f"{verb} {path} ({plural(rows, 'allele-gene pair')})" for path, rows in self.gene_files.values()]
        return out


def _length_message(difference: dict) -> str:
    return (f"contig {difference['vcf']}: the VCF header says {difference['vcf_length']:,} bp, the FASTA's "
            f"{difference['fasta']} has {difference['fasta_length']:,} bp (a slice of it, or another assembly?)")


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


PROGRESS_EVERY = 30.0  # seconds between progress lines without a terminal


class _Progress:
    """Records done (scored, or found staged): a tqdm bar on a terminal; otherwise, unless disabled,
    a log line every ``every`` seconds from a timer, also while one long batch runs."""

    def __init__(self, enabled: bool | None, total: int | None, every: float | None = None):
        self.bar = tqdm(total=total, unit=" records", desc="scoring", unit_scale=False,
                        disable=not (sys.stderr.isatty() if enabled is None else enabled))
        self.total, self.count, self.start = total, 0, time.monotonic()
        self._stop = threading.Event()
        self._timer = None
        if self.bar.disable and enabled is not False:
            self._timer = threading.Thread(target=self._report, args=(every or PROGRESS_EVERY,), daemon=True)
            self._timer.start()

    def update(self, n: int = 1) -> None:
        self.count += n
        self.bar.update(n)

    def _report(self, every: float) -> None:
        while not self._stop.wait(every):
            elapsed = time.monotonic() - self.start
            of = f" of {self.total:,}" if self.total else ""
            log.info("scored %s%s records (%.1f/s, %.0f s)", f"{self.count:,}", of, self.count / elapsed, elapsed)

    def close(self) -> None:
        self._stop.set()
        self.bar.close()


def resolve_devices(devices: tuple[str, ...]) -> list[str]:
    """``--devices``: names as given, or ``all`` = every CUDA device."""
    if devices == ("all",):
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError("--devices all: no CUDA device is visible")
        return [f"cuda:{i}" for i in range(count)]
    return [default_device(device) for device in devices]


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
    # every input and option is checked before the model loads and anything is scored
    _check_options(options)
    genome = Genome(options.fasta)
    devices = resolve_devices(options.devices) if options.devices else [default_device(options.device)]
    if model is not None and len(devices) > 1:
        raise InputError("an in-memory model runs on one device; pass --model to use several")
    part = None
    if options.shard:
        layout = record_layout(options.vcf, genome.contigs, regions=options.regions, chroms=options.chroms)
        part = shard_part(layout, options.checkpoint_every, *options.shard)
    read_variants(options.vcf, genome.contigs, regions=options.regions, chroms=options.chroms)
    _check_ref_mismatch_rate(options, genome)
    annotation = read_annotation(options.genes, genome.contigs, options.gene_types) if options.genes else None
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
    if options.genes:
        provenance |= {"annotation": os.path.abspath(options.genes), "annotation_sha256": sha256_file(options.genes)}
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
    already_done = done is not None
    if done is None:
        if len(devices) == 1:
            blocks = _score_part(options, part, devices[0], 0, 1, run, model=model, progress=options.progress,
                                 annotation=annotation)
        else:
            del model
            blocks = _run_workers(options, part, devices, run)
        extra = {"shard": None} if part is None else {
            "shard": [part.shard, part.shards], "layout": [list(c) for c in layout.contigs],
            "layout_sha256": layout.digest(), "checkpoint_every": options.checkpoint_every,
            "blocks": sorted([chrom, index] for chrom, index in part.blocks)}
        extra["vcf_out"] = os.path.abspath(options.vcf_out) if options.vcf_out else None  # --overwrite removes it
        gene_attrs = attrs | {"tss_bins": options.tss_bins,
                              "statistics": json.dumps({k: GENE_STATISTICS[k] for k in options.gene_stats})}
        done = run.finish(blocks, targets.subset(tracks), options.stats, attrs, percentiles=options.percentiles,
                          extra=extra, gene_stats=list(options.gene_stats) if options.genes else None,
                          gene_attrs=gene_attrs)
    summary = Summary.from_done(done, run.out, time.monotonic() - started)
    summary.contig_lengths, summary.already_done = length_differences, already_done
    if summary.scored == 0:
        selected = "the selected regions and contigs hold" if options.regions or options.chroms else "the VCF holds"
        detail = ", ".join(f"{n} {reason}" for reason, n in summary.skipped.items()) or f"{selected} no records"
        if part is None:
            run.withdraw()  # a run that scored nothing is not a finished run
            if set(summary.skipped) == {UNKNOWN_CONTIG}:
                detail += (f"; the VCF's records lie on {preview(_skipped_contigs(run.out / 'skipped.tsv'))}, "
                           f"the FASTA has {preview(genome.contigs)}")
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
    return Skip(item.chrom, item.pos, item.id, item.ref, item.alt, f"{REF_MISMATCH} (FASTA has {fasta_ref})",
                item.record), True


REF_MISMATCH = "REF mismatch"
REF_SAMPLE = 1_000  # alleles whose REF is checked before scoring starts


def _check_options(options: ScoreOptions) -> None:
    """Refuse option combinations and output paths before any work is done."""
    if options.vcf_out:
        if options.shard:
            raise InputError("--vcf-out annotates a whole run: give it to `enformer-score merge` instead of the "
                             "shards")
        if "SAD" not in options.stats:
            raise InputError("--vcf-out needs SAD among --stats")
        check_vcf_out_path(options.vcf_out)
    if not 0 <= options.max_ref_mismatch <= 1:
        raise InputError(f"--max-ref-mismatch is a fraction from 0 to 1, not {options.max_ref_mismatch}")
    if options.tss_bins < 1 or options.tss_bins % 2 == 0:
        raise InputError(f"--tss-bins is an odd number of bins (the TSS's own and as many on each side), "
                         f"not {options.tss_bins}")
    unknown = set(options.gene_stats) - set(GENE_STATISTICS)
    if unknown or not options.gene_stats:
        raise InputError(f"--gene-stats takes {', '.join(GENE_STATISTICS)}, not {', '.join(sorted(unknown)) or '-'}")


def _check_ref_mismatch_rate(options: ScoreOptions, genome: Genome) -> None:
    """Stop before scoring when REF differs from the FASTA for more than ``max_ref_mismatch`` of the
    first :data:`REF_SAMPLE` alleles (at least 5 of them): a FASTA of another assembly would
    otherwise be scored, half its alleles skipped and the rest on the wrong sequence."""
    if options.max_ref_mismatch >= 1:
        return
    checked = mismatched = 0
    for item in read_variants(options.vcf, genome.contigs, regions=options.regions, chroms=options.chroms,
                              pass_only=options.pass_only):
        if isinstance(item, Allele):
            checked += 1
            mismatched += not ref_matches(genome, item.fasta_chrom, item.pos, item.ref)[0]
            if checked == REF_SAMPLE:
                break
    if mismatched >= 5 and mismatched > options.max_ref_mismatch * checked:
        raise InputError(f"REF differs from the FASTA for {mismatched} of the first {plural(checked, 'allele')} "
                         f"({mismatched / checked:.0%}): the FASTA is probably not the assembly the VCF was called "
                         f"on (check both; hg19/GRCh37 vs hg38/GRCh38?); --max-ref-mismatch 1 scores anyway")


def _skipped_contigs(path: Path) -> list[str]:
    """The contigs of the rows in ``skipped.tsv``, in order of first appearance."""
    with open(path, "rb") as f:
        next(f)
        return list(dict.fromkeys(from_bytes(line.split(b"\t", 1)[0]) for line in f))


def _score_part(options: ScoreOptions, part: Part | None, device: str, worker: int, workers: int,
                run: RunDirectory, *, model=None, progress: bool | None = False,
                annotation: GeneAnnotation | None = None) -> list[tuple[str, int]]:
    """Stage this worker's blocks of ``part`` (None: the whole stream): the ``worker``-th of every
    ``workers`` blocks in stream order. Returns every block of the part, in stream order. With
    ``options.genes``, genes are scored too (``annotation``: that file read already)."""
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
                           precision=options.precision, reuse=options.reuse, tiles=options.tiles,
                           compile=options.compile, gene_stats=options.gene_stats)
    if part is not None:
        total = part.records
    else:
        total = None if options.regions or options.chroms else _indexed_record_count(options.vcf)
    offset = 0 if part is None else part.record_offset
    if options.genes and annotation is None:
        annotation = read_annotation(options.genes, genome.contigs, options.gene_types)
    blocks, records = _stream(options, part, variants, genome, scorer, run, worker, workers, offset,
                              _Progress(progress, total), annotation)
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
    records: int = 0  # records read into this block
    rows: list = dataclasses.field(default_factory=list)
    skips: list = dataclasses.field(default_factory=list)
    mismatched: int = 0


def _stream(options: ScoreOptions, part: Part | None, variants, genome: Genome, scorer: VariantScorer,
            run: RunDirectory, worker: int, workers: int, offset: int,
            progress: _Progress, annotation: GeneAnnotation | None = None) -> tuple[list[tuple[str, int]], int]:
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
            _score_chunk(run, scorer, window_thread, blocks_reader, block, progress, annotation, options.tss_bins)

    last_record, block = -1, None
    try:
        for item in variants:
            if item.record != last_record:
                last_record = item.record
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
                block.records += 1
                if block.in_part and not block.mine:  # staged before, or another worker's
                    progress.update()
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


STOP_SECONDS = 30  # how long a stopped worker may take to exit before it is killed


def _run_workers(options: ScoreOptions, part: Part | None, devices: list[str],
                 run: RunDirectory) -> list[tuple[str, int]]:
    """One process per device, each staging its share of the blocks; the first failure stops all."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    results = context.Queue()
    processes = [context.Process(target=_worker_main, name=f"enformer-vep {device}", daemon=True,
                                 args=(results, options, part, device, w, len(devices), run.out, run.prefix))
                 for w, device in enumerate(devices)]
    _start_ignoring_ctrl_c(processes)
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
        for process in processes:
            process.join(timeout=STOP_SECONDS)
            if process.is_alive():  # stuck in a device call: its staged blocks are whole anyway
                process.kill()
                process.join()
    return outcomes[0][1]


def _start_ignoring_ctrl_c(processes: list) -> None:
    """Start the workers with SIGINT ignored, which they keep across exec: Ctrl-C reaches the whole process
    group, and only the parent should answer it (it stops the workers); each would print a traceback."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python handles signals
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        for process in processes:
            process.start()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def _worker_main(results, options: ScoreOptions, part: Part | None, device: str, worker: int, workers: int,
                 out: Path, prefix: str) -> None:
    # CPU workers keep torch's default thread count: CPU sums depend on it, and must match one process's
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{device}] %(message)s", stream=sys.stderr)
    # stopped by the parent: exit through Python, which removes a half-written staging file and releases the
    # semaphores this process holds (else the resource tracker warns of leaked ones)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
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
                 block: _Block, progress: _Progress, annotation: GeneAnnotation | None = None,
                 tss_bins: int = 3) -> None:
    """Score a block's rows (``VariantScorer.score_block``: windows and tiles built on ``window_thread`` from
    ``blocks`` while the device computes) and stage it with its skipped rows, and with ``annotation`` its
    (allele, gene) rows. Progress advances with the rows scored (the block's records in proportion to its
    rows)."""
    rows, counted = block.rows, 0

    def advance(scored: int) -> None:
        nonlocal counted
        done = block.records * scored // len(rows)
        progress.update(done - counted)
        counted = done

    genes = None if annotation is None else [
        allele_gene_bins(annotation, r.fasta_chrom, r.pos, len(r.ref), min(len(r.alt), WINDOW - VARIANT_OFFSET),
                         tss_bins) for r in rows]
    values = scorer.score_block(blocks, rows, executor=window_thread, progress=advance, genes=genes)
    stats16, clipped = {}, {}
    for name in scorer.stats if rows else ():  # a block of skipped records only has no statistics
        stats16[name], clipped[name] = to_float16(values[name])
    gene_rows = None if genes is None or not rows else \
        _gene_rows(annotation, genes, {k: values[k] for k in scorer.gene_stats})
    run.write_chunk(block.chrom, block.index, rows, stats16, clipped, block.skips, block.mismatched, genes=gene_rows)
    progress.update(block.records - counted)


def _gene_rows(annotation: GeneAnnotation, genes: list, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A block's (allele, gene) rows as staged (``RunDirectory.write_chunk``): ``si`` (the allele's row in
    the block), the gene's fields, ``tss_distance``, ``n_tss`` and each statistic clipped to float16."""
    pairs = [(i, pair) for i, allele in enumerate(genes) for pair in allele]
    described = [annotation.genes[pair.gene] for _, pair in pairs]
    rows = {"si": np.array([i for i, _ in pairs], np.uint32),
            "tss_distance": np.array([pair.tss_distance for _, pair in pairs], np.int32),
            "n_tss": np.array([pair.n_tss for _, pair in pairs], np.uint16)}
    for field in ("gene_id", "gene_name", "gene_type", "strand"):
        rows[field] = byte_strings(getattr(gene, field) for gene in described)
    for name, array in values.items():
        rows[f"stat_{name}"], rows[f"clipped_{name}"] = to_float16(array)
    return rows


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
