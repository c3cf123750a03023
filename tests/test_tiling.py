"""Conv-tower tiles shared across windows (docs/spec.md §5.4) against two full passes per allele.

Most tests use short model inputs (8,192 bp of the 393,216-bp windows: 64 bins, 32 output bins) and small tile
chunks, so that one test crosses many chunk boundaries and every phase; one runs the whole job on real windows.
"""
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import InMemoryContig
from torch.utils.flop_counter import FlopCounterMode

from enformer_vep import tiling
from enformer_vep.cli import cli
from enformer_vep.model import EnformerConfig
from enformer_vep.scoring import VariantScorer
from enformer_vep.weights import save_native

LENGTH = 8192  # model input of the short-window tests
CONTIG = 60_000
N_RUN = (20_000, 23_000)
FILTERS = [16, 16, 16, 16, 24, 24]
STATS = ["SAD", "SAR", "SAX", "D2"]


@pytest.fixture(scope="module")
def genome():
    rng = np.random.default_rng(7)
    codes = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, CONTIG)].copy()
    codes[N_RUN[0]:N_RUN[1]] = ord("N")
    return InMemoryContig(codes)


def allele(genome, pos, kind, size=1, rng=None):
    """An allele at 1-based ``pos`` with REF from the genome: ``snv``, ``mnp`` (``size`` bases), ``del``
    (``size`` bases after the first), ``ins`` (``size`` random bases after REF's one)."""
    rng = rng or np.random.default_rng(pos)
    ref_len = {"snv": 1, "mnp": size, "del": size + 1, "ins": 1}[kind]
    ref = genome.fetch("c", pos - 1, pos - 1 + ref_len).tobytes().decode()
    other = {b: "ACGT"[("ACGT".index(b) + 1) % 4] if b in "ACGT" else "A" for b in "ACGTN"}
    if kind in ("snv", "mnp"):
        alt = "".join(other[b] for b in ref)
    elif kind == "del":
        alt = ref[0]
    else:
        alt = ref + "".join(rng.choice(list("ACGT"), size))
    return SimpleNamespace(fasta_chrom="c", pos=pos, ref=ref, alt=alt)


def with_alt(a, alt):
    return SimpleNamespace(**vars(a) | {"alt": alt})


SIZES = [1, 2, 5, 127, 128, 129, 300, 1000]


def dense_alleles(genome):
    """Every phase (positions 129 bp apart), SNVs, MNPs, deletions and insertions of 1-1,000 bp; the contig's
    first and last bases, alleles in and beside an N run, and a multi-allelic site."""
    kinds = ["snv", "mnp", "del", "ins"]
    out = [allele(genome, 30_000 + 129 * i, kinds[i % 4], SIZES[(i // 4) % len(SIZES)]) for i in range(128)]
    out += [allele(genome, pos, kind, size) for pos, kind, size in [
        (1, "snv", 1), (2, "del", 300), (150, "ins", 1000), (4_096, "mnp", 3),  # windows over the contig start
        (CONTIG, "snv", 1), (CONTIG - 1, "ins", 5), (CONTIG - 600, "del", 1000), (CONTIG - 4_000, "del", 2),
        (N_RUN[0] + 1_000, "snv", 1), (N_RUN[0] - 1, "del", 128), (N_RUN[1], "ins", 129), (N_RUN[1] - 3, "del", 5),
    ]]
    site = 41_111
    out += [allele(genome, site, "snv"), allele(genome, site, "del", 7), allele(genome, site, "ins", 3),
            with_alt(allele(genome, site, "snv"), "T" if genome.codes[site - 1] != ord("T") else "G")]
    return out


@pytest.fixture
def always_tiled(monkeypatch):
    """Tiles in every block, whatever the cost model says (short windows share few bins)."""
    monkeypatch.setattr(tiling.BlockPlan, "tiled", property(lambda self: True))


def scorers(model, **options):
    options = dict(stats=STATS, input_length=LENGTH, batch_size=8, precision="fp32") | options
    return VariantScorer(model, reuse=False, **options), VariantScorer(model, reuse=True, **options)


def relative_errors(got: dict, want: dict) -> dict:
    return {name: float(np.abs(got[name] - want[name]).max() / np.abs(want[name]).max()) for name in want}


@pytest.mark.parametrize("pooling, chunk", [("attention", 12), ("max", tiling.CHUNK_BINS)])
def test_tiles_equal_two_full_passes(genome, tiny_enformer, always_tiled, pooling, chunk):
    """All 128 phases; indels of 1-1,000 bp across chunk boundaries (chunks of 12 bins keep 6), windows over
    the contig's ends and N runs, a multi-allelic site: within float32 rounding of two full passes."""
    model = tiny_enformer(seed=3, conv_filters=FILTERS, target_length=32, pooling=pooling, random_statistics=True)
    alleles = dense_alleles(genome)
    full, tiled = scorers(model, tile_chunk=chunk)
    plan = tiled._plan(alleles)
    phases = {u.ref.left % 128 for u in plan.units.values()}
    assert len(phases) == 128 and len(plan.new_chunks[0]) > 0
    want = full.score_block(genome, alleles)
    assert np.abs(want["SAD"]).min() > 0
    errors = relative_errors(tiled.score_block(genome, alleles), want)
    # float32 in two orders (tiles and edge patches against full passes): measured up to 2.0e-6 of the largest score
    assert max(errors.values()) <= 1e-5, errors


def test_reverse_complement_and_shifts_equal_full_passes(genome, tiny_enformer, always_tiled):
    """``--rc`` (tiles per strand) and ``--shifts`` (each shift another phase): the same agreement."""
    model = tiny_enformer(seed=4, conv_filters=FILTERS, target_length=32, random_statistics=True)
    alleles = dense_alleles(genome)[::3]
    full, tiled = scorers(model, rc=True, shifts=(-1, 0, 100), tile_chunk=12)
    assert {u.ref.strand for u in tiled._plan(alleles).units.values()} == {0, 1}
    errors = relative_errors(tiled.score_block(genome, alleles), full.score_block(genome, alleles))
    assert max(errors.values()) <= 1e-5, errors  # float32 in two orders: measured 2.1e-6 of the largest score


def _no_edges(self, geometry):
    return (0, -1), (geometry.bins, geometry.bins - 1)  # empty: nothing recomputed


def _edges_from_tiles(self, layout, geometry):
    """The window's ends taken from the tiles as if padding did not differ from sequence."""
    out = [(layout.left, 0, self.first), (layout.right, self.last + 1, geometry.bins)]
    return [piece for piece in out if piece[1] < piece[2]]


def _unit_on_the_reference_phase(*args):
    """An indel's right part taken from the reference's phase, not p - d."""
    unit = view_unit(*args)
    return dataclasses.replace(unit, alt=dataclasses.replace(unit.alt, left=unit.ref.left, right=unit.ref.right))


view_unit = tiling.view_unit


@pytest.mark.parametrize("mutation", ["edges", "phase"])
def test_the_comparison_catches_a_wrong_tiling(genome, tiny_enformer, always_tiled, monkeypatch, mutation):
    """The exactness tests can fail: ends taken from tiles (no edge recomputation), or an indel's right part
    from the wrong phase's tiles, move the scores far beyond their tolerance."""
    model = tiny_enformer(seed=3, conv_filters=FILTERS, target_length=32, random_statistics=True)
    alleles = [a for a in dense_alleles(genome)[:64] if len(a.ref) != len(a.alt)][:12]
    full, tiled = scorers(model, tile_chunk=12)
    want = full.score_block(genome, alleles)
    if mutation == "edges":
        monkeypatch.setattr(tiling.Unit, "edge_spans", _no_edges)
        monkeypatch.setattr(tiling.Unit, "pieces", _edges_from_tiles)
    else:
        monkeypatch.setattr(tiling, "view_unit", _unit_on_the_reference_phase)
    errors = relative_errors(tiled.score_block(genome, alleles), want)
    assert min(errors.values()) > 1e-3, errors


def test_cost_model_tiles_dense_blocks_only():
    """The released architecture: a dense block (1 per 260 bp, 10% indels) is tiled at <= 2.3 TFLOP per
    variant; a sparse one (1 per 50 kb) keeps the per-window path, whose cost it reports."""
    dense, sparse = synthetic_variants(1024, 260), synthetic_variants(200, 50_000)
    config = EnformerConfig()
    flops = tiling.plan_flops(config, dense)
    assert flops["tiled_blocks"] == flops["blocks"] == 1
    assert flops["executed"] == flops["tiled"] < 2.3e12 < 3.8e12 < flops["reuse"] < flops["full"]
    flops = tiling.plan_flops(config, sparse)
    assert flops["tiled_blocks"] == 0 and flops["executed"] == flops["reuse"] < flops["tiled"]


def synthetic_variants(n, spacing, seed=0):
    """``n`` alleles (chrom, pos, ref, alt) about ``spacing`` bp apart, 10% indels of 1-20 bp."""
    rng = np.random.default_rng(seed)
    positions = np.cumsum(rng.integers(1, 2 * spacing, n)) + 200_000
    out = []
    for pos in positions.tolist():
        size = int(rng.integers(1, 21))
        kind = rng.choice(["snv"] * 18 + ["ins", "del"])
        ref, alt = {"snv": ("A", "G"), "ins": ("A", "A" + "C" * size), "del": ("A" + "C" * size, "A")}[kind]
        out.append(("c", pos, ref, alt))
    return out


@pytest.mark.parametrize("path", ["tiled", "reuse", "full"])
def test_plan_flops_equals_the_flops_executed(genome, tiny_enformer, monkeypatch, path):
    """``plan_flops`` counts what ``score_block`` runs (``FlopCounterMode`` on the executed path), for tiles,
    the per-window reuse path (SNVs and indels; a change as long as ALT) and two full passes."""
    model = tiny_enformer(seed=3, conv_filters=FILTERS, target_length=32, heads={"human": 5, "mouse": 3})
    if path == "tiled":
        monkeypatch.setattr(tiling.BlockPlan, "tiled", property(lambda self: True))
    alleles = [a for a in dense_alleles(genome)[:40] if a.ref[0] != "N"][::2]
    variants = [("c", a.pos, a.ref, a.alt) for a in alleles]
    options = dict(shifts=(0, 2), rc=True, batch_size=6, input_length=LENGTH, tile_chunk=12)
    scorer = VariantScorer(model, stats=["SAD"], tracks=np.array([1, 4]), reuse=path != "full", **options)
    with FlopCounterMode(display=False) as counter:
        scorer.score_block(genome, alleles)
    planned = tiling.plan_flops(model, variants, tracks=2, chunk_bins=options.pop("tile_chunk"), **options)
    if path != "full":
        assert planned["tiled_blocks"] == (path == "tiled")
    assert planned["executed" if path != "full" else "full"] * len(alleles) == counter.get_total_flops()


def test_scores_do_not_depend_on_the_thread_or_the_call(genome, tiny_enformer, always_tiled):
    """A block gives the same bytes inline, with its windows and tiles built on another thread, and again."""
    model = tiny_enformer(seed=3, conv_filters=FILTERS, target_length=32)
    alleles = dense_alleles(genome)[::5]
    scorer = scorers(model, tile_chunk=12)[1]
    first = scorer.score_block(genome, alleles)
    with ThreadPoolExecutor(1) as thread:
        rows = []
        second = scorer.score_block(genome, alleles, executor=thread, progress=rows.append)
    assert rows[-1] == len(alleles) and rows == sorted(rows)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_out_of_memory_halves_the_tiled_groups(genome, tiny_enformer, always_tiled, monkeypatch):
    model = tiny_enformer(seed=3, conv_filters=FILTERS, target_length=32)
    alleles = dense_alleles(genome)[:16]
    full, tiled = scorers(model, tile_chunk=12)
    original = VariantScorer._tiled_conv

    def small_device(self, x, units, tiles, geometry):
        if len(units) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, x, units, tiles, geometry)

    monkeypatch.setattr(VariantScorer, "_tiled_conv", small_device)
    errors = relative_errors(tiled.score_block(genome, alleles), full.score_block(genome, alleles))
    assert tiled.batch_size == 2 and max(errors.values()) <= 1e-5, errors  # float32 in two orders: measured 1.5e-6


def test_reduced_precision_keeps_the_difference_at_the_transformers(genome, tiny_enformer, always_tiled):
    """bf16/fp32: tiles and edges are bf16 context shared by both alleles, the bins a SNV/MNP reaches are
    recomputed in float32 for both, so the SAD is computed in float32 from a context rounded to bf16 (2^-8):
    r > 0.999 per variant, as on the per-window path (1 - r measured 5e-5 to 2.5e-4)."""
    model = tiny_enformer(seed=3, conv_filters=FILTERS, target_length=32, heads={"human": 64})
    alleles = [a for a in dense_alleles(genome)[:64] if len(a.ref) == len(a.alt)][:12]
    full = scorers(model)[0].score_block(genome, alleles)["SAD"]
    tiled = scorers(model, precision="bf16/fp32", tile_chunk=12)[1].score_block(genome, alleles)["SAD"]
    assert not np.array_equal(full, tiled)
    r = [np.corrcoef(a, b)[0, 1] for a, b in zip(full, tiled, strict=True)]
    assert min(r) > 0.999, r


# --- the whole job on real windows --------------------------------------------------------------------------

REAL_CONTIG = 250_000


def test_the_command_on_real_windows_equals_two_full_passes(tmp_path, tiny_enformer, monkeypatch):
    """``enformer-score`` on 393,216-bp windows over a 250-kb contig (windows over both ends, an N run):
    variants on three phases, so that the cost model itself chooses tiles. ``--reuse`` (tiles by default)
    and ``--reuse --no-tiles`` against ``--no-reuse`` two full passes; only the first takes tiles, and
    ``run.json`` records the choice."""
    rng = np.random.default_rng(1)
    codes = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, REAL_CONTIG)].copy()
    codes[120_000:126_000] = ord("N")
    fasta = tmp_path / "g.fa"
    text = codes.tobytes().decode()
    fasta.write_text(">c\n" + "\n".join(text[i:i + 60] for i in range(0, len(text), 60)) + "\n")
    genome = InMemoryContig(codes)
    alleles = []
    for k, phase in enumerate((5, 70, 127)):
        for i, pos in enumerate(range(2_000 + phase, REAL_CONTIG, 128 * 240)):
            kind, size = [("snv", 1), ("del", 1), ("mnp", 2), ("ins", 300), ("snv", 1), ("del", 1000)][(i + k) % 6]
            alleles.append(allele(genome, pos, kind, size))
    alleles.append(allele(genome, 32_777, "del", 4))  # a multi-allelic site's second ALT
    alleles.append(with_alt(alleles[-1], "ACGT"[("ACGT".index(chr(codes[32_776])) + 1) % 4]))
    alleles.sort(key=lambda a: a.pos)
    vcf = tmp_path / "v.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=c,length=250000>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   + "".join(f"c\t{a.pos}\tv{i}\t{a.ref}\t{a.alt}\t.\tPASS\t.\n" for i, a in enumerate(alleles)))
    targets = tmp_path / "targets.txt"
    targets.write_text("index\tgenome\tidentifier\tfile\tclip\tscale\tsum_stat\tdescription\n"
                       + "".join(f"{i}\t0\tt{i}\t.\t0\t1\tsum\tTRACK:{i}\n" for i in range(8)))
    model = tiny_enformer(seed=5, channels=12, conv_filters=[6, 6, 6, 6, 8, 12], heads={"human": 8},
                          random_statistics=True)
    weights = save_native(model.state_dict(),
                          tmp_path / "m.safetensors")
    tiled_blocks = []
    score_tiled = VariantScorer._score_tiled
    monkeypatch.setattr(VariantScorer, "_score_tiled", lambda self, *a: tiled_blocks.append(1) or score_tiled(self, *a))
    results, settings = {}, {}
    for mode, flags in {"full": ["--no-reuse"], "tiles": ["--reuse"], "windows": ["--reuse", "--no-tiles"]}.items():
        out = tmp_path / mode
        result = CliRunner().invoke(cli, [str(vcf), "--fasta", str(fasta), "-o", str(out), "--model", str(weights),
                                          "--targets", str(targets), "--stats", "SAD,SAR,D2", "--batch-size", "8",
                                          "--device", "cpu", "--no-progress", *flags], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert tiled_blocks == ([1] if mode != "full" else []), mode
        with h5py.File(out / "v.c.h5", "r") as f:
            assert len(f["SAD"]) == len(alleles)
            results[mode] = {name: f[name][:].astype(np.float64) for name in ("SAD", "SAR", "D2")}
        settings[mode] = json.loads((out / "run.json").read_text())["options"]
    assert (settings["tiles"]["reuse"], settings["tiles"]["tiles"]) == (True, True)
    assert (settings["windows"]["reuse"], settings["windows"]["tiles"]) == (True, False)
    # both runs are stored in float16: a float32 difference (two orders, ~2e-6 of the largest score in the tests
    # above) can flip a value's last bit, one float16 ulp (<= 2^-10 of the value); measured 1.2e-6 of the largest
    for mode in ("tiles", "windows"):
        for name, want in results["full"].items():
            np.testing.assert_allclose(results[mode][name], want, rtol=2**-10, atol=1e-5 * np.abs(want).max(),
                                       err_msg=(mode, name))
