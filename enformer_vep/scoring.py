"""Batched reference/alternative inference and the variant-effect statistics (docs/spec.md §4, §5).

A scorer model is anything with ``predict_tracks(x [B, L, 4], head, tracks) -> [B, bins, T]``
(:class:`enformer_vep.model.Enformer` has it); tests use tiny hand-derivable models.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor

import numpy as np
import torch

from . import tiling
from .allocator import FreedMemoryGuard
from .errors import InputError
from .model import SEQUENCE_LENGTH
from .tiling import MAX_REUSED_SPAN
from .windows import ONE_HOT_TABLE, allele_windows, reverse_complement

log = logging.getLogger("enformer_vep")

FLOAT16_MAX = 65504.0

# Formulas over the output bins of one track; written into the output files.
STATISTICS = {
    "SAD": "sum_bins(alt) - sum_bins(ref)",
    "SAR": "sum_bins(log2(alt + 1) - log2(ref + 1))",
    "SADR": "log2(sum_bins(alt) + 1) - log2(sum_bins(ref) + 1)",
    "SAX": "(alt - ref) at the bin of max |alt - ref|",
    "D1": "sum_bins(|alt - ref|)",
    "D2": "sqrt(sum_bins((alt - ref)^2))",
}


def parse_statistics(text: str) -> list[str]:
    names = [s.strip().upper() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STATISTICS]
    if unknown or not names:
        raise ValueError(f"unknown statistic(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(STATISTICS)}")
    return list(dict.fromkeys(names))


def statistics(ref: torch.Tensor, alt: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-track statistics ``[B, T]`` float32 from predictions ``ref, alt: [B, bins, T]``."""
    ref, alt = ref.float(), alt.float()
    diff = alt - ref
    out = {}
    for name in names:
        if name == "SAD":  # summing the differences avoids cancelling two large float32 sums
            out[name] = diff.sum(1)
        elif name == "SAR":  # log2(alt + 1) - log2(ref + 1), without cancelling two close logs
            out[name] = (torch.log1p(diff / (ref + 1)) / math.log(2)).sum(1)
        elif name == "SADR":
            out[name] = torch.log1p(diff.sum(1) / (ref.sum(1) + 1)) / math.log(2)
        elif name == "SAX":
            peak = diff.abs().argmax(dim=1, keepdim=True)  # [B, 1, T]
            out[name] = diff.gather(1, peak)[:, 0]
        elif name == "D1":
            out[name] = diff.abs().sum(1)
        elif name == "D2":
            out[name] = diff.square().sum(1).sqrt()
    return out


# Gene-level statistics over a gene's TSS bins (docs/spec.md §4.5); written into the genes files.
GENE_STATISTICS = {
    "SED": "sum_tss_bins(alt) - sum_tss_bins(ref)",
    "logSED": "log2(sum_tss_bins(alt) + 1) - log2(sum_tss_bins(ref) + 1)",
}


def gene_statistics(ref: torch.Tensor, alt: torch.Tensor, genes: Sequence[Sequence[tuple]],
                    names: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """Per allele, gene statistics ``{name: [G_i, T]}`` float32 from predictions ``ref, alt: [B, bins, T]``.

    ``genes[i]`` lists allele i's genes as ``(ref_bins, alt_bins)``: the output bins summed in the
    reference and in the alternative prediction (``genes.allele_gene_bins``). Formulas:
    ``GENE_STATISTICS``; the sums are 0/1 masks times the predictions (one ``bmm`` per group).
    """
    batch, bins, tracks = ref.shape
    width = max([len(g) for g in genes] + [0])
    masks = torch.zeros(2, batch, max(width, 1), bins, device=ref.device)
    for i, allele in enumerate(genes):
        for g, (ref_bins, alt_bins) in enumerate(allele):
            masks[0, i, g, list(ref_bins)] = 1
            masks[1, i, g, list(alt_bins)] = 1
    total_ref = torch.bmm(masks[0], ref.float())  # [B, G, T]
    total_alt = torch.bmm(masks[1], alt.float())
    out = []
    for i, allele in enumerate(genes):
        r, a = total_ref[i, :len(allele)], total_alt[i, :len(allele)]
        values = {}
        for name in names:
            if name == "SED":
                values[name] = a - r
            elif name == "logSED":  # log2(a + 1) - log2(r + 1), without cancelling two close logs
                values[name] = torch.log1p((a - r) / (r + 1)) / math.log(2)
        out.append(values)
    return out


def to_float16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Clip to the float16 range (basenji 2020 wrote inf) and count the clipped values."""
    clipped = int(np.count_nonzero(np.abs(values) > FLOAT16_MAX))
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), clipped


def shifted(codes: np.ndarray, shift: int) -> np.ndarray:
    """Windows ``[B, L]`` moved ``shift`` bp to the right (left if negative), N-filled."""
    if shift == 0:
        return codes
    out = np.full_like(codes, ord("N"))
    if shift > 0:
        out[:, shift:] = codes[:, :-shift]
    else:
        out[:, :shift] = codes[:, -shift:]
    return out


# One name sets both stages; "CONV/TRANSFORMER" sets the conv tower and the transformer apart.
PRECISIONS = ("fp32", "tf32", "bf16", "bf16/tf32", "bf16/fp32")


def stage(name: str):
    """A labelled range in ``torch.profiler`` traces (benchmarks/profile_score.py sums device time per stage)."""
    return torch.profiler.record_function(f"enformer_vep: {name}")


def default_device(name: str | None = None) -> str:
    """``name``, checked, or by default cuda when a GPU is visible, else cpu.

    Raises :class:`InputError` for a name torch does not know or a CUDA device this torch cannot
    use (a CPU-only build, no GPU visible, an index beyond the visible GPUs)."""
    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps...)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise InputError(f"--device {name}: this torch {torch.__version__} is a CPU-only build; install a "
                             f"CUDA build of torch, or use --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError(f"--device {name}: no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver?)")
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {name}: only {count} CUDA device{'s' if count > 1 else ''} visible "
                             f"(cuda:0..cuda:{count - 1})")
    return name


def default_precision(device: torch.device) -> str:
    """float32 on CPU; on CUDA a bf16 conv tower with a TF32 transformer (``bf16/tf32``): the fastest
    combination whose SAD agrees with float32 at median r >= 0.999 and worst r >= 0.99 on an H200
    (benchmarks/RESULTS.md)."""
    return "bf16/tf32" if device.type == "cuda" else "fp32"


def stage_precisions(precision: str) -> tuple[str, str]:
    """(conv tower, transformer) precisions of a ``PRECISIONS`` name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    conv, _, transformer = precision.partition("/")
    return conv, transformer or conv


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """Autocast for bf16; the TF32 switches for tf32 (restored afterwards). One stage's name."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class VariantScorer:
    """Scores variants: a block of alleles read from a genome (:meth:`score_block`, with conv-tower tiles
    shared by neighbouring windows) or batches of (reference, alternative) windows (:meth:`score`).

    Parameters
    ----------
    model
        An :class:`~enformer_vep.model.Enformer` (eval mode), or any model with
        ``predict_tracks(x [B, L, 4], head, tracks) -> [B, 896, T]``.
    head : str
        Output head (``human``: 5,313 tracks, ``mouse``: 1,643 for the released model).
    tracks : numpy.ndarray, optional
        Head columns to compute (int ``[T]``); all when None.
    stats : sequence of str
        Statistics from ``STATISTICS`` (docs/spec.md §4).
    rc : bool
        Also predict the reverse complement (its bins flipped back) and average.
    shifts : sequence of int
        Window shifts in bp whose predictions are averaged (docs/spec.md §5.1).
    device : str or torch.device
    batch_size : int, optional
        Sequences per forward pass; None (auto) starts at 32 on CUDA and halves after each
        out-of-memory error until a batch fits (4 on CPU).
    reuse : bool
        Share conv-tower work between alleles and windows (docs/spec.md §5.4): :meth:`score_block` takes
        tiles where its cost model says they pay, else, like :meth:`score`, an alternative differing from
        its reference in a short stretch (SNV, MNP) reuses the reference's conv tower and recomputes only
        the bins the change reaches, for both alleles.
    precision : str, optional
        One of ``PRECISIONS``: one name for both trunk stages, or ``CONV/TRANSFORMER``; default
        ``fp32`` on CPU, ``bf16/tf32`` on CUDA. The transformer's residual stream, the heads and
        the statistics are always float32.
    compile : bool
        Run the full-window conv tower, the tile chunks' and the transformer through ``torch.compile``
        (compiled on first use, per batch shape).
    input_length : int
        bp the model reads: the central part of longer windows (default 196,608 of 393,216).
    tiles : bool
        With ``reuse``, let :meth:`score_block` share conv-tower tiles between windows where its cost
        model says they pay (docs/spec.md §5.4); False keeps the per-window path.
    tile_chunk : int
        Input bins per tile chunk of :meth:`score_block` (``tiling.CHUNK_BINS``).
    gene_stats : sequence of str
        Gene statistics (``GENE_STATISTICS``) :meth:`score_block` computes when given genes.

    Raises
    ------
    ValueError
        An unknown precision.
    """

    def __init__(self, model, *, head: str = "human", tracks: np.ndarray | None = None,
                 stats: Sequence[str] = ("SAD", "SAR"), rc: bool = False, shifts: Sequence[int] = (0,),
                 device: str | torch.device = "cpu", batch_size: int | None = 4, reuse: bool = True,
                 precision: str | None = None, compile: bool = False, input_length: int = SEQUENCE_LENGTH,
                 tiles: bool = True, tile_chunk: int = tiling.CHUNK_BINS,
                 gene_stats: Sequence[str] = tuple(GENE_STATISTICS)):
        self.model, self.head, self.stats, self.reuse = model, head, list(stats), reuse
        self.rc, self.shifts = rc, list(shifts)
        self.device = torch.device(device)
        self.batch_size = batch_size or (32 if self.device.type == "cuda" else 4)
        self.precision = precision or default_precision(self.device)
        self.conv_precision, self.transformer_precision = stage_precisions(self.precision)
        self.input_length, self.tiles, self.tile_chunk = input_length, tiles, tile_chunk
        self.gene_stats = list(gene_stats)
        self._convolve, self._attend = (getattr(model, "convolve", None), getattr(model, "attend", None))
        self._conv_chunks = getattr(model, "_conv_stages", None)
        if compile and hasattr(model, "trunk"):
            self._convolve, self._attend = torch.compile(model.convolve), torch.compile(model.attend)
            self._conv_chunks = torch.compile(model._conv_stages)
        self.tracks = None if tracks is None else torch.as_tensor(tracks, dtype=torch.long, device=self.device)
        self._one_hot = torch.from_numpy(ONE_HOT_TABLE).to(self.device)  # encoded on the device
        # CPU: glibc keeps freed activations (allocator.py); the guard stops fragmentation growing the process
        self._host_memory = FreedMemoryGuard() if self.device.type == "cpu" else None

    def _views(self, codes: np.ndarray) -> list[tuple[np.ndarray, bool]]:
        """The windows as the model sees them: each shift, and its reverse complement with ``rc``,
        cropped to the central ``input_length`` bp the model uses (half the transfer and encoding)."""
        views = [(shifted(codes, s), False) for s in self.shifts]
        views += [(reverse_complement(v), True) for v, _ in views] if self.rc else []
        if codes.shape[1] > self.input_length:
            start = (codes.shape[1] - self.input_length) // 2
            views = [(v[:, start:start + self.input_length], reverse) for v, reverse in views]
        return views

    def _encode(self, codes: np.ndarray) -> torch.Tensor:
        """uint8 ``[B, L]`` travels to the device (pinned, asynchronously on CUDA) and is one-hot
        encoded there: ``[B, L, 4]``."""
        host = torch.from_numpy(np.ascontiguousarray(codes))
        if self.device.type == "cuda":
            host = host.pin_memory()
        return torch.nn.functional.embedding(host.to(self.device, non_blocking=True).int(), self._one_hot)

    def _predict_pairs(self, ref: np.ndarray, alt: np.ndarray,
                       conv: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean predictions ``[N, bins, T]`` of reference and alternative windows ``[N, L]``.

        ``conv(x, view=, start=)``, when given, computes the conv tower of a pass's one-hot ``x``
        (``[2B, L, 4]``: alleles ``start..start+B-1`` through view ``view``, references then alternatives)
        in place of :meth:`_conv_tower`."""
        views = list(zip(self._views(ref), self._views(alt), strict=True))
        group = max(1, self.batch_size // 2)  # a group's reference and alternative share a pass
        total_ref = total_alt = None
        for view, ((ref_view, reverse), (alt_view, _)) in enumerate(views):
            for start in range(0, len(ref), group):
                stop = start + group  # reference and alternative encoded together: no copy to join them
                with stage("encode"):
                    x = self._encode(np.concatenate([ref_view[start:stop], alt_view[start:stop]]))
                tower = self._conv_tower if conv is None else functools.partial(conv, view=view, start=start)
                p_ref, p_alt = self._predict_group(x, tower)
                if reverse:
                    p_ref, p_alt = p_ref.flip(1), p_alt.flip(1)
                if total_ref is None:
                    shape = (len(ref),) + tuple(p_ref.shape[1:])
                    total_ref = torch.zeros(shape, device=self.device)
                    total_alt = torch.zeros(shape, device=self.device)
                total_ref[start:start + len(p_ref)] += p_ref
                total_alt[start:start + len(p_ref)] += p_alt
        return total_ref / len(views), total_alt / len(views)

    @torch.inference_mode()
    def _predict_group(self, x: torch.Tensor, tower: Callable[[torch.Tensor], torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 predictions ``[B, bins, T]`` of references and alternatives for one-hot windows
        ``x: [2B, L, 4]`` (B references, then their B alternatives), whose conv-tower output
        ``tower(x)`` (``[2B, T, C]``) computes."""
        model, n = self.model, len(x) // 2
        if not hasattr(model, "trunk"):  # a plain scorer model (tests' toy models)
            both = model.predict_tracks(x, self.head, self.tracks).float()
            return both[:n], both[n:]
        conv = tower(x)
        with precision_mode(self.transformer_precision, self.device):
            with stage("transformer"):
                conv = self._attend(conv.float())
            with stage("final block"):
                embedding = model.embed(conv)
        with stage("heads"):  # float32, whatever the trunk's precision
            both = model.head_tracks(embedding.float(), self.head, self.tracks).float()
        return both[:n], both[n:]

    def _conv_tower(self, x: torch.Tensor) -> torch.Tensor:
        """Conv-tower outputs ``[2B, T, C]`` of ``x: [2B, L, 4]`` (B references, then their alternatives)
        on the per-window path: with reuse, the references' computed once and shared."""
        if self.reuse and hasattr(self.model, "convolve_changed"):
            return self._reuse_reference_conv(x)
        with precision_mode(self.conv_precision, self.device), stage("conv tower"):
            return self._convolve(x)

    def _reuse_reference_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Conv-tower outputs ``[2B, T, C]`` float32 of ``x: [2B, L, 4]`` (B references, then their
        B alternatives), computing the conv tower once for the references.

        An alternative differing in a short stretch (SNV, MNP) recomputes only the bins the change
        can reach, from an input patch; the reference's same bins are recomputed from its own patch
        in the same call. Both patches run at the transformer's precision: the shared bins (the
        context, at the conv tower's precision) are one computation for both alleles, so everything
        that tells the alleles apart is computed at the transformer's precision. Longer changes
        (indels shift everything after them) run the conv tower in full at its own precision.
        """
        model, n = self.model, len(x) // 2
        x = model.crop_input(x)
        with precision_mode(self.conv_precision, self.device), stage("conv tower"):
            context = self._convolve(x[:n]).float()
        differs = (x[:n] != x[n:]).any(dim=-1)  # [B, L]
        length = differs.shape[1]
        first = differs.float().argmax(dim=1).tolist()
        last = (length - 1 - differs.flip(1).float().argmax(dim=1)).tolist()
        changed = [(lo, hi) if any_ else None
                   for any_, lo, hi in zip(differs.any(dim=1).tolist(), first, last, strict=True)]
        short = [c if c is None or c[1] - c[0] < MAX_REUSED_SPAN else None for c in changed]
        with precision_mode(self.transformer_precision, self.device), stage("conv tower patches"):
            conv = model.convolve_changed(torch.cat([context, context]), x, short + short)
        long = [n + i for i, (c, s) in enumerate(zip(changed, short, strict=True)) if c is not None and s is None]
        if long:
            with precision_mode(self.conv_precision, self.device), stage("conv tower"):
                conv[long] = self._convolve(x[long]).float()
        return conv

    def score(self, ref: np.ndarray, alt: np.ndarray) -> dict[str, np.ndarray]:
        """Per-track statistics of variants from their reference and alternative windows.

        Parameters
        ----------
        ref, alt : numpy.ndarray
            ``[B, L]`` uint8 ASCII codes (A, C, G, T; anything else, e.g. N, encodes as zeros), L =
            393,216 (only the central ``input_length`` bp are used) or the model's input length.

        Returns
        -------
        dict of str to numpy.ndarray
            ``{statistic: [B, T] float32}`` for the statistics asked (formulas: ``STATISTICS``,
            docs/spec.md §4), T = the chosen tracks.

        Notes
        -----
        A CUDA out-of-memory error halves the batch size and retries instead of failing.
        """
        pred_ref, pred_alt = self._retrying(lambda: self._predict_pairs(ref, alt))
        with stage("statistics"):
            return {k: v.cpu().numpy() for k, v in statistics(pred_ref, pred_alt, self.stats).items()}

    def _retrying(self, work: Callable[[], object]):
        """``work()``, rerun with half the batch size after each CUDA out-of-memory error."""
        while True:
            try:
                return work()
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                log.warning("GPU out of memory: batch size lowered to %d", self.batch_size)
            # here, not in the handler: the failed attempt's tensors live until the handler ends
            torch.cuda.empty_cache()

    # --- blocks of alleles: windows and tiles built here (docs/spec.md §5.4) -------------------------------

    def score_block(self, genome, alleles: Sequence, *, executor: Executor | None = None,
                    progress: Callable[[int], None] | None = None,
                    genes: Sequence[Sequence] | None = None) -> dict[str, np.ndarray]:
        """Per-track statistics of a block of alleles, windows (docs/spec.md §3.2-3.4) read from ``genome``.

        With ``reuse`` and an :class:`~enformer_vep.model.Enformer`, the conv tower runs once per strand and
        phase over the stretch the block's windows cover, and each window takes its bins from these tiles
        (``tiling``), when the cost model says that computes fewer bins than the per-window path; otherwise
        alleles are scored ``batch_size`` at a time through :meth:`score`. Tiles are a function of the
        block's alleles only, so whoever scores a block gets the same numbers.

        Parameters
        ----------
        genome
            ``fetch(chrom, start, end) -> uint8 codes`` with N outside the contig:
            :class:`~enformer_vep.genome.Genome` or :class:`~enformer_vep.genome.GenomeBlocks`.
        alleles : sequence
            Objects with ``fasta_chrom``, ``pos`` (1-based), ``ref`` and ``alt`` (strings), e.g.
            :class:`~enformer_vep.variants.Allele`; any order, usually one block of one contig.
        executor : concurrent.futures.Executor, optional
            Where windows and tile sequences are built (every ``genome`` read happens there), one group
            ahead of the device; inline when None.
        progress : callable, optional
            Called with the number of alleles scored so far, after each group.
        genes : sequence of sequences of genes.GeneBins, optional
            Per allele, its genes (``genes.allele_gene_bins``): their ``gene_stats`` are computed from the
            same predictions (docs/spec.md §4.5).

        Returns
        -------
        dict of str to numpy.ndarray
            ``{statistic: [n, T] float32}``, rows in the order of ``alleles``; with ``genes``, also
            ``{gene statistic: [P, T] float32}``, one row per (allele, gene) pair in the order of ``genes``.
        """
        if not len(alleles):
            return {}
        results = _BlockResults(len(alleles), genes, self.gene_stats)
        plan = self._plan(alleles)
        if plan is None or not plan.tiled:
            self._score_windows(genome, alleles, executor, progress, results)
        else:
            self._retrying(lambda: self._score_tiled(genome, alleles, executor, progress, results))
        return results.arrays()

    def _summarise(self, pred_ref: torch.Tensor, pred_alt: torch.Tensor, rows: Sequence[int],
                   results: _BlockResults) -> None:
        """A group's statistics (and its alleles' gene statistics) into ``results`` at ``rows``."""
        with stage("statistics"):
            results.add(rows, {k: v.cpu().numpy() for k, v in statistics(pred_ref, pred_alt, self.stats).items()})
            if results.genes is not None:
                pairs = [[(g.ref_bins, g.alt_bins) for g in results.genes[i]] for i in rows]
                values = gene_statistics(pred_ref, pred_alt, pairs, self.gene_stats)
                results.add_genes(rows, [{k: v.cpu().numpy() for k, v in d.items()} for d in values])

    def _group_done(self) -> None:
        """Between groups, once their tensors are freed: bound the host memory glibc keeps (CPU only)."""
        if self._host_memory is not None:
            self._host_memory.check()

    def _plan(self, alleles: Sequence) -> tiling.BlockPlan | None:
        """The block's tile plan (None where tiles cannot serve: no reuse or tiles, a model without patches,
        or a shift that brings the window's N fill into the input); groups of ``batch_size // 2``."""
        model = self.model
        if not (self.reuse and self.tiles and hasattr(model, "recompute_bins")):
            return None
        geometry = tiling.Geometry(self.input_length, model._patch_margin, self.tile_chunk, model.affected_bins)
        if any(abs(s) > geometry.max_shift for s in self.shifts):
            return None
        views = [(s, False) for s in self.shifts] + ([(s, True) for s in self.shifts] if self.rc else [])
        sites = [(a.fasta_chrom, a.pos, len(a.ref), len(a.alt)) for a in alleles]
        return tiling.plan_block(sites, views, geometry, max(1, self.batch_size // 2))

    def _score_windows(self, genome, alleles: Sequence, executor: Executor | None,
                       progress: Callable[[int], None] | None, results: _BlockResults) -> None:
        """The per-window path: ``batch_size`` alleles at a time, as :meth:`score`."""
        size = self.batch_size
        groups = [alleles[k:k + size] for k in range(0, len(alleles), size)]
        for k, (ref, alt) in enumerate(_prefetched(executor, lambda k: _windows(genome, groups[k]), len(groups))):
            pred_ref, pred_alt = self._retrying(lambda ref=ref, alt=alt: self._predict_pairs(ref, alt))
            self._summarise(pred_ref, pred_alt, range(k * size, k * size + len(ref)), results)
            del pred_ref, pred_alt
            self._group_done()
            if progress:
                progress(min(len(alleles), (k + 1) * size))

    def _score_tiled(self, genome, alleles: Sequence, executor: Executor | None,
                     progress: Callable[[int], None] | None, results: _BlockResults) -> None:
        """The tiled path, groups of ``batch_size // 2`` alleles by position (planned again: an out-of-memory
        error halves them); chunks are computed when a group first needs them, dropped after the last."""
        plan = self._plan(alleles)
        geometry = plan.geometry

        def host(g: int):
            group = [alleles[i] for i in plan.groups[g]]
            keys = plan.new_chunks[g]
            codes = np.stack([tiling.chunk_codes(genome, key, geometry) for key in keys]) if keys else None
            return _windows(genome, group), keys, codes

        tiles: dict[tuple, torch.Tensor] = {}
        done = 0
        for g, ((ref, alt), keys, codes) in enumerate(_prefetched(executor, host, len(plan.groups))):
            rows = plan.groups[g]
            if keys:
                self._compute_tiles(tiles, keys, codes, geometry)

            def conv(x: torch.Tensor, view: int, start: int, rows=rows) -> torch.Tensor:  # [2B, T, C]
                units = [plan.units[i, view] for i in rows[start:start + len(x) // 2]]
                return self._tiled_conv(x, units, tiles, geometry)

            pred_ref, pred_alt = self._predict_pairs(ref, alt, conv)
            self._summarise(pred_ref, pred_alt, rows, results)
            for key in plan.last_chunks[g]:
                del tiles[key]
            del pred_ref, pred_alt
            self._group_done()
            done += len(rows)
            if progress:
                progress(done)

    @torch.inference_mode()
    def _compute_tiles(self, tiles: dict, keys: list[tuple], codes: np.ndarray, geometry: tiling.Geometry) -> None:
        """Conv tower of tile chunks ``codes`` (``[n, chunk_bins x 128]``) at the conv stage's precision, as
        many bp per call as a full batch; ``tiles[key]`` keeps each chunk's inner ``[keep, C]`` bins."""
        per_call = max(1, self.batch_size * geometry.bins // geometry.chunk_bins)
        m = geometry.margin
        for k in range(0, len(keys), per_call):
            with stage("encode"):
                x = self._encode(codes[k:k + per_call])
            with precision_mode(self.conv_precision, self.device), stage("conv tower tiles"):
                conv = self._conv_chunks(x)
            for key, chunk in zip(keys[k:k + per_call], conv, strict=True):
                tiles[key] = chunk[m:m + geometry.keep].clone()  # its own storage: the batch is freed

    def _tiled_conv(self, x: torch.Tensor, units: list[tiling.Unit], tiles: dict,
                    geometry: tiling.Geometry) -> torch.Tensor:
        """Conv-tower outputs ``[2B, T, C]`` float32 of ``x: [2B, L, 4]`` (B references, then their
        alternatives; ``units`` their layouts) from the tiles: edge bins recomputed at the conv stage's
        precision (an alternative's copied from its reference where their inputs agree there), the bins the
        allele reaches recomputed for both alleles at the transformer's precision, as on the per-window path."""
        model, n = self.model, len(units)
        with stage("conv tower tiles"):
            conv = torch.empty(2 * n, geometry.bins, model.config.channels, device=self.device)
            for i, unit in enumerate(units):
                for row, layout in ((i, unit.ref), (n + i, unit.alt)):
                    for start, lo, hi in unit.pieces(layout, geometry):
                        prefix = (unit.chrom, layout.strand, start % tiling.BIN_SIZE)
                        for j, c0, c1, k0, k1 in tiling.tile_slices(start, lo, hi, geometry.keep):
                            conv[row, k0:k1] = tiles[prefix + (j,)][c0:c1]
        edges, copied = [], []
        for i, unit in enumerate(units):
            for (first, last), shared in zip(unit.edge_spans(geometry), unit.shared_edges, strict=True):
                edges.append((i, first, last))
                (copied if shared else edges).append((n + i, first, last))
        with precision_mode(self.conv_precision, self.device), stage("conv tower edges"):
            model.recompute_bins(conv, x, edges)
        for row, first, last in copied:
            conv[row, first:last + 1] = conv[row - n, first:last + 1]
        changed = [(i, u.first, u.last) for i, u in enumerate(units)]
        with precision_mode(self.transformer_precision, self.device), stage("conv tower patches"):
            return model.recompute_bins(conv, x, changed + [(n + i, first, last) for i, first, last in changed])


def _windows(genome, alleles: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Reference and alternative windows ``uint8 [n, 393,216]`` of ``alleles`` (docs/spec.md §3.4)."""
    pairs = [allele_windows(genome, a.fasta_chrom, a.pos, a.ref, a.alt) for a in alleles]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _prefetched(executor: Executor | None, work: Callable[[int], object], count: int) -> Iterator:
    """``work(0), ..., work(count - 1)``, each computed on ``executor`` while the caller uses the one
    before (inline without an executor)."""
    if executor is None:
        yield from (work(k) for k in range(count))
        return
    pending = executor.submit(work, 0) if count else None
    for k in range(count):
        result = pending.result()
        if k + 1 < count:
            pending = executor.submit(work, k + 1)
        yield result


class _BlockResults:
    """A block's statistics as its groups finish, in any order: ``[n, T]`` per statistic and, with
    ``genes`` (per allele, its genes), ``[G_i, T]`` per allele and gene statistic."""

    def __init__(self, n: int, genes: Sequence[Sequence] | None, gene_stats: Sequence[str]):
        self.n, self.genes, self.gene_stats = n, genes, list(gene_stats)
        self.stats: dict[str, np.ndarray] = {}
        self.gene_parts: list[dict[str, np.ndarray] | None] = [None] * n

    def add(self, rows: Sequence[int], values: dict[str, np.ndarray]) -> None:
        for name, array in values.items():
            self.stats.setdefault(name, np.empty((self.n, array.shape[1]), np.float32))[list(rows)] = array

    def add_genes(self, rows: Sequence[int], values: Sequence[dict[str, np.ndarray]]) -> None:
        for row, value in zip(rows, values, strict=True):
            self.gene_parts[row] = value

    def arrays(self) -> dict[str, np.ndarray]:
        """The statistics, then the gene statistics with rows = (allele, gene) pairs in allele order."""
        out = dict(self.stats)
        if self.genes is not None:
            tracks = next(iter(self.stats.values())).shape[1]
            for name in self.gene_stats:
                parts = [p[name] for p in self.gene_parts if p and len(p[name])]
                out[name] = np.concatenate(parts) if parts else np.empty((0, tracks), np.float32)
        return out
