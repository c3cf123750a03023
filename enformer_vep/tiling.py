"""Conv-tower tiles shared by neighbouring variants' windows: the plan and its cost (docs/spec.md §5.4).

The stem and conv tower map each 128 bp of input to one bin and see only a few bins either side. Two model
inputs whose starts differ by a multiple of 128 bp (the same *phase*, start mod 128) on one strand therefore
get the same bins over their overlap, except within reach of either input's ends, where the convolutions'
zero padding stands where the other input has sequence. So, per block of records, strand and phase, the conv
tower runs once over the stretch that the phase's windows cover, as a grid of chunks of ``chunk_bins`` bins
whose ``margin`` bins at each side are dropped (chunk j keeps tile bins ``[j K, (j + 1) K)``, K = chunk_bins -
2 margin), and each window takes its bins as slices of the tiles. Recomputed from input patches
(``Enformer.recompute_bins``): the ``margin`` bins at each end of every window, and the bins the allele can
reach, for both alleles. An indel's alternative input is the reference's left part, its ALT, then the genome
moved by d = len(ALT) - len(REF) bp (docs/spec.md §3.4): its right part lies on the tiles of phase p - d.

Coordinates. A strand's *virtual* position y names one base of that strand: on the forward strand genome
base y, on the reverse strand the complement of genome base -1 - y, so that the reverse complement of the
forward input ``[S, S + L)`` is the reverse-strand input ``[-(S + L), -S)``. Tile bin t of phase q holds the
bin of virtual bases ``[q + 128 t, q + 128 (t + 1))``: window bin k of an input starting at virtual position V
is tile bin ``V // 128 + k`` of phase ``V % 128``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence

import numpy as np

from .model import BIN_SIZE, SEQUENCE_LENGTH
from .windows import VARIANT_OFFSET, WINDOW, reverse_complement

# Alternatives differing from their reference over fewer bp reuse its conv tower on the per-window path (SNV, MNP).
MAX_REUSED_SPAN = 1024
# Input bins per tile chunk: its 2 x margin dropped bins cost 2.3% and the grid rounds a tile out by about one
# chunk per phase; 256 balances the two on a dense block (docs/spec.md §5.4).
CHUNK_BINS = 256


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The model input's size and reach, as tiles and windows see it.

    Attributes
    ----------
    length : int
        Model input L in bp, the central part of each 393,216-bp window (a multiple of 128).
    margin : int
        Bins next to an input's edge that its zero padding can spoil (``Enformer._patch_margin``).
    chunk_bins : int
        Input bins per tile chunk (more than 2 x margin).
    affected : callable
        ``Enformer.affected_bins``: input positions ``first..last`` -> the bins they can reach.
    """

    length: int
    margin: int
    chunk_bins: int
    affected: Callable[[int, int], tuple[int, int]]

    def __post_init__(self):
        if self.length % BIN_SIZE or not 0 < self.length <= WINDOW:
            raise ValueError(f"input length {self.length} must be a multiple of {BIN_SIZE} up to {WINDOW}")
        if self.chunk_bins <= 2 * self.margin:
            raise ValueError(f"tile chunks of {self.chunk_bins} bins keep nothing of a margin of {self.margin}")

    @property
    def bins(self) -> int:
        return self.length // BIN_SIZE

    @property
    def keep(self) -> int:
        """Tile bins each chunk contributes."""
        return self.chunk_bins - 2 * self.margin

    @property
    def max_shift(self) -> int:
        """Largest |shift| whose input is real sequence of the window (no N from the shift's fill)."""
        return (WINDOW - self.length) // 2

    def patch_bins(self, first: int, last: int) -> int:
        """Input bins of the patch that recomputes bins ``first..last`` (cut at the input's ends)."""
        return min(last + 1 + self.margin, self.bins) - max(first - self.margin, 0)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One model input as tile slices: its positions ``i < a`` hold the strand's virtual base ``left + i``,
    positions ``i >= b`` hold ``right + i``, and ``[a, b)`` the allele's own bases."""

    strand: int  # 0 forward, 1 reverse complement
    left: int
    right: int
    a: int
    b: int


@dataclasses.dataclass(frozen=True)
class Unit:
    """One view of one allele: the layouts of its reference and alternative inputs, the bins
    ``first..last`` recomputed for both (those the allele can reach), and whether the alternative's left and
    right edge bins equal the reference's (same input under the edge patch)."""

    chrom: str
    ref: Layout
    alt: Layout
    first: int
    last: int
    shared_edges: tuple[bool, bool]

    def pieces(self, layout: Layout, geometry: Geometry) -> list[tuple[int, int, int]]:
        """Tile slices ``(virtual start, first bin, stop bin)`` of ``layout``: every bin but the edges and
        ``first..last``."""
        inner, m = geometry.bins - geometry.margin, geometry.margin
        out = [(layout.left, m, min(self.first, inner)), (layout.right, max(self.last + 1, m), inner)]
        return [piece for piece in out if piece[1] < piece[2]]

    def chunks(self, geometry: Geometry) -> set[tuple]:
        """Keys ``(chrom, strand, phase, j)`` of the tile chunks the two inputs take bins from."""
        keys = set()
        for layout in (self.ref, self.alt):
            for start, lo, hi in self.pieces(layout, geometry):
                keys.update((self.chrom, layout.strand, start % BIN_SIZE, j)
                            for j, *_ in tile_slices(start, lo, hi, geometry.keep))
        return keys

    def edge_spans(self, geometry: Geometry) -> tuple[tuple[int, int], tuple[int, int]]:
        """The left and right edge bins (inclusive)."""
        bins, m = geometry.bins, geometry.margin
        return (0, m - 1), (bins - m, bins - 1)


def tile_slices(start: int, lo: int, hi: int, keep: int):
    """Where window bins ``lo..hi-1`` of an input at virtual position ``start`` lie in the tile chunks of its
    phase, ``keep`` bins each: ``(j, chunk bins c0..c1-1, window bins k0..k1-1)`` per chunk j."""
    base = start // BIN_SIZE
    for j in range((base + lo) // keep, (base + hi - 1) // keep + 1):
        t0, t1 = max(base + lo, j * keep), min(base + hi, (j + 1) * keep)
        yield j, t0 - j * keep, t1 - j * keep, t0 - base, t1 - base


def view_unit(chrom: str, pos: int, ref_length: int, alt_length: int, shift: int, reverse: bool,
              geometry: Geometry) -> Unit:
    """The :class:`Unit` of the allele ``pos, REF, ALT`` (1-based, lengths in bp) seen through one view."""
    length, bins = geometry.length, geometry.bins
    alt_length = min(alt_length, WINDOW - VARIANT_OFFSET)  # allele_windows cuts ALT there
    delta = alt_length - ref_length
    start = pos - length // 2 - shift  # forward virtual position of input base 0
    v = length // 2 - 1 + shift  # input position of the allele's first base
    a, b = min(max(v, 0), length), min(max(v + alt_length, 0), length)
    if reverse:  # the input reversed: the right part comes first, and the ALT at L - b
        start = -(start + length)
        alt = Layout(1, start + delta, start, length - b, length - a)
    else:
        alt = Layout(0, start, start - delta, a, b)
    ref = Layout(alt.strand, start, start, alt.a, alt.b)
    first, last = geometry.affected(alt.a, alt.b - 1)  # with a == b: the seam between the two parts
    edge = min(bins, 2 * geometry.margin) * BIN_SIZE
    shared = (alt.left == ref.left and alt.a >= edge, alt.right == ref.right and alt.b <= length - edge)
    return Unit(chrom, ref, alt, max(first, 0), min(last, bins - 1), shared)


@dataclasses.dataclass
class BlockPlan:
    """Tiles of one block of alleles (docs/spec.md §5.4): groups, units, chunks and costs.

    Attributes
    ----------
    geometry : Geometry
    views : list of (int, bool)
        (shift, reverse) of each view, in the scorer's order.
    groups : list of list of int
        Allele indices by position, ``group_size`` per transformer pass pair.
    units : dict
        ``(allele, view) -> Unit``.
    new_chunks, last_chunks : list of list of tuple
        Per group, the chunk keys first needed there (sorted) and those not needed after it.
    tiled_bins : int
        Conv-tower bins the tiled path computes: every chunk once, the edge and allele patches.
    reuse_bins : int
        Conv-tower bins of the per-window reuse path: full references, SNV/MNP patches, full indels.
    """

    geometry: Geometry
    views: list[tuple[int, bool]]
    groups: list[list[int]]
    units: dict[tuple[int, int], Unit]
    new_chunks: list[list[tuple]]
    last_chunks: list[list[tuple]]
    tiled_bins: int
    reuse_bins: int

    @property
    def tiled(self) -> bool:
        """The cost model: tiles when they compute fewer conv-tower bins than the per-window path."""
        return self.tiled_bins < self.reuse_bins


def plan_block(sites: Sequence[tuple[str, int, int, int]], views: Sequence[tuple[int, bool]], geometry: Geometry,
               group_size: int) -> BlockPlan:
    """The tile plan of a block's alleles ``sites`` = ``(chrom, pos, len(REF), len(ALT))``, seen through
    ``views`` ((shift, reverse) pairs, |shift| <= ``geometry.max_shift``); groups of ``group_size`` alleles.

    A function of its arguments only, so whoever scores a block computes the same tiles.
    """
    if any(abs(shift) > geometry.max_shift for shift, _ in views):
        raise ValueError(f"tiles need shifts of at most {geometry.max_shift} bp")
    order = sorted(range(len(sites)), key=lambda i: sites[i][1])
    groups = [order[k:k + group_size] for k in range(0, len(order), group_size)]
    units, first_use, last_use = {}, {}, {}
    bins, tiled, reuse = geometry.bins, 0, 0
    for g, rows in enumerate(groups):
        for row in rows:
            chrom, pos, ref_length, alt_length = sites[row]
            for v, (shift, reverse) in enumerate(views):
                unit = units[row, v] = view_unit(chrom, pos, ref_length, alt_length, shift, reverse, geometry)
                for key in unit.chunks(geometry):
                    first_use.setdefault(key, g)
                    last_use[key] = g
                edges = [geometry.patch_bins(*span) for span in unit.edge_spans(geometry)]
                changed = geometry.patch_bins(unit.first, unit.last)
                alt_edges = sum(e for e, shared in zip(edges, unit.shared_edges, strict=True) if not shared)
                tiled += 2 * changed + sum(edges) + alt_edges
                reuse += bins + _reuse_alt_bins(unit, alt_length - ref_length, geometry)
    tiled += len(first_use) * geometry.chunk_bins
    new = [[] for _ in groups]
    last = [[] for _ in groups]
    for key in sorted(first_use):
        new[first_use[key]].append(key)
        last[last_use[key]].append(key)
    return BlockPlan(geometry, list(views), groups, units, new, last, tiled, reuse)


def _reuse_alt_bins(unit: Unit, delta: int, geometry: Geometry) -> int:
    """Conv-tower bins of an alternative on the per-window path: a SNV/MNP's patches for both alleles (its
    change as ALT's span in the input), an indel's full input."""
    if delta:
        return geometry.bins
    if unit.alt.a == unit.alt.b:  # the allele lies outside this view's input
        return 0
    if unit.alt.b - unit.alt.a > MAX_REUSED_SPAN:
        return geometry.bins
    return 2 * geometry.patch_bins(unit.first, unit.last)


def chunk_codes(genome, key: tuple, geometry: Geometry) -> np.ndarray:
    """uint8 codes ``[chunk_bins x 128]`` of chunk ``key`` = ``(chrom, strand, phase, j)``, read from ``genome``
    (anything with ``fetch(chrom, start, end)``, N outside the contig)."""
    chrom, strand, phase, j = key
    start = phase + BIN_SIZE * (j * geometry.keep - geometry.margin)
    end = start + BIN_SIZE * geometry.chunk_bins
    return genome.fetch(chrom, start, end) if strand == 0 else reverse_complement(genome.fetch(chrom, -end, -start))


# --- arithmetic --------------------------------------------------------------------------------------------

def _config_key(config) -> str:
    return json.dumps(dataclasses.asdict(getattr(config, "config", config)), sort_keys=True)


@functools.lru_cache(maxsize=8)
def _meta_model(config_key: str):
    """The architecture on the meta device: shapes and reach without weights or arithmetic."""
    import torch

    from .model import Enformer, EnformerConfig

    with torch.device("meta"):
        return Enformer(EnformerConfig(**json.loads(config_key))).eval()


@functools.lru_cache(maxsize=32)
def flop_rates(config_key: str, length: int, head: str, tracks: int | None) -> dict[str, float]:
    """FLOPs (``torch.utils.flop_counter``: 2 x multiply-accumulates of convolutions, linear layers and
    matmuls) counted on the meta device: ``conv_bin`` per conv-tower bin (the conv tower is linear in the
    length), ``sequence`` per sequence through transformer, final block and ``tracks`` columns of ``head``
    (None: all), and ``call`` per transformer call (the relative-position projection, once per batch)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(config_key)
    cfg = model.config

    def count(fn, *args) -> int:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            fn(*args)
        return counter.get_total_flops()

    bins = length // BIN_SIZE
    conv = count(model._conv_stages, torch.zeros(1, 2 * BIN_SIZE, 4, device="meta")) / 2
    selected = None if tracks is None else torch.zeros(tracks, dtype=torch.long, device="meta")

    def rest(batch: int) -> int:
        x = torch.zeros(batch, bins, cfg.channels, device="meta")
        embedding = torch.zeros(batch, cfg.target_length, 2 * cfg.channels, device="meta")
        return count(model.attend, x) + count(model.embed, x) + count(model.head_tracks, embedding, head, selected)

    one, two = rest(1), rest(2)
    return {"conv_bin": conv, "sequence": float(two - one), "call": float(2 * one - two)}


def plan_flops(config, variants: Sequence[tuple], *, shifts: Sequence[int] = (0,), rc: bool = False,
               head: str = "human", tracks: int | None = None, block: int = 1024, batch_size: int = 32,
               input_length: int = SEQUENCE_LENGTH, chunk_bins: int = CHUNK_BINS) -> dict[str, float]:
    """FLOPs per variant that :meth:`VariantScorer.score_block` executes on ``variants``, and those of the
    per-window paths, counted from the plan (no model runs; tests check it against ``FlopCounterMode``).

    Parameters
    ----------
    config : EnformerConfig or Enformer
        The architecture (its FLOP rates are counted once on the meta device).
    variants : sequence of (chrom, pos, ref, alt)
        Alleles in VCF order (1-based POS; REF and ALT as strings), scored in blocks of ``block``.
    shifts, rc, head, tracks, batch_size
        As the scorer's options; ``tracks``: the number of columns computed (None: the whole head).
    block : int
        Alleles per block (``--checkpoint-every``, counting one allele per record).
    input_length, chunk_bins
        The model input and tile chunk sizes (the scorer's ``input_length`` and ``tile_chunk``).

    Returns
    -------
    dict
        Per variant: ``executed`` (score_block with ``reuse=True``: tiles where the cost model chooses them),
        ``tiled`` (tiles in every block), ``reuse`` (the per-window reuse path), ``full`` (two full passes,
        ``reuse=False``); also ``blocks`` and ``tiled_blocks``.
    """
    key = _config_key(config)
    rates = flop_rates(key, input_length, head, tracks)
    model = _meta_model(key)
    geometry = Geometry(input_length, model._patch_margin, chunk_bins, model.affected_bins)
    views = [(s, False) for s in shifts] + ([(s, True) for s in shifts] if rc else [])
    group = max(1, batch_size // 2)
    totals = dict.fromkeys(("executed", "tiled", "reuse", "full"), 0.0)
    tiled_blocks = blocks = 0
    for start in range(0, len(variants), block):
        sites = [(chrom, int(pos), len(ref), len(alt)) for chrom, pos, ref, alt in variants[start:start + block]]
        plan = plan_block(sites, views, geometry, group)
        n, bins = len(sites), geometry.bins
        sequences = 2 * n * len(views) * rates["sequence"]
        calls = len(plan.groups) * len(views) * rates["call"]
        # the per-window paths score batch_size alleles per call, each view in passes of `group` pairs
        window_calls = sum(math.ceil(len(sites[k:k + batch_size]) / group) for k in range(0, n, batch_size))
        window_rest = sequences + window_calls * len(views) * rates["call"]
        costs = {"tiled": plan.tiled_bins * rates["conv_bin"] + sequences + calls,
                 "reuse": plan.reuse_bins * rates["conv_bin"] + window_rest,
                 "full": 2 * n * len(views) * bins * rates["conv_bin"] + window_rest}
        costs["executed"] = costs["tiled"] if plan.tiled else costs["reuse"]
        for name, value in costs.items():
            totals[name] += value
        blocks += 1
        tiled_blocks += plan.tiled
    n = max(len(variants), 1)
    return {name: value / n for name, value in totals.items()} | {"blocks": blocks, "tiled_blocks": tiled_blocks}
