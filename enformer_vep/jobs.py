"""The commands around scoring (``predict``, ``contrib``, ``plot``, ``train``, ``evaluate``) as functions:
open the FASTA, load the model, choose the tracks, call the library, write the files."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np
import torch
from matplotlib.figure import Figure

from . import __version__
from .basenji_data import batches, read_statistics
from .contrib import DEFAULT_BINS, contributions, write_contrib
from .errors import InputError
from .genes import read_annotation
from .genome import Genome
from .model import BIN_SIZE, Enformer, EnformerConfig
from .output import find_variant
from .plots import MAX_PLOT_TRACKS, n_stretches, plot_contributions, plot_variant, save_figure, track_summary
from .predict import predict_regions, write_bigwigs, write_predictions_h5
from .regions import Region, bin_starts, read_regions
from .scoring import default_device
from .targets import Targets, head_targets, index_ranges, packaged_targets, require_head, select_tracks
from .text import printable
from .training import TrainConfig, evaluate, freeze_trunk, replace_head, save_trained, train
from .variants import resolve_contig
from .weights import DEFAULT_MODEL_URL, default_model_source, load_model, source_digest
from .windows import allele_windows, one_hot, ref_matches, window_start

log = logging.getLogger("enformer_vep")

ZOOM_LIMIT = 2_000  # bp: a region up to this long also gets a base-level panel


@dataclasses.dataclass
class ModelChoice:
    """The options every model command shares."""

    model: str | None = None
    device: str | None = None
    organism: str = "human"
    targets: str | None = None
    tracks: str | None = None

    @property
    def source(self) -> str:
        """The weights these options choose: ``--model``, else the default (``$ENFORMER_VEP_MODEL`` or the
        official model)."""
        return str(self.model) if self.model else default_model_source()


def one_region(text: str, genome: Genome, command: str) -> Region:
    """The single region of ``text`` (region text or BED file)."""
    regions = read_regions(text, genome.contigs)
    if len(regions) != 1:
        raise InputError(f"{command} takes one region; {text} holds {len(regions)}")
    return regions[0]


def load_head(choice: ModelChoice, source: str | None = None):
    """``(model, device, Targets of the chosen head)`` for ``choice`` (its weights, or ``source``)."""
    device = default_device(choice.device)
    model = load_model(source or choice.source, device=device)
    return model, device, head_targets(choice.organism, model.config.heads, choice.targets)


def load_tracks(choice: ModelChoice):
    """``(model, device, column indices int64 [T], their Targets)`` for ``choice``."""
    model, device, targets = load_head(choice)
    tracks = select_tracks(choice.tracks, targets)
    return model, device, tracks, targets.subset(tracks)


def provenance(source: str, genome: Genome, fasta: str, options: dict) -> dict:
    """The HDF5 file attributes saying what made an output, as the scoring outputs carry them
    (docs/spec.md §6.1): ``enformer_vep_version``, ``model_sha256``, ``model_source``, ``fasta`` (absolute),
    ``fasta_index_sha256`` and ``options`` (JSON of the command's options)."""
    return {"enformer_vep_version": __version__, "model_sha256": source_digest(source),
            "model_source": str(source), "fasta": os.path.abspath(fasta),
            "fasta_index_sha256": genome.index_checksum(), "options": json.dumps(options, sort_keys=True)}


def _choice_options(choice: ModelChoice, device) -> dict:
    return {"tracks": choice.tracks, "organism": choice.organism, "device": str(device),
            "targets": os.path.abspath(choice.targets) if choice.targets else None}


def model_label(source: str, digest: str) -> str:
    """The weights in a figure: their file (or directory, or URL) name and the start of their SHA-256."""
    if source == DEFAULT_MODEL_URL:
        name = "official Enformer"
    else:
        name = source.rstrip("/").rsplit("/", 1)[-1] if re.match(r"https?://", source) else Path(source).name
    return f"{name or source} (sha256 {digest[:12]})"


def predict_job(spec: str, fasta: str, out: str, choice: ModelChoice, *, batch_size: int = 2,
                bigwig_dir: str | None = None) -> int:
    """``enformer-score predict``: predictions of every region of ``spec`` (region text or BED) into the
    HDF5 file ``out``, and one bigWig per track into ``bigwig_dir``. Returns the number of regions."""
    genome = Genome(fasta)
    regions = read_regions(spec, genome.contigs)
    model, device, tracks, targets = load_tracks(choice)
    options = {"command": "predict", "regions": str(spec), "batch_size": batch_size,
               "bigwig": str(bigwig_dir) if bigwig_dir else None} | _choice_options(choice, device)
    attrs = provenance(choice.source, genome, fasta, options)
    results = predict_regions(model, genome, regions, head=choice.organism, tracks=tracks, device=device,
                              batch_size=batch_size)
    if bigwig_dir:
        results = list(results)  # both writers read them
        write_bigwigs(bigwig_dir, results, targets, genome.contigs, columns=tracks)
    return write_predictions_h5(out, results, targets, attrs)


def parse_bins(text: str | None) -> np.ndarray | None:
    """'447-449' or '440,450-452' -> bin indices (inclusive ranges); None stays None (the default)."""
    if text is None:
        return None
    ranges = index_ranges(text)
    if ranges is None:
        raise InputError(f"--bins expects indices and ranges such as 447-449 or 440,450-452, not {text!r}")
    return np.array(sorted({i for lo, hi in ranges for i in range(lo, hi + 1)}))


def contrib_job(region_text: str, fasta: str, prefix: str, choice: ModelChoice, *,
                bins: str | None = None) -> tuple[str, str, Targets]:
    """``enformer-score contrib``: gradient x input of the mean of the chosen tracks over ``bins``
    (default the central three) for the window centred on the region; ``PREFIX.bedGraph`` and
    ``PREFIX.h5``. Returns their paths and the tracks used."""
    if choice.tracks is None:
        raise InputError("contrib needs --tracks: the objective is the mean of the chosen tracks")
    genome = Genome(fasta)
    region = one_region(region_text, genome, "contrib")
    model, device, tracks, targets = load_tracks(choice)
    chosen_bins = parse_bins(bins)
    options = {"command": "contrib", "region": str(region_text), "bins": bins} | _choice_options(choice, device)
    attrs = provenance(choice.source, genome, fasta, options)
    positions, scores, objective = contributions(model, genome, region, head=choice.organism, tracks=tracks,
                                                 bins=chosen_bins, device=device)
    sequence = genome.fetch(region.fasta_chrom, int(positions[0]), int(positions[-1]) + 1)
    bedgraph, h5 = write_contrib(prefix, region, positions, scores, sequence, head=choice.organism,
                                 tracks=tracks.tolist(),
                                 bins=(DEFAULT_BINS if chosen_bins is None else chosen_bins).tolist(),
                                 objective=objective, targets=targets, attrs=attrs)
    return bedgraph, h5, targets


def _run_record(scores_dir: str) -> dict:
    """What a finished run (already verified) was made with: ``run.json`` (``model_sha256``, ``options``)
    and its HDF5 files' ``model_source``."""
    directory = Path(scores_dir)
    try:
        record = json.loads((directory / "run.json").read_text())
        done = json.loads((directory / "done.json").read_text())
        first = next(name for name, entry in done["files"].items() if "chrom" in entry)
        with h5py.File(directory / first, "r") as f:
            record["model_source"] = str(f.attrs["model_source"])
        record["model_sha256"] = str(record["model_sha256"])
    except (OSError, ValueError, KeyError, StopIteration) as error:
        raise InputError(f"{scores_dir}: cannot tell which model the run used ({error}): rerun its command") from None
    return record


def _run_model(run: dict, scores_dir: str, given: str | None) -> tuple[str, str]:
    """``(source, sha256)`` of the weights a run was scored with: ``given`` (``--model``) when its checksum
    is the run's, else the run's own source, else ``$ENFORMER_VEP_MODEL``, when theirs is; refused otherwise."""
    wanted, recorded = run["model_sha256"], run["model_source"]
    what = f"the model {scores_dir} was scored with ({recorded}, sha256 {wanted[:12]})"
    if given:
        digest = source_digest(given)
        if digest != wanted:
            raise InputError(f"--model {given} (sha256 {digest[:12]}) is not {what}: pass those weights with --model, "
                             f"or leave --model out to use the run's")
        return str(given), digest
    candidates = [recorded] if re.match(r"https?://", recorded) or Path(recorded).exists() else []
    default = default_model_source()
    if default != DEFAULT_MODEL_URL and Path(default).exists():  # $ENFORMER_VEP_MODEL, a local copy
        candidates.append(default)
    tried = []
    for source in dict.fromkeys(candidates):
        digest = source_digest(source)
        if digest == wanted:
            return source, digest
        tried.append(f"{source} has sha256 {digest[:12]}")
    found = "; ".join(tried) if tried else "those weights are not at hand here"
    raise InputError(f"plot variant --scores predicts with {what}, but {found}: pass those weights with --model")


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based rank of each value by decreasing absolute value (ties in column order)."""
    order = np.argsort(-np.abs(values), kind="stable")
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def plot_variant_job(variant: str, fasta: str, out: str, choice: ModelChoice, *, scores_dir: str | None = None,
                     top: int = 4, genes: str | None = None) -> Figure:
    """``enformer-score plot variant``: ref, alt and alt - ref of the chosen tracks over the 896 bins
    around ``variant`` (``chr:pos:ref:alt``, or with ``scores_dir`` also a VCF ID of that run), computed
    with the model. Without --tracks and with ``scores_dir``: the ``top`` tracks of largest |SAD| in the
    run. With ``scores_dir`` the predictions use the run's model (refused when the weights at hand are
    other ones) and each panel shows the track's SAD and rank in the run. REF must match the FASTA.
    The TSSs of ``genes`` (an annotation as for ``--genes``; default: the run's own, if it scored genes)
    in the window are drawn. Returns the figure (2 axes per track)."""
    genome = Genome(fasta)
    run = None
    if scores_dir:
        row = find_variant(scores_dir, variant)
        chrom, pos, ref, alt, snp = row["chrom"], row["pos"], row["ref"], row["alt"], printable(row["snp"])
        variant_id = None if snp in (".", f"{chrom}:{pos}") else snp
        run = _run_record(scores_dir)
        organism = run.get("options", {}).get("organism", "human")
        if organism != choice.organism:
            raise InputError(f"{scores_dir} scored the {organism} head: add --organism {organism}")
    else:
        parts = variant.split(":")
        if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) < 1:
            raise InputError(f"expected the variant as CHR:POS:REF:ALT (or --scores DIR with its ID), not {variant!r}")
        chrom, pos, ref, alt, variant_id = parts[0], int(parts[1]), parts[2].upper(), parts[3].upper(), None
    for name, allele in (("REF", ref), ("ALT", alt)):
        if not allele or set(allele.upper()) - set("ACGTN"):
            raise InputError(f"{name} {allele!r} of {variant}: plot variant takes alleles of A, C, G, T and N")
    fasta_chrom = resolve_contig(chrom, genome.contigs)
    if fasta_chrom is None:
        raise InputError(f"contig {chrom} is not in {fasta}")
    matches, bases = ref_matches(genome, fasta_chrom, pos, ref)
    if not matches:
        if run is not None and run.get("options", {}).get("ref_mismatch") == "score":
            log.warning("REF %s of %s:%d differs from the FASTA (%s); the run scored it anyway (--ref-mismatch "
                        "score), and so does the figure, from the FASTA's bases", ref, chrom, pos, bases)
        else:
            raise InputError(f"REF {ref} of {chrom}:{pos} does not match {fasta}, which has {bases} there: check "
                             f"the position, the alleles and the genome build")
    if run is not None:
        source, digest = _run_model(run, scores_dir, choice.model)
    else:
        source = choice.source
        digest = source_digest(source)
    model, device, targets = load_head(choice, source)
    if choice.tracks is not None:
        tracks = select_tracks(choice.tracks, targets)
    elif run is not None and "SAD" in row["stats"]:
        column = {identifier: i for i, identifier in enumerate(targets.ids)}
        strongest = np.argsort(-np.abs(row["stats"]["SAD"]), kind="stable")[:top]
        tracks = np.array([column[row["target_ids"][i]] for i in strongest])
    else:
        raise InputError("choose the tracks with --tracks (or give --scores to plot the variant's strongest SAD "
                         "tracks)")
    if len(tracks) > MAX_PLOT_TRACKS:
        raise InputError(f"--tracks chose {len(tracks)} tracks; a plot shows at most {MAX_PLOT_TRACKS}")
    ids = [targets.ids[i] for i in tracks]
    notes = [""] * len(tracks)
    if run is not None and "SAD" in row["stats"]:
        sad, ranks = row["stats"]["SAD"], _ranks(row["stats"]["SAD"])
        where = {identifier: i for i, identifier in enumerate(row["target_ids"])}
        notes = [f"SAD {float(sad[where[t]]):+.3g}, rank {ranks[where[t]]} of {len(sad)}" if t in where
                 else "not scored in the run" for t in ids]
    windows = np.stack(allele_windows(genome, fasta_chrom, pos, ref, alt))
    with torch.inference_mode():
        x = torch.from_numpy(one_hot(windows)).to(device)
        columns = torch.from_numpy(tracks).to(device)
        predictions = model.predict_tracks(x, choice.organism, columns).float().cpu().numpy()
    starts = bin_starts(pos)
    shown = slice(starts[0] - window_start(pos), starts[-1] + BIN_SIZE - window_start(pos))
    labels = [targets.labels[i] for i in tracks]
    genes = genes or (run or {}).get("options", {}).get("genes")
    tss = []
    if genes:
        annotation = read_annotation(genes, genome.contigs)
        positions, which = annotation.within(fasta_chrom, int(starts[0]), int(starts[-1]) + BIN_SIZE)
        tss = [(p, annotation.genes[g].gene_name, annotation.genes[g].strand)
               for p, g in zip(positions.tolist(), which.tolist(), strict=True)]
    figure = plot_variant(predictions[0], predictions[1], starts, labels, chrom=chrom, pos=pos, ref_allele=ref,
                          alt_allele=alt, variant_id=variant_id, model=model_label(source, digest), track_ids=ids,
                          notes=notes, gaps=n_stretches(windows[0][shown], int(starts[0])), tss=tss)
    save_figure(figure, out)
    return figure


def _contrib_file(path: str, region: Region, genome: Genome) -> dict:
    """Positions, scores, bases and description of a ``contrib`` HDF5 file, refused unless it holds ``region``."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            chrom, start, end = str(attrs["chrom"]), int(attrs["region_start"]), int(attrs["region_end"])
            data = {"positions": f["position"][:], "scores": f["contribution"][:],
                    "sequence": f["sequence"][:].view(np.uint8),
                    "labels": [t.decode() for t in f["target_labels"][:]] if "target_labels" in f else None}
    except (OSError, KeyError) as error:
        raise InputError(f"{path} is not an output of `enformer-score contrib` ({error})") from None
    if (resolve_contig(chrom, genome.contigs), start, end) != (region.fasta_chrom, region.start, region.end):
        raise InputError(f"{path} holds the contribution scores of {chrom}:{start + 1}-{end}, not of "
                         f"{region.chrom}:{region.start + 1}-{region.end}: give its region, or compute the scores "
                         f"with --tracks instead of --from-h5")
    data["model"] = (model_label(str(attrs["model_source"]), str(attrs["model_sha256"]))
                     if "model_sha256" in attrs else None)
    data["tracks"] = len(np.atleast_1d(attrs.get("tracks", [])))
    return data


def plot_contrib_job(region_text: str, fasta: str, out: str, choice: ModelChoice, *, bins: str | None = None,
                     from_h5: str | None = None) -> Figure:
    """``enformer-score plot contrib``: contribution scores over the window centred on REGION (computed,
    or read from a ``contrib`` HDF5 file, which must hold REGION), with a base-level zoom on REGION when
    it is at most :data:`ZOOM_LIMIT` bp. Returns the figure."""
    genome = Genome(fasta)
    region = one_region(region_text, genome, "plot contrib")
    if from_h5:
        data = _contrib_file(from_h5, region, genome)
        positions, scores, sequence = data["positions"], data["scores"], data["sequence"]
        shown = track_summary(data["labels"]) if data["labels"] else f"{data['tracks']} tracks"
        title = f"{region.name}: gradient x input for {shown} (from {Path(from_h5).name})"
        model_name = data["model"]
    else:
        if choice.tracks is None:
            raise InputError("plot contrib needs --tracks (or --from-h5 with the output of `contrib`)")
        model, device, tracks, targets = load_tracks(choice)
        positions, scores, _ = contributions(model, genome, region, head=choice.organism, tracks=tracks,
                                             bins=parse_bins(bins), device=device)
        sequence = genome.fetch(region.fasta_chrom, int(positions[0]), int(positions[-1]) + 1)
        title = f"{region.name}: gradient x input for {track_summary(targets.labels)}"
        model_name = model_label(choice.source, source_digest(choice.source))
    if model_name:
        title += f"\nmodel: {model_name}"
    zoom = None
    if region.end - region.start <= ZOOM_LIMIT and positions[0] <= region.start and region.end <= positions[-1] + 1:
        zoom = (region.start, region.end)
    figure = plot_contributions(positions, scores, chrom=region.chrom, sequence=sequence, title=title, zoom=zoom)
    save_figure(figure, out)
    return figure


def _data_factory(data_dir: str, split: str, batch_size: int, shuffle_buffer: int, seed: int):
    """Epoch ``epoch`` of a Basenji2 split, shuffled with a seed of its own (so a resumed run sees the
    same batches)."""
    def epoch_batches(epoch: int = 0):
        return batches(data_dir, split, batch_size, shuffle_buffer=shuffle_buffer, seed=seed * 100_003 + epoch)
    return epoch_batches


def train_job(data: dict[str, str], out: str, *, init: str | None = None, config_json: str | None = None,
              new_heads: list[tuple[str, int]] = (), freeze: bool = False, config: TrainConfig,
              batch_size: int = 1, shuffle_buffer: int = 64, checkpoint: str | None = None,
              device: str | None = None, progress: bool = True) -> list[dict[str, float]]:
    """``enformer-score train``: start from ``init`` weights (or a fresh model of ``config_json``), add or
    replace ``new_heads``, optionally freeze the trunk, train on the ``train`` split of each head's
    Basenji2 directory ``data``, resume from ``checkpoint`` if it exists, save ``out``. Returns the losses."""
    device = default_device(device)
    if config_json:
        settings = json.loads(Path(config_json).read_text())
        torch.manual_seed(config.seed)
        model = Enformer(EnformerConfig(**settings)).to(device)
    else:
        model = load_model(init, device=device)
    for name, n_tracks in new_heads:
        replace_head(model, name, n_tracks)
    model.to(device)
    if freeze:
        freeze_trunk(model)
    for head, directory in data.items():
        wanted = read_statistics(directory)["num_targets"]
        if head in model.heads and model.heads[head].out_features != wanted:
            raise InputError(f"{directory} holds {wanted} tracks but the model's {head} head has "
                             f"{model.heads[head].out_features}: add --new-head {head}:{wanted}")
    sources = {head: _data_factory(d, "train", batch_size, shuffle_buffer, config.seed) for head, d in data.items()}
    losses = train(model, sources, config, checkpoint_path=checkpoint, progress=progress)
    save_trained(model, out, source=init or config_json or "")
    return losses


def evaluate_job(model_source: str, data_dir: str, *, split: str = "valid", head: str = "human",
                 tracks: str | None = None, targets_path: str | None = None, batch_size: int = 1,
                 max_batches: int | None = None, out: str | None = None, device: str | None = None):
    """``enformer-score evaluate``: Pearson r per track of ``head`` over all bins of ``split``; the
    per-track table to ``out``. Returns the :class:`training.EvalResult`."""
    model = load_model(model_source, device=default_device(device))
    require_head(head, model.heads)
    n_tracks = model.heads[head].out_features
    table = None
    if targets_path or (head in ("human", "mouse") and n_tracks == len(packaged_targets(head))):
        table = head_targets(head, model.config.heads, targets_path)
    columns = None
    if tracks is not None:
        columns = select_tracks(tracks, table or Targets([str(i) for i in range(n_tracks)], [""] * n_tracks))
    result = evaluate(model, batches(data_dir, split, batch_size), head, columns, max_batches=max_batches)
    if out:
        result.write_tsv(out, table)
    return result
