"""Figures of variant effects and contribution scores.

The functions build a :class:`matplotlib.figure.Figure` directly, not through ``pyplot``, so no
backend, interactive state or figure registry is touched: a figure is freed like any object and
drawing works headless. Coordinates on every x axis are 1-based genome positions with base ``p``
centred on ``x = p``, so a bin covering the 0-based half-open ``[s, s + bin_size)`` spans
``x`` in ``[s + 0.5, s + bin_size + 0.5]``.
"""
from __future__ import annotations

import os
import textwrap
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
REF_COLOR, ALT_COLOR = "#255c99", "#d62839"
# ref solid and blue, alt dashed and red: told apart by colour and by line style (also in grey print)
REF_STYLE = {"color": REF_COLOR, "linestyle": "-", "linewidth": 1.3}
ALT_STYLE = {"color": ALT_COLOR, "linestyle": (0, (4, 2)), "linewidth": 1.1}
GAIN_COLOR, LOSS_COLOR = "#d62839", "#255c99"
GAP_COLOR = "0.85"
TSS_COLOR = "#2e7d32"
GENE_PANEL_POINTS = 560  # width of the variant figure's panels in points, for placing gene names
OFFSET_HATCH = "//"
SIGNAL_LABEL = "predicted signal"
_FORMATS = {".png": "png", ".pdf": "pdf"}


def track_summary(labels: Sequence[str], listed: int = 3) -> str:
    """A short description of the tracks ``labels`` (their descriptions) for a title: up to ``listed``
    of them by name, else their count per assay (the description before its first ':'), e.g.
    ``638 CAGE tracks`` or ``640 tracks: 638 CAGE, 2 DNASE``."""
    labels = list(labels)
    if len(labels) <= listed:
        return "; ".join(_cut(label, 60) for label in labels)
    families: dict[str, int] = {}
    for label in labels:
        family = label.split(":", 1)[0].strip() if ":" in label else "other"
        families[family] = families.get(family, 0) + 1
    if len(families) == 1:
        return f"{len(labels)} {next(iter(families))} tracks"
    return f"{len(labels)} tracks: " + ", ".join(f"{n} {family}" for family, n in families.items())


def n_stretches(codes: np.ndarray, start: int) -> list[tuple[int, int]]:
    """The runs of ``N`` in ``codes`` (``uint8`` ASCII, as :mod:`enformer_vep.genome` returns them, whose
    first base is at 0-based genome position ``start``) as 0-based half-open ``(start, end)``."""
    is_n = (np.asarray(codes, dtype=np.uint8) == ord("N")).astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], is_n, [0]])))
    return [(start + int(a), start + int(b)) for a, b in zip(change[::2], change[1::2], strict=True)]


def reference_coordinates(alt: np.ndarray, bin_starts: np.ndarray, pos: int, ref_len: int, alt_len: int,
                          bin_size: int = 128) -> tuple[np.ndarray, int, int]:
    """The alternative's bins moved into reference coordinates: ``(alt', shift, offset)``.

    In the alternative window the bases after REF start ``d = alt_len - ref_len`` bases later than in
    the reference (docs/spec.md §3.4), so the alternative's bin ``k`` right of the variant holds the
    genome from ``bin_starts[k] - d``. The bins right of the variant's bin (the one holding 1-based
    ``pos``) move by ``shift = round(d / bin_size)`` bins: reference bin ``j`` gets the alternative's
    bin ``j + shift``, NaN where that is a deleted bin (at or left of the variant's) or past the last;
    an insertion's ``shift`` bins of inserted sequence are left out. ``alt``: ``[bins, ...]``;
    ``alt'`` is float64 of its shape. ``offset = d - shift * bin_size``: the bp by which the moved
    bins still lie off the reference's (0 when ``d`` is a whole number of bins; all of ``d`` for
    indels shorter than half a bin, which are not moved).
    """
    alt = np.asarray(alt, dtype=np.float64)
    d = alt_len - ref_len
    shift = int(np.floor(d / bin_size + 0.5))
    offset = d - shift * bin_size
    if shift == 0:
        return alt.copy(), 0, offset
    variant_bin = int(np.searchsorted(np.asarray(bin_starts), pos - 1, side="right")) - 1
    moved = np.full_like(alt, np.nan)
    moved[:variant_bin + 1] = alt[:variant_bin + 1]
    j = np.arange(variant_bin + 1, len(alt))
    k = j + shift
    valid = (k > variant_bin) & (k < len(alt))
    moved[j[valid]] = alt[k[valid]]
    return moved, shift, offset


def plot_variant(ref: np.ndarray, alt: np.ndarray, bin_starts: np.ndarray, labels: Sequence[str], *,
                 chrom: str, pos: int, ref_allele: str, alt_allele: str, variant_id: str | None = None,
                 bin_size: int = 128, title: str | None = None, model: str | None = None,
                 track_ids: Sequence[str] | None = None, notes: Sequence[str] | None = None,
                 gaps: Sequence[tuple[int, int]] = (), tss: Sequence[tuple[int, str, str]] = ()) -> Figure:
    """Reference and alternative predictions of K tracks around one variant.

    ``ref``, ``alt``: ``float [bins, K]``, each allele's own window's bins (docs/spec.md §3.4);
    ``bin_starts``: ``int [bins]``, 0-based genome start of each (contiguous) bin; ``labels``: K track
    descriptions; ``pos``: the variant's 1-based VCF position. Per track two panels, 2K axes in all,
    sharing the x axis: ref (solid blue) and alt (dashed red) as steps, titled with the description on
    the left and ``track_ids[k]`` and ``notes[k]`` (e.g. SAD and rank) on the right; then ``alt - ref``
    around a zero line, gains red and losses blue. A dotted marker at ``pos``, and the 0-based
    half-open ``gaps`` (stretches of N) shaded, on each. For an indel the alternative is drawn in
    reference coordinates (:func:`reference_coordinates`); bins that still lie off the reference's
    are hatched in the ``alt - ref`` panels, and a caption says so. ``tss``: ``(0-based position, gene name,
    strand)`` of the genes' TSSs in the window, drawn as green dash-dot lines on the ref/alt panels and
    named, with an arrow in the direction of transcription, above the first. One legend for the figure, right of
    the panels; the title names the variant (``variant_id``, when a real ID, then ``chrom:pos
    REF>ALT``) and ``model``, under ``title`` when given.
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
    track_ids = [""] * n_tracks if track_ids is None else list(track_ids)
    notes = [""] * n_tracks if notes is None else list(notes)
    if len(track_ids) != n_tracks or len(notes) != n_tracks:
        raise InputError(f"plot_variant: {len(track_ids)} track ids and {len(notes)} notes for {n_tracks} tracks")

    shown, shift, offset = reference_coordinates(alt, bin_starts, pos, len(ref_allele), len(alt_allele), bin_size)
    # Step edges: the drawn y arrays repeat their last value so "steps-post" closes the last bin.
    edges = np.append(bin_starts, bin_starts[-1] + bin_size) + 0.5
    first_moved = edges[int(np.searchsorted(bin_starts, pos - 1, side="right"))]  # right of the variant's bin
    visible = [(max(a + 0.5, edges[0]), min(b + 0.5, edges[-1])) for a, b in gaps
               if a + 0.5 < edges[-1] and b + 0.5 > edges[0]]
    shown_tss = [(p, name, strand) for p, name, strand in tss if edges[0] <= p + 1 <= edges[-1]]
    genes = 1 if shown_tss else 0
    fig = Figure(figsize=(10, 1.6 + 2.4 * n_tracks + 0.9 * genes), layout="constrained")
    axes = fig.subplots(2 * n_tracks + genes, 1, sharex=True,
                        gridspec_kw={"height_ratios": [1.2] * genes + [2, 1] * n_tracks})
    if genes:
        _gene_panel(axes[0], shown_tss, edges[0], edges[-1])
        axes = axes[1:]
    for k, label in enumerate(labels):
        top, bottom = axes[2 * k], axes[2 * k + 1]
        for ax in (top, bottom):
            for a, b in visible:
                ax.axvspan(a, b, color=GAP_COLOR, linewidth=0, zorder=0, label="N (no sequence)")
        if offset and first_moved < edges[-1]:
            bottom.axvspan(first_moved, edges[-1], facecolor="none", edgecolor="0.75", hatch=OFFSET_HATCH, linewidth=0,
                           zorder=0, label=f"alt bins {abs(offset)} bp off the ref bins")
        top.plot(edges, _closed(ref[:, k]), drawstyle="steps-post", label="ref", **REF_STYLE)
        top.plot(edges, _closed(shown[:, k]), drawstyle="steps-post", label="alt", **ALT_STYLE)
        top.set_title(_cut(label, 90), fontsize=9, loc="left")
        right = "   ".join(text for text in (track_ids[k], notes[k]) if text)
        if right:
            top.set_title(right, fontsize=8, loc="right")
        top.set_ylabel(SIGNAL_LABEL, fontsize=8)
        peak = np.nanmax([np.nanmax(ref[:, k]), np.nanmax(shown[:, k])])
        if peak > 0:  # softplus outputs: from zero, with room above the highest bin
            top.set_ylim(0, 1.08 * peak)

        delta = _closed(shown[:, k] - ref[:, k])
        gain, loss = _signed_fill(bottom, edges, delta, step="post")
        gain.set_label("alt > ref")
        loss.set_label("alt < ref")
        bottom.plot(edges, delta, drawstyle="steps-post", color="black", linewidth=0.6, label="alt - ref")
        bottom.axhline(0, color="black", linewidth=0.5)
        bottom.set_ylabel("alt - ref", fontsize=8)
        # Symmetric limits keep the zero line in the middle, so gains and losses compare by eye.
        extent = np.nanmax(np.abs(delta)) if np.isfinite(delta).any() else 0
        if extent > 0:
            bottom.set_ylim(-1.15 * extent, 1.15 * extent)
        for ax in (top, bottom):
            ax.axvline(pos, color="0.3", linestyle=":", linewidth=1.0, label="variant")
        for position, _, _ in shown_tss:
            top.axvline(position + 1, color=TSS_COLOR, linestyle="-.", linewidth=0.8, label="TSS")

    _genome_axis(axes[-1], chrom, edges[0], edges[-1])
    for ax in fig.axes:
        ax.tick_params(labelsize=8)
    # One legend for the figure, outside the data; its entries are the first panels' own artists.
    wanted = ["ref", "alt", "variant", "TSS", "alt > ref", "alt < ref", "N (no sequence)"]
    handles = {}
    for ax in axes[:2]:
        for artist in [*ax.get_lines(), *ax.collections, *ax.patches]:
            handles.setdefault(artist.get_label(), artist)
    order = wanted + [name for name in handles if name.startswith("alt bins")]
    fig.legend([handles[name] for name in order if name in handles], [name for name in order if name in handles],
               loc="outside right upper", fontsize=8, frameon=False)

    heading = f"{chrom}:{pos} {_short_allele(ref_allele)}>{_short_allele(alt_allele)}"
    if variant_id and variant_id != ".":
        heading = f"{variant_id}   {heading}"
    lines = [title] if title else []
    lines.append(heading)
    if model:
        lines.append(f"model: {model}")
    fig.suptitle("\n".join(lines), fontsize=11)
    caption = _indel_caption(len(alt_allele) - len(ref_allele), shift, offset)
    if visible:
        caption.append("Grey: N (no sequence in the FASTA, or past the contig end).")
    if caption:
        fig.supxlabel("\n".join(textwrap.fill(line, 150) for line in caption), fontsize=8)
    return fig


def _gene_panel(ax, tss: Sequence[tuple[int, str, str]], lo: float, hi: float) -> None:
    """A thin panel above the tracks: each TSS (1-based x) a tick, each gene named once at its first TSS with
    an arrow in its direction of transcription, in the lowest of four rows where the name does not run into
    the previous one (names that fit in no row are left out; their ticks stay)."""
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_ylabel("genes (TSS)", fontsize=8)
    for position, _, _ in tss:
        ax.axvline(position + 1, ymax=0.14, color=TSS_COLOR, linewidth=0.8, label="TSS")
    per_character = 0.6 * 6 / GENE_PANEL_POINTS * (hi - lo)  # 6-pt text on an axis ~8 inches wide
    ends = [-np.inf] * 4
    named = set()
    for position, name, strand in sorted(tss):
        x, label = position + 1, f"{name} {'→' if strand == '+' else '←'}"
        row = next((r for r in range(len(ends)) if x >= ends[r]), None)
        if name in named or row is None:
            continue
        named.add(name)
        ends[row] = x + (len(label) + 1) * per_character
        ax.text(x, 0.18 + 0.2 * row, label, fontsize=6, color=TSS_COLOR, ha="left", va="bottom", clip_on=True)


def _indel_caption(d: int, shift: int, offset: int) -> list[str]:
    """What the figure does with an indel of ``d`` bp (alt minus ref length): see :func:`reference_coordinates`."""
    if d == 0:
        return []
    what = f"{abs(d):,}-bp {'insertion' if d > 0 else 'deletion'}"
    if shift == 0:
        return [f"{what}: right of the variant the alternative's sequence, and so its bins, lie {abs(d)} bp off the "
                f"reference's (hatched): alt - ref there includes that shift."]
    bins = f"{abs(shift)} bin{'s' if abs(shift) > 1 else ''}"
    dropped = (f"the {bins} of inserted sequence {'is' if shift == 1 else 'are'} not shown" if shift > 0
               else "deleted bins are left empty")
    moved = (f"{what}: the alternative's bins right of the variant are drawn {bins} to the "
             f"{'left' if shift > 0 else 'right'}, in reference coordinates ({dropped})")
    if offset == 0:
        return [moved + "."]
    return [moved + f"; they still lie {abs(offset)} bp off the reference's (hatched): alt - ref there includes "
                    f"that shift."]


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


def _signed_fill(ax, x: np.ndarray, y: np.ndarray, **kwargs):
    """Fill gains and losses from zero in their own colours; returns both fills."""
    return (ax.fill_between(x, np.maximum(y, 0), color=GAIN_COLOR, alpha=0.45, linewidth=0, **kwargs),
            ax.fill_between(x, np.minimum(y, 0), color=LOSS_COLOR, alpha=0.45, linewidth=0, **kwargs))


def _genome_axis(ax, chrom: str, lo: float, hi: float) -> None:
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=True))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_xlabel(f"{chrom} position (bp, 1-based)", fontsize=8)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short_allele(allele: str, limit: int = 12) -> str:
    """Long indel alleles abbreviated, so the title stays on one line."""
    return allele if len(allele) <= limit else f"{allele[:limit - 3]}...({len(allele)} bp)"
