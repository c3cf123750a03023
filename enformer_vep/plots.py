"""Figures of variant effects and contribution scores.

The functions build a :class:`matplotlib.figure.Figure` directly, not through ``pyplot``, so no
backend, interactive state or figure registry is touched: a figure is freed like any object and
drawing works headless. Coordinates on every x axis are 1-based genome positions with base ``p``
centred on ``x = p``, so a bin covering the 0-based half-open ``[s, s + bin_size)`` spans
``x`` in ``[s + 0.5, s + bin_size + 0.5]``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, StrMethodFormatter

from .atomic import atomic_write
from .errors import InputError

# Beyond this the figure outgrows what Agg can rasterise (2**16 pixels a side) and is unreadable anyway.
MAX_PLOT_TRACKS = 50

BASE_COLORS = {"A": "#109648", "C": "#255c99", "G": "#f7a21b", "T": "#d62839"}
OTHER_BASE_COLOR = "#9e9e9e"
REF_COLOR, ALT_COLOR = "#4a5a6a", "#d62839"
GAIN_COLOR, LOSS_COLOR = "#d62839", "#255c99"
_FORMATS = {".png": "png", ".pdf": "pdf"}


def plot_variant(ref: np.ndarray, alt: np.ndarray, bin_starts: np.ndarray, labels: Sequence[str], *,
                 chrom: str, pos: int, ref_allele: str, alt_allele: str, variant_id: str | None = None,
                 bin_size: int = 128, title: str | None = None) -> Figure:
    """Reference and alternative predictions of K tracks around one variant.

    ``ref``, ``alt``: ``float [bins, K]``; ``bin_starts``: ``int [bins]``, 0-based genome start of each
    (contiguous) bin; ``labels``: K track descriptions; ``pos``: the variant's 1-based VCF position.
    Per track two panels, 2K axes in all, sharing the x axis: ref and alt as steps, then
    ``alt - ref`` around a zero line; a dashed marker at ``pos`` on each. ``title``, when given,
    heads the figure above the variant line.
    """
    ref, alt = np.asarray(ref, dtype=np.float64), np.asarray(alt, dtype=np.float64)
    bin_starts = np.asarray(bin_starts, dtype=np.int64)
    labels = list(labels)
    if ref.ndim != 2 or ref.shape != alt.shape or ref.shape != (len(bin_starts), len(labels)):
        raise InputError(f"plot_variant: ref {ref.shape} and alt {alt.shape} must both be "
                         f"[bins, tracks] = [{len(bin_starts)}, {len(labels)}]")
    n_tracks = len(labels)
    if not 1 <= n_tracks <= MAX_PLOT_TRACKS:
        raise InputError(f"plot_variant: {n_tracks} tracks given; plot between 1 and {MAX_PLOT_TRACKS}")
    if len(bin_starts) == 0 or np.any(np.diff(bin_starts) != bin_size):
        raise InputError(f"plot_variant: bin_starts must be contiguous {bin_size}-bp bins")

    # Step edges: the drawn y arrays repeat their last value so "steps-post" closes the last bin.
    edges = np.append(bin_starts, bin_starts[-1] + bin_size) + 0.5
    fig = Figure(figsize=(10, 1.0 + 2.4 * n_tracks), layout="constrained")
    axes = fig.subplots(2 * n_tracks, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1] * n_tracks})
    for k, label in enumerate(labels):
        top, bottom = axes[2 * k], axes[2 * k + 1]
        r, a = _closed(ref[:, k]), _closed(alt[:, k])
        top.fill_between(edges, r, step="post", color=REF_COLOR, alpha=0.25, linewidth=0)
        top.plot(edges, r, drawstyle="steps-post", color=REF_COLOR, linewidth=0.8, label="ref")
        top.plot(edges, a, drawstyle="steps-post", color=ALT_COLOR, linewidth=0.8, label="alt")
        top.set_title(label, fontsize=9, loc="left")
        top.set_ylabel("prediction", fontsize=8)

        delta = _closed(alt[:, k] - ref[:, k])
        _signed_fill(bottom, edges, delta, step="post")
        bottom.plot(edges, delta, drawstyle="steps-post", color="black", linewidth=0.6, label="alt - ref")
        bottom.axhline(0, color="black", linewidth=0.5)
        bottom.set_ylabel("alt - ref", fontsize=8)
        # Symmetric limits keep the zero line in the middle, so gains and losses compare by eye.
        extent = np.abs(delta).max()
        if extent > 0:
            bottom.set_ylim(-1.15 * extent, 1.15 * extent)
        for ax in (top, bottom):
            ax.axvline(pos, color="0.3", linestyle="--", linewidth=0.8, label="variant")
        top.legend(loc="upper right", fontsize=7, ncols=3, framealpha=0.8)

    _genome_axis(axes[-1], chrom, edges[0], edges[-1])
    for ax in axes:
        ax.tick_params(labelsize=8)
    heading = f"{chrom}:{pos} {_short_allele(ref_allele)}>{_short_allele(alt_allele)}"
    if variant_id and variant_id != ".":
        heading = f"{variant_id}   {heading}"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=11)
    return fig


def plot_contributions(positions: np.ndarray, scores: np.ndarray, *, chrom: str,
                       sequence: str | np.ndarray | None = None, title: str | None = None,
                       highlight: int | tuple[int, int] | None = None,
                       zoom: tuple[int, int] | None = None) -> Figure:
    """Per-base contribution scores over a stretch of genome.

    ``positions``: ``int [L]``, increasing 0-based genome positions; ``scores``: ``float [L]``;
    ``sequence``: the L bases as a string or ``uint8`` ASCII codes (as :mod:`enformer_vep.genome`
    returns them), used to colour the zoom bars. One axis with the whole span as a filled line;
    with ``zoom`` = 0-based half-open ``(start, end)`` inside the span a second axis with one bar
    per base. ``highlight``: a 0-based position (dashed marker) or half-open ``(start, end)``
    (shaded) drawn on every axis.
    """
    positions = np.asarray(positions, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if positions.ndim != 1 or positions.shape != scores.shape or len(positions) == 0:
        raise InputError(f"plot_contributions: positions {positions.shape} and scores {scores.shape} "
                         "must be the same non-empty [L]")
    if np.any(np.diff(positions) <= 0):
        raise InputError("plot_contributions: positions must be strictly increasing")
    bases = None
    if sequence is not None:
        codes = (sequence.encode("ascii") if isinstance(sequence, str)
                 else np.asarray(sequence, dtype=np.uint8).tobytes()).upper()
        bases = np.array(list(codes.decode("ascii")))
        if len(bases) != len(positions):
            raise InputError(f"plot_contributions: sequence has {len(bases)} bases for {len(positions)} positions")
    first, last = int(positions[0]), int(positions[-1])
    if zoom is not None:
        start, end = map(int, zoom)
        if not first <= start < end <= last + 1:
            raise InputError(f"plot_contributions: zoom {start}-{end} (0-based, half-open) is not "
                             f"a non-empty part of the span {first}-{last + 1}")

    fig = Figure(figsize=(10, 3.0 if zoom is None else 5.5), layout="constrained")
    axes = fig.subplots(1 if zoom is None else 2, 1, squeeze=False)[:, 0]
    x = positions + 1
    whole = axes[0]
    # Rasterised: a 196-kb span as vectors makes PDFs of tens of megabytes that render slowly.
    _signed_fill(whole, x, scores, rasterized=True)
    whole.plot(x, scores, color="0.2", linewidth=0.3, rasterized=True)
    whole.set_title(f"{chrom}:{first + 1:,}-{last + 1:,}", fontsize=9, loc="left")
    _genome_axis(whole, chrom, first + 0.5, last + 1.5)

    if zoom is not None:
        whole.axvspan(start + 0.5, end + 0.5, color="0.5", alpha=0.2, linewidth=0)
        part = axes[1]
        inside = (positions >= start) & (positions < end)
        if bases is None:
            colors = [GAIN_COLOR if s >= 0 else LOSS_COLOR for s in scores[inside]]
        else:
            colors = [BASE_COLORS.get(b, OTHER_BASE_COLOR) for b in bases[inside]]
            present = sorted(set(bases[inside]) & set(BASE_COLORS))
            part.legend(handles=[Patch(color=BASE_COLORS[b], label=b) for b in present],
                        loc="upper right", fontsize=7, ncols=4, framealpha=0.8)
        part.bar(x[inside], scores[inside], width=0.9, color=colors, linewidth=0)
        part.set_title(f"{chrom}:{start + 1:,}-{end:,}", fontsize=9, loc="left")
        _genome_axis(part, chrom, start + 0.5, end + 0.5)

    for ax in axes:
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel("contribution", fontsize=8)
        ax.tick_params(labelsize=8)
        if isinstance(highlight, (tuple, list)):
            ax.axvspan(highlight[0] + 0.5, highlight[1] + 0.5, color="#f7a21b", alpha=0.3, linewidth=0)
        elif highlight is not None:
            ax.axvline(int(highlight) + 1, color="0.3", linestyle="--", linewidth=0.8)
    fig.suptitle(title or f"Contribution scores, {chrom}", fontsize=11)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as PNG or PDF, chosen by the extension of ``path``, through a temporary file in
    the same directory renamed into place, so ``path`` is never seen half-written."""
    path = os.fspath(path)
    fmt = _FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise InputError(f"{path}: a figure is written as .png or .pdf")
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise InputError(f"cannot write {path}: {directory} is not a writable directory")
    # No creation date in PDFs, so the same figure gives the same bytes.
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=150,
                                             metadata={"CreationDate": None} if fmt == "pdf" else None))


def _closed(values: np.ndarray) -> np.ndarray:
    """``values`` with the last repeated, one y per step edge."""
    return np.append(values, values[-1])


def _signed_fill(ax, x: np.ndarray, y: np.ndarray, **kwargs) -> None:
    """Fill gains and losses from zero in their own colours."""
    ax.fill_between(x, np.maximum(y, 0), color=GAIN_COLOR, alpha=0.45, linewidth=0, **kwargs)
    ax.fill_between(x, np.minimum(y, 0), color=LOSS_COLOR, alpha=0.45, linewidth=0, **kwargs)


def _genome_axis(ax, chrom: str, lo: float, hi: float) -> None:
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=True))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_xlabel(f"{chrom} position (bp, 1-based)", fontsize=8)


def _short_allele(allele: str, limit: int = 12) -> str:
    """Long indel alleles abbreviated, so the title stays on one line."""
    return allele if len(allele) <= limit else f"{allele[:limit - 3]}...({len(allele)} bp)"
