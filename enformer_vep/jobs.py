"""The commands around scoring (``predict``, ``contrib``, ``plot``) as functions: open the FASTA,
load the model, choose the tracks, call the library, write the files."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .contrib import DEFAULT_BINS, contributions, write_contrib
from .errors import InputError
from .genome import Genome
from .predict import predict_regions, write_bigwigs, write_predictions_h5
from .regions import read_regions
from .targets import Targets, head_targets, select_tracks
from .weights import default_model_source, load_model


@dataclasses.dataclass
class ModelChoice:
    """The options every model command shares."""

    model: str | None = None
    device: str | None = None
    organism: str = "human"
    targets: str | None = None
    tracks: str | None = None


def load_tracks(choice: ModelChoice):
    """``(model, device, column indices int64 [T], their Targets)`` for ``choice``."""
    device = choice.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(choice.model or default_model_source(), device=device)
    targets = head_targets(choice.organism, model.config.heads, choice.targets)
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
    try:
        chosen = []
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            chosen.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise InputError(f"--bins expects indices and ranges such as 447-449 or 440,450-452, not {text!r}") from None
    return np.array(sorted(set(chosen)))


def contrib_job(region_text: str, fasta: str, prefix: str, choice: ModelChoice, *,
                bins: str | None = None) -> tuple[str, str, Targets]:
    """``enformer-score contrib``: gradient x input of the mean of the chosen tracks over ``bins``
    (default the central three) for the window centred on the region; ``PREFIX.bedGraph`` and
    ``PREFIX.h5``. Returns their paths and the tracks used."""
    if choice.tracks is None:
        raise InputError("contrib needs --tracks: the objective is the mean of the chosen tracks")
    genome = Genome(fasta)
    regions = read_regions(region_text, genome.contigs)
    if len(regions) != 1:
        raise InputError(f"contrib takes one region; {region_text} holds {len(regions)}")
    model, device, tracks, targets = load_tracks(choice)
    chosen_bins = parse_bins(bins)
    positions, scores, objective = contributions(model, genome, regions[0], head=choice.organism, tracks=tracks,
                                                 bins=chosen_bins, device=device)
    sequence = genome.fetch(regions[0].chrom, int(positions[0]), int(positions[-1]) + 1)
    bedgraph, h5 = write_contrib(prefix, regions[0], positions, scores, sequence, head=choice.organism,
                                 tracks=tracks.tolist(),
                                 bins=(DEFAULT_BINS if chosen_bins is None else chosen_bins).tolist(),
                                 objective=objective)
    return bedgraph, h5, targets
