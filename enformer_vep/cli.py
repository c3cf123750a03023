"""The ``enformer-score`` command line: parses options and calls the library."""
from __future__ import annotations

import difflib
import errno
import logging
import os
import re
import sys

import click

from .errors import EnformerVepError, plural

LOG_FORMAT = "%(asctime)s %(message)s"


def _report(line: str) -> None:
    """A result line, on stderr and timestamped like the run's log lines."""
    record = logging.LogRecord("enformer_vep", logging.INFO, "", 0, line, None, None)
    click.echo(logging.Formatter(LOG_FORMAT).format(record), err=True)


class _Commands(click.Group):
    """``enformer-score VCF ...`` runs ``score``; a library :class:`EnformerVepError` becomes a
    one-line ``Error: ...`` and exit status 1."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            if not os.path.exists(args[0]) and not re.search(r"[./\\]", args[0]):
                # a word that is neither a file nor a path: a mistyped command, not a VCF
                close = difflib.get_close_matches(args[0], list(self.commands), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; the commands are {', '.join(self.commands)}"
                raise click.UsageError(f"no such command or VCF file: {args[0]!r}{hint}", ctx)
            args = ["score", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # click would print a bare "Aborted!"
            click.echo("Interrupted: a scoring run or merge resumes where it stopped when the same command is run "
                       "again", err=True)
            ctx.exit(130)  # the shell's status for a program ended by SIGINT
        except EnformerVepError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:  # full disk, permissions...: one line, never a traceback
            where = f"{error.filename}: " if error.filename else ""
            if error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error):
                raise click.ClickException(f"{where}no space left on the device: free some space (or write "
                                           f"elsewhere) and rerun the same command; a scoring run or merge "
                                           f"resumes where it stopped") from None
            raise click.ClickException(f"{where}{error.strerror or error}") from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="enformer-vep")
def cli():
    """Score genetic variants with DeepMind's Enformer (a faithful PyTorch port).

    \b
    enformer-score in.vcf.gz --fasta hg38.fa -o scores/     (same as: enformer-score score ...)
    enformer-score in.vcf.gz --fasta hg38.fa -o part3/ --shard 3/10   (one task of ten)
    enformer-score merge part*/ -o scores/
    enformer-score convert SOURCE model.safetensors
    enformer-score index in.vcf                      (bgzip + tabix, no other tool needed)
    enformer-score top scores/ -n 20                 (the alleles with the largest effects)
    """


# Options several commands share, declared once.
FASTA_OPTION = click.option(
    "--fasta", required=True, type=click.Path(dir_okay=False),
    help="Reference FASTA, plain or bgzip-compressed; its .fai (and .gzi) are built when missing and refused "
         "when they no longer match it. Soft-masked bases are upper-cased.")
DEVICE_OPTION = click.option("--device", help="Torch device. Default: cuda when available, else cpu.")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _words(text: str) -> list[str]:
    """Comma-separated words, blanks dropped."""
    return [w.strip() for w in text.split(",") if w.strip()]


def _batch_size(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"expected 'auto' or a positive integer, got {text!r}")
    return int(text)


def _devices(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    if not devices or ("all" in devices and len(devices) > 1):
        raise click.BadParameter(f"expected a comma-separated list of devices or 'all', got {text!r}")
    return devices


def _shard(text: str | None) -> tuple[int, int] | None:
    from .errors import InputError
    from .shards import parse_shard
    if text is None:
        return None
    try:
        return parse_shard(text)
    except InputError as error:
        raise click.BadParameter(str(error)) from None


def _stats(text: str) -> tuple[str, ...]:
    from .scoring import parse_statistics
    try:
        return tuple(parse_statistics(text))
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@cli.command()
@click.argument("vcf", type=click.Path(dir_okay=False))
@FASTA_OPTION
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False),
              help="Output directory: one PREFIX.CHROM.h5 per chromosome, skipped.tsv and run.json.")
@click.option("--model", metavar="SOURCE",
              help="Weights: our .safetensors, a TF-Hub SavedModel directory or .tar.gz, a Sonnet checkpoint "
                   "prefix, an enformer-pytorch directory, or a URL. Default: $ENFORMER_VEP_MODEL, else the "
                   "official TF-Hub Enformer (downloaded once into the cache).")
@click.option("--prefix", help="Output file prefix. Default: the VCF's name without .vcf/.bcf/.gz.")
@click.option("--region", "regions", multiple=True, metavar="CHR:START-END",
              help="Score only records whose POS lies in this 1-based inclusive region (repeatable; "
                   "needs a .tbi/.csi index). VCF or FASTA contig naming both work.")
@click.option("--chrom", "chroms", multiple=True, metavar="NAME",
              help="Score only this contig (repeatable; needs an index).")
@click.option("--pass-only", is_flag=True, help="Skip records whose FILTER is not PASS (counted in skipped.tsv).")
@click.option("--ref-mismatch", type=click.Choice(["skip", "error", "score"]), default="skip", show_default=True,
              help="When REF differs from the FASTA: skip the allele (listed in skipped.tsv), stop with an "
                   "error, or score it anyway (the windows use the FASTA's bases).")
@click.option("--max-ref-mismatch", type=click.FloatRange(0, 1), default=0.1, show_default=True, metavar="FRACTION",
              help="Stop before scoring when REF differs from the FASTA for more than this fraction of the first "
                   "1,000 alleles (and at least 5): a sign of a FASTA of another assembly. 1 never stops.")
@DEVICE_OPTION
@click.option("--devices", callback=lambda c, p, v: _devices(v), metavar="LIST|all",
              help="Several devices on this node, comma-separated (cuda:0,cuda:1) or 'all' (every CUDA "
                   "device): one worker process per device, each scoring every n-th block of records; the "
                   "output is identical to one device's. Replaces --device.")
@click.option("--shard", callback=lambda c, p, v: _shard(v), metavar="K/N",
              help="Score only shard K of N (1 <= K <= N): the blocks of --checkpoint-every records whose "
                   "first record lies in the K-th of N equal parts of the VCF (by an indexed VCF's record "
                   "counts, or one counting pass). N tasks writing N output directories cover every record "
                   "exactly once; `enformer-score merge` combines them into the files one run would write.")
@click.option("--batch-size", default="auto", show_default=True, callback=lambda c, p, v: _batch_size(v),
              help="Sequences per forward pass (each variant needs 2 x shifts x (2 with --rc) sequences). "
                   "auto: on CUDA start at 32 and halve after an out-of-memory error until a batch fits; "
                   "4 on CPU.")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16", "bf16/tf32", "bf16/fp32"]),
              help="Trunk arithmetic: fp32, tf32 (TF32 matmuls, CUDA) or bf16 (autocast) for both stages, or "
                   "CONV/TRANSFORMER: bf16/tf32 and bf16/fp32 run the conv tower in bf16 and the transformer "
                   "in tf32 or fp32. The transformer's residual stream, the output heads and the statistics "
                   "are always float32. With --reuse, the bins an SNV/MNP changes are recomputed for both "
                   "alleles at the transformer's precision. Default: fp32 on CPU, bf16/tf32 on CUDA (the "
                   "fastest that agrees with fp32 at median r >= 0.999 on an H200).")
@click.option("--compile", is_flag=True,
              help="torch.compile the conv tower and the transformer: about 1.4x the variants/s on an H200 "
                   "after ~30 s of compilation per process (and a little more for each new batch shape).")
@click.option("--reuse/--no-reuse", default=None,
              help="Reference-trunk reuse: for an SNV or MNP, compute the conv tower once for the reference "
                   "and recompute only the few positions the change reaches (about 1.5-2x faster). Equal to "
                   "two full passes up to float rounding, but that rounding differs from two passes', which "
                   "shows on effects near float32 noise. Default: on with CUDA (where TF32/bf16 rounding is "
                   "larger anyway), off on CPU (two full passes, as the reference computation).")
@click.option("--tiles/--no-tiles", default=True, show_default=True,
              help="With --reuse: within each block (--checkpoint-every records), compute the reference conv "
                   "tower once over the stretch that neighbouring windows share, and give each window, "
                   "indels included, its bins from there, recomputing only the bins near its ends and near "
                   "the allele. Used where it computes fewer bins than one pass per window (dense VCFs); "
                   "equal to two full passes up to float rounding.")
@click.option("--stats", default="SAD,SAR", show_default=True, callback=lambda c, p, v: _stats(v),
              help="Comma-separated statistics: SAD, SAR, SADR, SAX, D1, D2 (formulas in README).")
@click.option("--rc", is_flag=True, help="Average forward and reverse-complement predictions (bins flipped back).")
@click.option("--shifts", default="0", show_default=True, callback=lambda c, p, v: _ints(v),
              help="Comma-separated shifts in bp (e.g. -1,0,1): the window is moved by each before its "
                   "centre is taken, and the predictions are averaged.")
@click.option("--tracks", metavar="SPEC",
              help="Tracks to score: indices and inclusive ranges (0-9,15) or a regular expression "
                   "searched in the track descriptions (e.g. '^CAGE:'). Default: all. The head computes "
                   "only these tracks.")
@click.option("--organism", type=click.Choice(["human", "mouse"]), default="human", show_default=True,
              help="Output head to score.")
@click.option("--targets", type=click.Path(dir_okay=False, exists=True),
              help="Track table (Basenji targets format) for a model with other heads. Default: the "
                   "released model's targets_human.txt / targets_mouse.txt.")
@click.option("--percentiles", is_flag=True,
              help="Also write basenji's 'percentiles' and '<STAT>_pct' (per-track quantiles over all rows).")
@click.option("--overwrite", is_flag=True,
              help="Delete this output directory's previous results and start afresh. Without it, rerunning "
                   "the same command resumes an interrupted run, and different settings are refused.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Records per block: each block of a contig's records is staged as one checkpoint (an "
                   "interrupted run redoes at most one block per contig and device) and is the unit that "
                   "--shard and --devices distribute. Shards and their single-run equivalent must use the "
                   "same value.")
@click.option("--vcf-out", type=click.Path(dir_okay=False), metavar="PATH.vcf.gz",
              help="Also write the VCF's records with INFO fields ENFORMER_<FAMILY>_SAD and ENFORMER_<FAMILY>_TRACK "
                   "per assay family (CAGE, DNASE, CHIP, ATAC...: the track description before ':'): the SAD "
                   "of the family's track of largest |SAD| for each ALT allele, and that track's identifier "
                   "('.' for alleles not scored). bgzip-compressed, with a .tbi index. Needs SAD in --stats; "
                   "with --shard, give it to `merge` instead.")
@click.option("--genes", type=click.Path(dir_okay=False, exists=True), metavar="GTF|GFF3|BED",
              help="Also score genes: every gene with a transcription start site (TSS) among a variant's 896 "
                   "output bins gets SED/logSED per track, summed over its TSS bins, in "
                   "OUT/PREFIX.CHROM.genes.h5. A GTF or GFF3 (plain or gzip; GENCODE or Ensembl; TSS = each "
                   "transcript's 5' end) or a BED6 of TSSs (name = gene, strand).")
@click.option("--gene-types", metavar="LIST", callback=lambda c, p, v: tuple(_words(v)) if v else None,
              help="With --genes: keep only these gene types (comma-separated, e.g. protein_coding,lncRNA: "
                   "GENCODE gene_type, Ensembl gene_biotype). Default: all.")
@click.option("--tss-bins", type=click.IntRange(min=1), default=3, show_default=True,
              help="With --genes: output bins per TSS, odd: the TSS's own bin and (N-1)/2 on each side, as the "
                   "Enformer paper's gene-expression evaluation (3).")
@click.option("--gene-stats", default="SED,logSED", show_default=True, callback=lambda c, p, v: tuple(_words(v)),
              help="With --genes: SED = sum over the TSS bins of alt minus ref; logSED = log2(alt sum + 1) - "
                   "log2(ref sum + 1).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar. Default: a bar on a terminal, a log line every 30 s otherwise.")
def score(**kwargs):
    """Score every ALT allele of VCF (VCF, VCF.gz or BCF) with Enformer: SAD/SAR per track.

    Windows of 393,216 bp are centred on each variant (its first base at window offset
    196,607, N beyond the chromosome ends); skipped records (symbolic or invalid alleles,
    REF mismatches, unknown contigs...) are counted and listed in OUT/skipped.tsv, never
    dropped silently. Rerunning the same command after an interruption resumes it.
    """
    from .pipeline import ScoreOptions, score_vcf

    if kwargs["device"] and kwargs["devices"]:
        raise click.UsageError("give --device or --devices, not both")
    summary = score_vcf(ScoreOptions(**kwargs))
    for line in summary.lines():
        _report(line)
    if kwargs["vcf_out"]:
        _report(f"wrote {kwargs['vcf_out']}")


@cli.command()
@click.argument("shard_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False),
              help="Output directory for the merged PREFIX.CHROM.h5 files, skipped.tsv, run.json, done.json.")
@click.option("--overwrite", is_flag=True, help="Replace a different earlier result in OUT_DIR.")
@click.option("--vcf-out", type=click.Path(dir_okay=False),
              help="Also write the run's VCF annotated with the merged scores (see `score --vcf-out`).")
def merge(shard_dirs, out_dir, overwrite, vcf_out):
    """Merge the output directories of `--shard K/N` runs into the files one run would write.

    Every shard 1..N of the same run (same VCF, FASTA, model and options) must be given, each
    once and finished (its done.json verified by checksum); anything else is refused with the
    reason. Rows are concatenated per chromosome in VCF order, skipped.tsv in record order, and
    percentiles (with --percentiles) recomputed from all rows. Rerun it after an interruption.
    """
    from .merge import merge_runs

    done = merge_runs(shard_dirs, out_dir, overwrite=overwrite, vcf_out=vcf_out)
    files = len([f for f, entry in done["files"].items() if "chrom" in entry])
    _report(f"merged {plural(len(shard_dirs), 'shard')}: {plural(done['summary']['scored'], 'row')} into "
            f"{plural(files, 'file')} in {out_dir}")


def _model_options(command):
    """--model, --device, --organism, --targets, --tracks, shared by the model commands."""
    for option in reversed([
        click.option("--model", metavar="SOURCE", help="Weights (as for scoring). Default: $ENFORMER_VEP_MODEL, "
                                                       "else the official TF-Hub Enformer."),
        DEVICE_OPTION,
        click.option("--organism", type=click.Choice(["human", "mouse"]), default="human", show_default=True,
                     help="Output head."),
        click.option("--targets", type=click.Path(dir_okay=False, exists=True),
                     help="Track table for a model with other heads (default: the released tables)."),
        click.option("--tracks", metavar="SPEC", help="Tracks: indices and ranges (0-9,15) or a regular expression "
                                                      "searched in the descriptions ('^CAGE:.*liver')."),
    ]):
        command = option(command)
    return command


def _choice(kwargs):
    from .jobs import ModelChoice
    return ModelChoice(**{k: kwargs.pop(k) for k in ("model", "device", "organism", "targets", "tracks")})


@cli.command()
@click.argument("regions", metavar="REGION|BED")
@FASTA_OPTION
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output HDF5 file.")
@_model_options
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True, help="Regions per pass.")
@click.option("--bigwig", "bigwig_dir", type=click.Path(file_okay=False),
              help="Also write one bigWig per track into this directory (needs pyBigWig; regions' bins must "
                   "not overlap).")
def predict(regions, fasta, out, bigwig_dir, batch_size, **kwargs):
    """Predict the 896 bins of the chosen tracks for each region.

    REGION is CHR:START-END (1-based, inclusive) or a BED file (0-based, half-open, optional name
    column). The 393,216-bp window is centred on each region; the bins cover its central
    114,688 bp (a longer region gets a warning). The HDF5 file holds chrom, start, end, name
    [R], bin_start [R, 896] (0-based genome start of each 128-bp bin), predictions
    [R, 896, T] float32, target_ids and target_labels [T].
    """
    from .jobs import predict_job

    n = predict_job(regions, fasta, out, _choice(kwargs), batch_size=batch_size, bigwig_dir=bigwig_dir)
    _report(f"wrote {out}: {plural(n, 'region')}" + (f"; bigWigs in {bigwig_dir}" if bigwig_dir else ""))


@cli.command()
@click.argument("region", metavar="REGION")
@FASTA_OPTION
@click.option("-o", "--out", "prefix", required=True, help="Output prefix: PREFIX.bedGraph and PREFIX.h5.")
@_model_options
@click.option("--bins", metavar="SPEC", help="Output bins of the objective: indices and ranges of 0..895. "
                                             "Default: the central three, 447-449.")
def contrib(region, fasta, prefix, bins, **kwargs):
    """Gradient x input contribution scores for the window centred on REGION.

    As in the official notebook: the objective is the mean of the chosen --tracks (required)
    over the chosen --bins; each base's score is the gradient of the objective with respect to
    the one-hot input, times the input, summed over A, C, G, T (so N scores 0). Scores cover the
    196,608 bp the model reads. PREFIX.bedGraph: one line per base (N left out); PREFIX.h5:
    position [L] int64, contribution [L] float32, sequence [L] S1, attributes with the settings.
    """
    from .jobs import contrib_job

    bedgraph, h5, targets = contrib_job(region, fasta, prefix, _choice(kwargs), bins=bins)
    _report(f"wrote {bedgraph} and {h5} ({plural(len(targets), 'track')})")


@cli.command()
@click.argument("scores_dir", type=click.Path(file_okay=False, exists=True), metavar="SCORES_DIR")
@click.option("-n", "--number", type=click.IntRange(min=1), default=20, show_default=True,
              help="Variant alleles to list.")
@click.option("--stat", default="SAD", show_default=True, help="Statistic to rank by (its largest |value| over "
                                                                  "the tracks).")
@click.option("--family", help="Only this assay family's tracks (CAGE, DNASE, CHIP, ATAC...: the track "
                               "description before ':'). Default: all tracks.")
@click.option("--tsv", type=click.Path(dir_okay=False), help="Also write the full table here (tab-separated).")
def top(scores_dir, number, stat, family, tsv):
    """The variant alleles of a finished run with the largest effects: per allele, the signed value
    at its strongest track (and the next two), strongest alleles first."""
    from .reader import top_variants

    table = top_variants(scores_dir, number, stat=stat, family=family)
    shown = table.copy()
    shown["description"] = [text if len(text) <= 40 else text[:37] + "..." for text in shown["description"]]
    click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:+.4g}"))
    if tsv:
        table.to_csv(tsv, sep="\t", index=False)
        _report(f"wrote {tsv}")


@cli.command()
@click.argument("scores_dir", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False),
              help="Output directory: pca.npz (when fitted) and PREFIX.CHROM.pc.tsv.gz (+ .tbi) per chromosome.")
@click.option("--components", type=click.IntRange(min=1),
              help="Principal components (default 20; with --transform: its first N, default all).")
@click.option("--stat", help="Statistic to decompose (default SAD; with --transform: the transform's).")
@click.option("--transform", "transform_path", type=click.Path(dir_okay=False, exists=True),
              help="Apply this saved pca.npz instead of fitting one (e.g. the transform of a reference set).")
@click.option("--max-rows", type=click.IntRange(min=2),
              help="Fit on this many evenly spaced variants instead of all (large runs).")
@click.option("--overwrite", is_flag=True, help="Replace pca.npz and tables already in OUT_DIR (refused otherwise).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars. Default: on a terminal; otherwise a log line every 30 s.")
def pca(scores_dir, out_dir, components, stat, transform_path, max_rows, overwrite, progress):
    """Principal components of variant scores over tracks, as tabix-indexed tables.

    Fits a PCA of SAD (centred per track) over every variant of the finished run SCORES_DIR,
    saves it as OUT/pca.npz (mean, components, explained variance, track ids), and writes per
    chromosome a bgzip-compressed, tabix-indexed TSV with the columns #CHROM POS ID REF ALT
    PC0..PC19 (PCk = (SAD - mean) . component k; each component's largest loading positive).
    """
    from .pca import run_pca

    summary = run_pca(scores_dir, out_dir, components=components, stat=stat, transform_path=transform_path,
                      max_rows=max_rows, overwrite=overwrite, progress=progress)
    explained = sum(summary["explained_variance_ratio"])
    _report(f"wrote {plural(len(summary['files']), 'table')}, {plural(summary['rows'], 'variant')}, "
            f"PC0..PC{summary['components'] - 1} of {summary['stat']} explaining {explained:.1%} of its variance")


@cli.group()
def plot():
    """Figures (PNG or PDF, by the output's extension): `plot variant`, `plot contrib`."""


@plot.command("variant")
@click.argument("variant", metavar="VARIANT")
@FASTA_OPTION
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output .png or .pdf.")
@click.option("--scores", "scores_dir", type=click.Path(file_okay=False, exists=True),
              help="A finished scoring run: VARIANT may then be a VCF ID of it, and without --tracks the "
                   "variant's --top tracks of largest |SAD| there are plotted.")
@click.option("--top", type=click.IntRange(1, 50), default=4, show_default=True,
              help="Tracks taken from --scores when --tracks is not given.")
@click.option("--genes", type=click.Path(dir_okay=False, exists=True), metavar="GTF|GFF3|BED",
              help="Draw the TSSs of this annotation's genes in the window (as for `score --genes`). Default: "
                   "the --scores run's annotation when it scored genes.")
@_model_options
def plot_variant(variant, fasta, out, scores_dir, top, genes, **kwargs):
    """Reference, alternative and alt - ref predictions around VARIANT (CHR:POS:REF:ALT).

    Two panels per track (ref and alt; alt - ref), titled with the track description, on
    1-based genome coordinates of the 896 bins (114,688 bp around the variant, which is marked).
    The predictions are computed with the model from the FASTA, as for scoring.
    """
    from .jobs import plot_variant_job

    figure = plot_variant_job(variant, fasta, out, _choice(kwargs), scores_dir=scores_dir, top=top, genes=genes)
    _report(f"wrote {out}: {plural(len(figure.axes), 'panel')}")


@plot.command("contrib")
@click.argument("region", metavar="REGION")
@FASTA_OPTION
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output .png or .pdf.")
@click.option("--from-h5", type=click.Path(dir_okay=False, exists=True),
              help="Plot the scores of this `contrib` output instead of computing them.")
@_model_options
@click.option("--bins", metavar="SPEC", help="Output bins of the objective (as for `contrib`; default 447-449).")
def plot_contrib(region, fasta, out, from_h5, bins, **kwargs):
    """Contribution scores over the window centred on REGION (as `contrib` computes them).

    One panel over the 196,608 bp the model reads; a second, base by base and coloured by base,
    over REGION itself when it is at most 2,000 bp.
    """
    from .jobs import plot_contrib_job

    figure = plot_contrib_job(region, fasta, out, _choice(kwargs), bins=bins, from_h5=from_h5)
    _report(f"wrote {out}: {plural(len(figure.axes), 'panel')}")


def _head_data(values) -> dict[str, str]:
    data = {}
    for text in values:
        head, eq, directory = text.partition("=")
        if not eq or not head or not directory:
            raise click.BadParameter(f"expected HEAD=DIR (e.g. human=data/human), got {text!r}")
        data[head] = directory
    return data


def _new_heads(values) -> list[tuple[str, int]]:
    heads = []
    for text in values:
        name, colon, n = text.partition(":")
        if not colon or not name or not n.isdigit() or int(n) < 1:
            raise click.BadParameter(f"expected NAME:N_TRACKS (e.g. mine:12), got {text!r}")
        heads.append((name, int(n)))
    return heads


@cli.command()
@click.option("--data", "data", multiple=True, required=True, callback=lambda c, p, v: _head_data(v),
              metavar="HEAD=DIR", help="A Basenji2 data directory (statistics.json, tfrecords/train-*.tfr) for "
                                       "a head; repeat for human and mouse (one step each per global step).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Trained weights (.safetensors).")
@click.option("--init", metavar="SOURCE", help="Starting weights (any form `convert` reads). Default: "
                                               "$ENFORMER_VEP_MODEL, else the official model.")
@click.option("--config", "config_json", type=click.Path(dir_okay=False, exists=True),
              help="Train a fresh random model of this EnformerConfig (JSON) instead of --init.")
@click.option("--new-head", "new_heads", multiple=True, metavar="NAME:N", callback=lambda c, p, v: _new_heads(v),
              help="Add (or replace) head NAME with N tracks, randomly initialised (fine-tuning; repeatable).")
@click.option("--freeze-trunk", is_flag=True, help="Train only the heads (trunk weights and batch statistics fixed).")
@click.option("--steps", type=click.IntRange(min=0), default=150_000, show_default=True, help="Global steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True,
              help="Peak Adam learning rate.")
@click.option("--warmup", type=click.IntRange(min=0), default=5_000, show_default=True,
              help="Linear warm-up steps to --lr.")
@click.option("--clip-grad-norm", type=click.FloatRange(min=0, min_open=True),
              help="Clip the global gradient norm to this value (default: no clipping).")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast of the forward pass (CUDA only: refused on the CPU).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of initialisation, dropout and shuffling.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences per step and head.")
@click.option("--shuffle-buffer", type=click.IntRange(min=0), default=64, show_default=True,
              help="Examples held for shuffling (a human example takes ~10 MB).")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="Checkpoint file, written atomically every --checkpoint-every steps; if it exists, training "
                   "resumes from it exactly.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True)
@DEVICE_OPTION
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar with the losses.")
def train(data, out, init, config_json, new_heads, freeze_trunk, steps, lr, warmup, clip_grad_norm, bf16, seed,
          batch_size, shuffle_buffer, checkpoint, checkpoint_every, device, progress):
    """Train or fine-tune on Basenji2 TFRecords (Poisson loss, Adam with linear warm-up)."""
    from .jobs import train_job
    from .training import TrainConfig

    config = TrainConfig(steps=steps, learning_rate=lr, warmup_steps=warmup, clip_grad_norm=clip_grad_norm,
                         bf16=bf16, seed=seed, checkpoint_every=checkpoint_every, heads=list(data))
    losses = train_job(data, out, init=init, config_json=config_json, new_heads=new_heads, freeze=freeze_trunk,
                       config=config, batch_size=batch_size, shuffle_buffer=shuffle_buffer, checkpoint=checkpoint,
                       device=device, progress=progress)
    last = ", ".join(f"{head} {loss:.4f}" for head, loss in losses[-1].items()) if losses else "no step"
    _report(f"wrote {out} after {plural(len(losses), 'step')} (last losses: {last})")


@cli.command()
@click.option("--model", required=True, metavar="SOURCE", help="Weights to evaluate.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="A Basenji2 data directory.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="valid", show_default=True)
@click.option("--head", default="human", show_default=True, help="Output head the data's tracks belong to.")
@click.option("--tracks", metavar="SPEC",
              help="Tracks to evaluate (indices/ranges or a regular expression). Default: all.")
@click.option("--targets", "targets_path", type=click.Path(dir_okay=False, exists=True),
              help="Track table naming the head's tracks (default: the released table when the head matches it).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-batches", type=click.IntRange(min=1), help="Stop after this many batches.")
@click.option("-o", "--out", type=click.Path(dir_okay=False),
              help="Per-track table (TSV: index identifier description r).")
@DEVICE_OPTION
def evaluate(model, data_dir, split, head, tracks, targets_path, batch_size, max_batches, out, device):
    """Pearson r of predictions and targets per track over all bins of a split, averaged over tracks."""
    from .jobs import evaluate_job

    result = evaluate_job(model, data_dir, split=split, head=head, tracks=tracks, targets_path=targets_path,
                          batch_size=batch_size, max_batches=max_batches, out=out, device=device)
    _report(f"{head} {split}: mean Pearson r {result.mean_r:.4f} over {plural(len(result.r), 'track')}, "
            f"{plural(result.n_sequences, 'sequence')}" + (f"; table in {out}" if out else ""))


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
def index(path):
    """Compress and index PATH as the other commands want it, without bgzip, tabix or samtools.

    \b
    in.vcf     -> in.vcf.gz (bgzip) + in.vcf.gz.tbi   (the plain file is kept)
    in.vcf.gz  -> in.vcf.gz.tbi, rebuilt (a plain-gzip file is recompressed with bgzip first)
    in.bcf     -> in.bcf.csi, rebuilt
    ref.fa     -> ref.fa.fai, rebuilt (ref.fa.gz: .fai and .gzi; plain gzip recompressed first)
    """
    from .tabix import index_input

    written = index_input(path)
    _report("wrote " + ", ".join(str(p) for p in written))


@cli.command()
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False))
def convert(source, dest):
    """Convert Enformer weights SOURCE once into our native DEST.safetensors.

    SOURCE is any of: a TF-Hub/Kaggle SavedModel directory or its .tar.gz; the Sonnet
    checkpoint prefix (e.g. enformer-fine-tuned-human-1, beside its .index and
    .data-00000-of-00001 files); an enformer-pytorch directory (config.json with
    pytorch_model.bin or model.safetensors); one of our .safetensors files; or an
    http(s) URL to a file of these kinds (downloaded into the cache, resumably).
    The architecture is read from the tensors; every tensor is CRC- and shape-checked.
    """
    from .weights import convert as convert_weights

    config = convert_weights(source, dest)
    heads = ", ".join(f"{name} {n}" for name, n in config.heads.items())
    _report(f"wrote {dest}: channels {config.channels}, {plural(config.num_transformer_layers, 'transformer layer')}, "
            f"{plural(config.num_heads, 'attention head')}, {config.pooling_type} pooling, tracks: {heads}")


def main(argv=None):
    from .allocator import configure_cpu_memory

    configure_cpu_memory()  # before the first large allocation and convolution: see allocator.py
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    cli.main(args=argv, prog_name="enformer-score")
