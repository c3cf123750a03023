"""The commands around scoring (``predict``, ``contrib``, ``plot``, ``train``, ``evaluate``) as functions:
open the FASTA, load the model, choose the tracks, call the library, write the files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import torch
from matplotlib.figure import Figure

from .basenji_data import batches, read_statistics
from .contrib import DEFAULT_BINS, contributions, write_contrib
from .errors import InputError
from .genome import Genome
from .model import Enformer, EnformerConfig
from .output import find_variant
from .plots import MAX_PLOT_TRACKS, plot_contributions, plot_variant, save_figure
from .predict import predict_regions, write_bigwigs, write_predictions_h5
from .regions import Region, bin_starts, read_regions
from .scoring import default_device
from .targets import Targets, head_targets, index_ranges, packaged_targets, require_head, select_tracks
from .text import printable
from .training import TrainConfig, evaluate, freeze_trunk, replace_head, save_trained, train
from .variants import resolve_contig
from .weights import load_model
from .windows import allele_windows, one_hot

ZOOM_LIMIT = 2_000  # bp: a region up to this long also gets a base-level panel


@dataclasses.dataclass
class ModelChoice:
    """The options every model command shares."""

    model: str | None = None
    device: str | None = None
    organism: str = "human"
    targets: str | None = None
    tracks: str | None = None


def one_region(text: str, genome: Genome, command: str) -> Region:
    """The single region of ``text`` (region text or BED file)."""
    regions = read_regions(text, genome.contigs)
    if len(regions) != 1:
        raise InputError(f"{command} takes one region; {text} holds {len(regions)}")
    return regions[0]


def load_head(choice: ModelChoice):
    """``(model, device, Targets of the chosen head)`` for ``choice``."""
    device = default_device(choice.device)
    model = load_model(choice.model, device=device)
    return model, device, head_targets(choice.organism, model.config.heads, choice.targets)


def load_tracks(choice: ModelChoice):
    """``(model, device, column indices int64 [T], their Targets)`` for ``choice``."""
    model, device, targets = load_head(choice)
    tracks = select_tracks(choice.tracks, targets)
    return model, device, tracks, targets.subset(tracks)


def predict_job(spec: str, fasta: str, out: str, choice: ModelChoice, *, batch_size: int = 2,
                bigwig_dir: str | None = None) -> int:
    """``enformer-score predict``: predictions of every region of ``spec`` (region text or BED) into the
    HDF5 file ``out``, and one bigWig per track into ``bigwig_dir``. Returns the number of regions."""
    genome = Genome(fasta)
    regions = read_regions(spec, genome.contigs)
    model, device, tracks, targets = load_tracks(choice)
    results = predict_regions(model, genome, regions, head=choice.organism, tracks=tracks, device=device,
                              batch_size=batch_size)
    if bigwig_dir:
        results = list(results)  # both writers read them
        write_bigwigs(bigwig_dir, results, targets, genome.contigs, columns=tracks)
    return write_predictions_h5(out, results, targets)


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
    positions, scores, objective = contributions(model, genome, region, head=choice.organism, tracks=tracks,
                                                 bins=chosen_bins, device=device)
    sequence = genome.fetch(region.chrom, int(positions[0]), int(positions[-1]) + 1)
    bedgraph, h5 = write_contrib(prefix, region, positions, scores, sequence, head=choice.organism,
                                 tracks=tracks.tolist(),
                                 bins=(DEFAULT_BINS if chosen_bins is None else chosen_bins).tolist(),
                                 objective=objective)
    return bedgraph, h5, targets


def plot_variant_job(variant: str, fasta: str, out: str, choice: ModelChoice, *, scores_dir: str | None = None,
                     top: int = 4) -> Figure:
    """``enformer-score plot variant``: ref, alt and alt - ref of the chosen tracks over the 896 bins
    around ``variant`` (``chr:pos:ref:alt``, or with ``scores_dir`` also a VCF ID of that run), computed
    with the model. Without --tracks and with ``scores_dir``: the ``top`` tracks of largest |SAD| in the
    run. Returns the figure (2 axes per track)."""
    genome = Genome(fasta)
    if scores_dir:
        row = find_variant(scores_dir, variant)
        chrom, pos, ref, alt, name = row["chrom"], row["pos"], row["ref"], row["alt"], printable(row["snp"])
    else:
        parts = variant.split(":")
        if len(parts) != 4 or not parts[1].isdigit():
            raise InputError(f"expected the variant as CHR:POS:REF:ALT (or --scores DIR with its ID), not {variant!r}")
        chrom, pos, ref, alt, name = parts[0], int(parts[1]), parts[2].upper(), parts[3].upper(), variant
    fasta_chrom = resolve_contig(chrom, genome.contigs)
    if fasta_chrom is None:
        raise InputError(f"contig {chrom} is not in {fasta}")
    model, device, targets = load_head(choice)
    if choice.tracks is not None:
        tracks = select_tracks(choice.tracks, targets)
    elif scores_dir and "SAD" in row["stats"]:
        column = {identifier: i for i, identifier in enumerate(targets.ids)}
        strongest = np.argsort(-np.abs(row["stats"]["SAD"]), kind="stable")[:top]
        tracks = np.array([column[row["target_ids"][i]] for i in strongest])
    else:
        raise InputError("choose the tracks with --tracks (or give --scores to plot the variant's strongest SAD "
                         "tracks)")
    if len(tracks) > MAX_PLOT_TRACKS:
        raise InputError(f"--tracks chose {len(tracks)} tracks; a plot shows at most {MAX_PLOT_TRACKS}")
    windows = np.stack(allele_windows(genome, fasta_chrom, pos, ref, alt))
    with torch.inference_mode():
        x = torch.from_numpy(one_hot(windows)).to(device)
        columns = torch.from_numpy(tracks).to(device)
        predictions = model.predict_tracks(x, choice.organism, columns).float().cpu().numpy()
    labels = [targets.labels[i] for i in tracks]
    figure = plot_variant(predictions[0], predictions[1], bin_starts(pos), labels, chrom=chrom, pos=pos, ref_allele=ref,
                          alt_allele=alt, variant_id=name)
    save_figure(figure, out)
    return figure


def plot_contrib_job(region_text: str, fasta: str, out: str, choice: ModelChoice, *, bins: str | None = None,
                     from_h5: str | None = None) -> Figure:
    """``enformer-score plot contrib``: contribution scores over the window centred on REGION (computed,
    or read from a ``contrib`` HDF5 file), with a base-level zoom on REGION when it is at most
    :data:`ZOOM_LIMIT` bp. Returns the figure."""
    genome = Genome(fasta)
    region = one_region(region_text, genome, "plot contrib")
    if from_h5:
        with h5py.File(from_h5, "r") as f:
            positions, scores = f["position"][:], f["contribution"][:]
        title = f"{region.name}: contribution scores from {from_h5}"
    else:
        if choice.tracks is None:
            raise InputError("plot contrib needs --tracks (or --from-h5 with the output of `contrib`)")
        model, device, tracks, targets = load_tracks(choice)
        positions, scores, _ = contributions(model, genome, region, head=choice.organism, tracks=tracks,
                                             bins=parse_bins(bins), device=device)
        shown = ", ".join(targets.labels[:3]) + (f" and {len(targets) - 3} more" if len(targets) > 3 else "")
        title = f"{region.name}: gradient x input for {shown}"
    sequence = genome.fetch(region.chrom, int(positions[0]), int(positions[-1]) + 1)
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
