"""Track predictions for genomic regions, written as HDF5 or bigWig files."""
from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from .atomic import atomic_path
from .errors import InputError
from .genome import Genome
from .model import BIN_SIZE, TARGET_LENGTH, Enformer
from .output import byte_strings
from .regions import BINS_SPAN, Region, model_input, window_for
from .scoring import precision_mode
from .targets import Targets, require_head
from .windows import one_hot

log = logging.getLogger("enformer_vep")

#: One region's result: the region, its bins' 0-based starts ``int64 [896]`` and ``float32 [896, T]``.
Result = tuple[Region, np.ndarray, np.ndarray]


def predict_regions(model: Enformer, genome: Genome, regions: Iterable[Region], *, head: str = "human",
                    tracks: np.ndarray | None = None, device: str | torch.device = "cpu",
                    batch_size: int = 2) -> Iterator[Result]:
    """Yield ``(region, bin_starts int64 [896], predictions float32 [896, T])`` per region, in order.

    ``model`` must be in eval mode on ``device``; ``tracks`` are column indices of ``head`` (None:
    all). Regions run ``batch_size`` at a time through :meth:`Enformer.predict_tracks` (inference
    mode, float32: TF32 off on CUDA). A region longer than the 114,688 bp the bins cover is
    predicted around its centre, with a warning.
    """
    require_head(head, model.heads)
    n_tracks = model.heads[head].out_features
    if tracks is not None and (not len(tracks) or min(tracks) < 0 or max(tracks) >= n_tracks):
        raise InputError(f"tracks must be a non-empty selection of 0..{n_tracks - 1}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    columns = None if tracks is None else torch.as_tensor(np.asarray(tracks), dtype=torch.long, device=device)
    batch: list[Region] = []
    for region in regions:
        if region.end - region.start > BINS_SPAN:
            log.warning("region %s is %s bp long, but the 896 output bins cover only the central %s bp "
                        "around its centre", region.name, f"{region.end - region.start:,}", f"{BINS_SPAN:,}")
        batch.append(region)
        if len(batch) == batch_size:
            yield from _predict_batch(model, genome, batch, head, columns, device)
            batch = []
    if batch:
        yield from _predict_batch(model, genome, batch, head, columns, device)


def _predict_batch(model, genome, regions, head, columns, device) -> Iterator[Result]:
    codes = np.stack([model_input(genome, region)[1] for region in regions])
    x = torch.from_numpy(one_hot(codes)).to(device)
    with precision_mode("fp32", torch.device(device)):  # cuDNN would take TF32 on CUDA by default
        predictions = model.predict_tracks(x, head, columns).float().cpu().numpy()
    for region, values in zip(regions, predictions, strict=True):
        yield region, window_for(region)[1], values


def write_predictions_h5(path: str | os.PathLike, results: Iterable[Result], targets: Targets,
                         attrs: Mapping | None = None) -> int:
    """Write ``results`` (as from :func:`predict_regions`) to HDF5 ``path`` atomically; return the
    number of regions R. ``targets`` describes the T predicted columns, in order.

    Datasets: ``chrom`` (the contig as the user named it), ``name`` [R] S; ``start``, ``end`` [R]
    int64 (the requested region, 0-based half-open); ``bin_start`` [R, 896] int64; ``predictions``
    [R, 896, T] float32 (gzip, one chunk per region and up to 256 tracks); ``target_ids``,
    ``target_labels`` [T] S. Attribute ``bin_size`` = 128, and ``attrs`` (provenance: model, FASTA,
    options) in sorted order. Predictions are streamed to disk, so R is not limited by memory.
    """
    n_tracks = len(targets)
    regions, bin_starts = [], []
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in sorted((attrs or {}).items()):
                f.attrs[key] = value
            f.attrs["bin_size"] = BIN_SIZE
            predictions = f.create_dataset(
                "predictions", (0, TARGET_LENGTH, n_tracks), maxshape=(None, TARGET_LENGTH, n_tracks),
                dtype=np.float32, chunks=(1, TARGET_LENGTH, max(1, min(n_tracks, 256))),
                compression="gzip", shuffle=True)
            for region, starts, values in results:
                if values.shape != (TARGET_LENGTH, n_tracks):
                    raise ValueError(f"predictions of {region.name} have shape {values.shape}, "
                                     f"expected {(TARGET_LENGTH, n_tracks)} for {n_tracks} targets")
                predictions.resize(len(regions) + 1, axis=0)
                predictions[len(regions)] = values
                regions.append(region)
                bin_starts.append(starts)
            f["chrom"] = byte_strings([r.chrom for r in regions])
            f["start"] = np.array([r.start for r in regions], dtype=np.int64)
            f["end"] = np.array([r.end for r in regions], dtype=np.int64)
            f["name"] = byte_strings([r.name for r in regions])
            f["bin_start"] = np.array(bin_starts, dtype=np.int64).reshape(len(regions), TARGET_LENGTH)
            f["target_ids"] = byte_strings(targets.ids)
            f["target_labels"] = byte_strings(targets.labels)
    return len(regions)


def bigwig_name(column: int, identifier: str) -> str:
    """``{column:04d}_{identifier}.bw`` with characters other than ``A-Za-z0-9._-`` replaced by ``_``."""
    return f"{column:04d}_{re.sub(r'[^A-Za-z0-9._-]', '_', identifier)}.bw"


def write_bigwigs(directory: str | os.PathLike, results: Iterable[Result], targets: Targets,
                  chrom_sizes: Mapping[str, int], *, columns: Sequence[int] | None = None) -> list[Path]:
    """One bigWig per track in ``directory`` (created), named by :func:`bigwig_name` from the head
    column (``columns[t]``, default ``t``) and identifier of ``targets[t]``; return their paths.

    ``chrom_sizes`` maps the FASTA's contig names to lengths (:attr:`Genome.contigs`). The header
    lists the contigs the regions lie on, in ``chrom_sizes`` order, each named as the regions name it
    (:attr:`Region.chrom`, e.g. 'chr1' for the FASTA's '1'; a contig named two ways takes the name of
    its first region in ``results``, with a warning).
    Every bin within its contig becomes one entry (a bin that straddles a contig end is cut there;
    bins outside are left out), sorted by contig and position. A bigWig holds one value per base,
    so regions whose bins overlap (they span 114,688 bp around each centre, whatever the region's
    length) are refused. All results are held in memory until written.
    """
    try:
        import pyBigWig
    except ImportError:
        raise InputError("writing bigWig files needs pyBigWig: pip install pyBigWig") from None
    columns = list(range(len(targets))) if columns is None else [int(c) for c in columns]
    if len(columns) != len(targets):
        raise ValueError(f"{len(columns)} columns for {len(targets)} targets")
    order = {chrom: i for i, chrom in enumerate(chrom_sizes)}
    entries = []  # (region, starts, ends, values [bins, T]) of the bins within the contig
    names: dict[str, Region] = {}  # FASTA contig -> the first region on it (whose name for it the file uses)
    renamed: set[tuple[str, str]] = set()
    for region, starts, values in results:
        if region.fasta_chrom not in order:
            raise InputError(f"region {region.name}: contig {region.chrom!r} is not in the FASTA")
        if values.shape != (len(starts), len(targets)):
            raise ValueError(f"predictions of {region.name} have shape {values.shape}, "
                             f"expected {(len(starts), len(targets))}")
        first = names.setdefault(region.fasta_chrom, region)
        if first.chrom != region.chrom and (region.fasta_chrom, region.chrom) not in renamed:
            renamed.add((region.fasta_chrom, region.chrom))
            log.warning("regions %s and %s name one contig two ways (%r and %r): a bigWig has one name per contig, "
                        "so the bigWigs call it %r", first.name, region.name, first.chrom, region.chrom, first.chrom)
        size = chrom_sizes[region.fasta_chrom]
        keep = (starts + BIN_SIZE > 0) & (starts < size)
        if keep.any():  # bins that straddle a contig end are cut there
            entries.append((region, np.maximum(starts[keep], 0), np.minimum(starts[keep] + BIN_SIZE, size),
                            values[keep]))
    entries.sort(key=lambda e: (order[e[0].fasta_chrom], int(e[1][0])))
    header = [(names[contig].chrom, int(size)) for contig, size in chrom_sizes.items() if contig in names]
    for (a, _, a_ends, _), (b, b_starts, _, _) in itertools.pairwise(entries):
        if a.fasta_chrom == b.fasta_chrom and b_starts[0] < a_ends[-1]:
            raise InputError(f"regions {a.name} and {b.name} have overlapping output bins (each region's "
                             f"896 bins span {BINS_SPAN:,} bp around its centre), so they cannot share a "
                             f"bigWig: write HDF5 instead, or predict them in separate runs")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, (column, identifier) in enumerate(zip(columns, targets.ids, strict=True)):
        path = directory / bigwig_name(column, identifier)
        with atomic_path(path) as tmp:
            bw = pyBigWig.open(str(tmp), "w")
            try:
                bw.addHeader(header)
                for region, starts, ends, values in entries:
                    bw.addEntries([names[region.fasta_chrom].chrom] * len(starts), starts.tolist(), ends=ends.tolist(),
                                  values=values[:, t].tolist())
            finally:
                bw.close()
        paths.append(path)
    return paths
