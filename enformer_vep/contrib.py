"""Gradient x input contribution scores, as in the official Enformer usage notebook.

The objective is the mean prediction over chosen tracks and bins; each base's score is the
gradient of the objective with respect to the one-hot input, times the input, summed over the four
channels: the gradient at the base present (0 for N, whose one-hot row is all zeros).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import h5py
import numpy as np
import torch

from .atomic import atomic_path
from .errors import InputError
from .genome import Genome
from .model import SEQUENCE_LENGTH, Enformer
from .output import byte_strings
from .regions import Region, model_input
from .scoring import precision_mode
from .targets import Targets, require_head
from .windows import one_hot

#: The central three output bins (of 896), around the region's centre: the notebook's choice.
DEFAULT_BINS = np.array([447, 448, 449])


def contributions(model: Enformer, genome: Genome, region: Region, *, head: str = "human",
                  tracks: np.ndarray, bins: np.ndarray | None = None,
                  device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, float]:
    """``(positions int64 [196,608], scores float32 [196,608], objective)`` for ``region``.

    ``positions`` are the 0-based genome coordinates of the central 196,608 bp of the window centred
    on ``region`` (the bases the model reads); ``objective`` is the mean of ``head``'s predictions
    over columns ``tracks`` and output ``bins`` (default :data:`DEFAULT_BINS`). ``model``: eval
    mode, float32, on ``device``; computed in float32 (TF32 off on CUDA).
    """
    if model.training:
        raise RuntimeError("contributions() needs eval mode: call model.eval() first")
    require_head(head, model.heads)
    n_tracks, n_bins = model.heads[head].out_features, model.config.target_length
    tracks = np.asarray(tracks, dtype=np.int64).reshape(-1)
    bins = DEFAULT_BINS if bins is None else np.asarray(bins, dtype=np.int64).reshape(-1)
    if not len(tracks) or tracks.min() < 0 or tracks.max() >= n_tracks:
        raise InputError(f"contribution tracks must be a non-empty selection of 0..{n_tracks - 1}")
    if not len(bins) or bins.min() < 0 or bins.max() >= n_bins:
        raise InputError(f"contribution bins must be a non-empty selection of 0..{n_bins - 1}")
    start, codes = model_input(genome, region)
    x = torch.from_numpy(one_hot(codes))[None].to(device).requires_grad_(True)
    # also under torch.no_grad(); float32 throughout (cuDNN would take TF32 on CUDA by default)
    with torch.enable_grad(), precision_mode("fp32", torch.device(device)):
        predictions = model.head_tracks(model.trunk(x), head, torch.from_numpy(tracks).to(device))
        objective = predictions[0, torch.from_numpy(bins).to(device)].mean()
        (gradient,) = torch.autograd.grad(objective, x)
    scores = (gradient * x).sum(-1)[0].detach().float().cpu().numpy()
    return start + np.arange(SEQUENCE_LENGTH, dtype=np.int64), scores, float(objective.detach())


def write_contrib(prefix: str | os.PathLike, region: Region, positions: np.ndarray, scores: np.ndarray,
                  sequence: np.ndarray, *, head: str, tracks: Sequence[int], bins: Sequence[int],
                  objective: float, targets: Targets | None = None,
                  attrs: Mapping | None = None) -> tuple[str, str]:
    """Write ``PREFIX.bedGraph`` and ``PREFIX.h5`` atomically; return their paths.

    ``positions`` int64 [L] (increasing), ``scores`` float32 [L], ``sequence`` the bases there as
    ASCII codes uint8 [L]. The bedGraph has a ``track type=bedGraph`` line, then one line per base
    (``chrom start end value``, the contig named as the user named it, :attr:`Region.chrom`; value
    to float32 precision); N bases, which include any padding past the contig ends and score 0 by
    construction, are left out so every line lies on the contig. The HDF5 file holds ``position``
    [L] int64, ``contribution`` [L] float32, ``sequence`` [L] S1, with ``targets`` (the chosen
    tracks) ``target_ids`` and ``target_labels`` [T] S, and attributes ``chrom`` (as given),
    ``fasta_chrom`` (the FASTA's name), ``region_start``, ``region_end``, ``region_name``, ``head``,
    ``tracks``, ``bins``, ``objective`` and ``attrs`` (provenance: model, FASTA, options).
    """
    positions = np.asarray(positions, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    sequence = np.asarray(sequence, dtype=np.uint8)
    if not positions.shape == scores.shape == sequence.shape or positions.ndim != 1:
        raise ValueError(f"positions {positions.shape}, scores {scores.shape} and sequence {sequence.shape} "
                         f"must be 1-D of one length")
    bedgraph, h5 = f"{os.fspath(prefix)}.bedGraph", f"{os.fspath(prefix)}.h5"
    kept = sequence != ord("N")
    header = (f'track type=bedGraph name="{region.name}" description="Enformer gradient x input, {head} '
              f'tracks {",".join(map(str, tracks))}, bins {",".join(map(str, bins))}"\n')
    with atomic_path(bedgraph) as tmp, open(tmp, "w") as f:
        f.write(header)
        chrom = region.chrom
        # '%.9g' round-trips float32 exactly
        f.writelines(f"{chrom}\t{p}\t{p + 1}\t{v:.9g}\n"
                     for p, v in zip(positions[kept].tolist(), scores[kept].tolist(), strict=True))
    with atomic_path(h5) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in sorted((attrs or {}).items()):
                f.attrs[key] = value
            f.attrs.update(chrom=region.chrom, fasta_chrom=region.fasta_chrom, region_start=region.start,
                           region_end=region.end, region_name=region.name, head=head,
                           tracks=np.asarray(tracks, dtype=np.int64), bins=np.asarray(bins, dtype=np.int64),
                           objective=float(objective))
            if targets is not None:
                f["target_ids"] = byte_strings(targets.ids)
                f["target_labels"] = byte_strings(targets.labels)
            f.create_dataset("position", data=positions, compression="gzip", shuffle=True)
            f.create_dataset("contribution", data=scores, compression="gzip", shuffle=True)
            f.create_dataset("sequence", data=sequence.view("S1"), compression="gzip")
    return bedgraph, h5
