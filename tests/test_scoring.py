"""Statistics by hand, and the scorer on a base-counting toy model."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import InMemoryContig, cuda_only
from toy_models import BaseCounter

from enformer_vep.scoring import VariantScorer, parse_statistics, shifted, statistics, to_float16
from enformer_vep.windows import allele_windows

WINDOW = 393_216
VARIANT = 196_607  # window offset of the variant's first base; model-input offset 98,303 = last base of bin 447


def test_statistics_by_hand():
    ref = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [0.0, 1.0]]])  # [1 variant, 3 bins, 2 tracks]
    alt = torch.tensor([[[1.0, 1.0], [7.0, 0.0], [1.0, 1.0]]])
    got = statistics(ref, alt, ["SAD", "SAR", "SADR", "SAX", "D1", "D2"])
    # track 0: ref 1,3,0 (sum 4); alt 1,7,1 (sum 9); track 1: ref 0,2,1 (sum 3); alt 1,0,1 (sum 2)
    expected = {
        "SAD": [5.0, -1.0],
        "SAR": [math.log2(8 / 4) + math.log2(2 / 1), math.log2(2 / 1) + math.log2(1 / 3)],
        "SADR": [math.log2(10 / 5), math.log2(3 / 4)],
        "SAX": [4.0, -2.0],
        "D1": [5.0, 3.0],
        "D2": [math.sqrt(17), math.sqrt(5)],
    }
    # float32 sums, log2 and sqrt of small counts: a few roundings of 2^-24 (~2e-7); measured 3.3e-8
    for name, values in expected.items():
        np.testing.assert_allclose(got[name][0].numpy(), values, rtol=1e-6, err_msg=name)


def test_parse_statistics():
    assert parse_statistics("sad, SAR,SAD") == ["SAD", "SAR"]
    with pytest.raises(ValueError, match="XYZ"):
        parse_statistics("SAD,XYZ")


def test_float16_clipping_is_counted():
    values, clipped = to_float16(np.array([1.5, 70000.0, -1e9, 65504.0], np.float32))
    assert clipped == 2
    assert values.dtype == np.float16 and np.isfinite(values).all()
    np.testing.assert_array_equal(values, [1.5, 65504, -65504, 65504])


def test_shifted_fills_with_n():
    codes = np.frombuffer(b"ACGT", np.uint8)[None]
    assert shifted(codes, 1).tobytes() == b"NACG"
    assert shifted(codes, -2).tobytes() == b"GTNN"


def background(base=b"C"):
    return np.full(WINDOW, base[0], np.uint8)


def score(ref, alt, device="cpu", **kwargs):
    scorer = VariantScorer(BaseCounter(), stats=["SAD", "SAR"], batch_size=3, device=device, **kwargs)
    return scorer.score(ref[None], alt[None])


def test_snv_on_the_toy_model(device):
    ref, alt = background(), background()
    ref[VARIANT], alt[VARIANT] = ord("A"), ord("G")  # bin 447 of a C background: 127 C + A -> 127 C + G
    out = score(ref, alt, device)
    np.testing.assert_array_equal(out["SAD"][0], [-1, 0, 1, 0])  # A C G T
    # float32 log2 of the changed bin's counts (the other bins cancel exactly): ~1 ulp of 1 (1.2e-7); measured 0
    np.testing.assert_allclose(out["SAR"][0], [-1, 0, 1, 0], atol=1e-6)  # log2(1) - log2(2) for A


def test_rc_averages_strands_with_bins_flipped_back(device):
    ref, alt = background(), background()
    ref[VARIANT], alt[VARIANT] = ord("A"), ord("G")
    out = score(ref, alt, device, rc=True)
    # reverse strand: track A counts the forward T's, C counts G, G counts C, T counts A (same bin 447);
    # averaged ref at bin 447: A 0.5, C 63.5, G 63.5, T 0.5; alt: A 0, C 64, G 64, T 0; other bins 64 C / 64 G
    # SAD: sums of counts and halves below 2^24 are exact in float32 (measured 0); SAR: float32 log2 of values up
    # to 65 (an ulp of log2(65) ~ 6 is 4.8e-7), the unchanged bins cancelling exactly; measured 4.6e-8
    np.testing.assert_array_equal(out["SAD"][0], [-0.5, 0.5, 0.5, -0.5])
    sar_a = math.log2(1) - math.log2(1.5)
    sar_c = math.log2(65) - math.log2(64.5)
    np.testing.assert_allclose(out["SAR"][0], [sar_a, sar_c, sar_c, sar_a], atol=2e-6)


def test_selected_tracks_only(device):
    ref, alt = background(), background()
    ref[VARIANT], alt[VARIANT] = ord("A"), ord("T")
    scorer = VariantScorer(BaseCounter(), stats=["SAD"], tracks=np.array([3, 0]), device=device)
    np.testing.assert_array_equal(scorer.score(ref[None], alt[None])["SAD"][0], [1, -1])


def test_score_block_scores_windows_like_score():
    """A model without a trunk takes the per-window path: the windows of allele_windows, batch_size alleles
    per ``score`` call, rows in the order given, progress after each call."""
    rng = np.random.default_rng(1)
    genome = InMemoryContig(np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, 300_000)])
    alleles = [SimpleNamespace(fasta_chrom="c", pos=pos, ref=genome.fetch("c", pos - 1, pos + size).tobytes().decode(),
                               alt=alt) for pos, size, alt in [(150_000, 0, "N"), (20, 3, "A"), (299_990, 0, "ACGT"),
                                                               (1_000, 0, "T")]]
    scorer = VariantScorer(BaseCounter(), stats=["SAD", "D1"], batch_size=3)
    done = []
    got = scorer.score_block(genome, alleles, progress=done.append)
    pairs = [allele_windows(genome, "c", a.pos, a.ref, a.alt) for a in alleles]
    want = scorer.score(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    assert done == [3, 4]
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_batches_of_any_size_give_the_same_scores():
    rng = np.random.default_rng(0)
    ref = np.frombuffer(b"ACGTN", np.uint8)[rng.integers(0, 5, (5, WINDOW))]
    alt = ref.copy()
    alt[:, VARIANT - 300:VARIANT + 300] = ord("A")
    one = VariantScorer(BaseCounter(), batch_size=1, shifts=(-1, 0, 1)).score(ref, alt)
    many = VariantScorer(BaseCounter(), batch_size=7, shifts=(-1, 0, 1)).score(ref, alt)
    for name in one:
        np.testing.assert_array_equal(one[name], many[name])


def test_shifts_average_over_moved_windows(device):
    ref, alt = background(), background()
    ref[VARIANT], alt[VARIANT] = ord("A"), ord("G")
    out = score(ref, alt, device, shifts=(0, 1))
    # shift 0 puts the variant last in bin 447, shift 1 first in bin 448: averaged, each bin holds
    # half a variant base (ref: A 0.5 + C 127.5; alt: G 0.5 + C 127.5); SAD exact in float32 (halves of counts),
    # SAR a few ulp of float32 log2 values up to log2(129) ~ 7 (ulp 4.8e-7); measured 0 and 9.2e-8
    np.testing.assert_array_equal(out["SAD"][0], [-1, 0, 1, 0])
    sar = 2 * (math.log2(1.5) - math.log2(1))
    np.testing.assert_allclose(out["SAR"][0], [-sar, 0, sar, 0], atol=2e-6)


# the scoring tests' model (24 channels, weights doubled): their correlation bounds were measured on it
FILTERS = [16, 16, 16, 16, 24, 24]


def test_reference_trunk_reuse_equals_two_full_passes(device, tiny_enformer):
    """SNVs (reused conv tower) and indels (full passes) near N runs, with shifts and both strands,
    against two full float32 passes on the CPU; on a device with reuse and without."""
    model = tiny_enformer(seed=3, conv_filters=FILTERS, heads={"human": 6})
    rng = np.random.default_rng(4)
    ref = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, (5, WINDOW))].copy()
    ref[1, VARIANT - 2000:VARIANT - 10] = ord("N")
    alt = ref.copy()
    alt[0, VARIANT] = ord("A") if ref[0, VARIANT] != ord("A") else ord("C")  # SNV
    alt[1, VARIANT:VARIANT + 3] = np.frombuffer(b"NGT", np.uint8)             # MNP beside an N run
    alt[2, VARIANT + 1:] = ref[2, VARIANT:-1]                                 # insertion: the rest shifts
    alt[3, VARIANT:] = np.r_[ref[3, VARIANT + 2:], [ord("N")] * 2]             # deletion
    # row 4: identical windows
    options = dict(stats=["SAD", "SAR", "SAX", "D2"], shifts=(0, 1), rc=True, batch_size=4, precision="fp32")
    full = VariantScorer(model, reuse=False, **options).score(ref, alt)
    assert np.abs(full["SAD"][:4]).min() > 0 and not full["SAD"][4].any()
    # float32, patches against full passes: bit-identical on the CPU (measured 0), 1e-6 of the scale allows a few
    # roundings of 2^-24 of the predictions summed into it; a device's float32 kernels sum in other orders: 1e-4
    # of the scale there (as on an H200)
    limit = 1e-6 if device.type == "cpu" else 1e-4
    model.to(device)
    for reuse in (True,) if device.type == "cpu" else (True, False):
        got = VariantScorer(model, reuse=reuse, device=device, **options).score(ref, alt)
        for name in options["stats"]:
            scale = np.abs(full[name]).max()
            np.testing.assert_allclose(got[name], full[name], rtol=0, atol=limit * scale, err_msg=(name, reuse))


def variant_windows(n: int, seed: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Random reference windows and alternatives at VARIANT: by row i % 4, an SNV, an SNV, a 3-bp MNP
    and a 3-bp deletion (the right flank moves left, N enters at the end)."""
    rng = np.random.default_rng(seed)
    ref = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, (n, WINDOW))].copy()
    alt = ref.copy()
    for i in range(n):
        if i % 4 == 3:
            alt[i, VARIANT + 1:-3] = ref[i, VARIANT + 4:]
            alt[i, -3:] = ord("N")
        elif i % 4 == 2:
            alt[i, VARIANT:VARIANT + 3] = ord("G")
        else:
            alt[i, VARIANT] = ord("A") if ref[i, VARIANT] != ord("A") else ord("C")
    return ref, alt


def correlations(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(x, y)[0, 1]) for x, y in zip(a, b, strict=True)]


def test_reduced_precisions_keep_snv_differences_close_to_float32(device, tiny_enformer):
    """bf16/fp32 with reuse: the shared context is bf16, but the bins an SNV/MNP changes are recomputed
    in float32 for both alleles and the transformer runs in float32, so the difference is computed in float32
    from a context rounded to bf16 (2^-8): r > 0.999 (1 - r measured 3e-5 to 1.9e-4 here). TF32's 10-bit
    mantissas (2^-11) are amplified by this tiny random network (r 0.96-0.997 on an H200; the released size's
    agreement is bench_score's), all-bf16 more (8 bits: a SAD is a difference of two nearly equal sums, each
    rounded to 2^-8 of itself; test_bf16_predictions_stay_within_a_few_bf16_roundings bounds the predictions
    themselves), and most for a deletion, whose conv tower runs in full in bf16: looser bounds. The CPU keeps
    to reused SNV/MNP windows (a deletion's full passes take ~20 s there); TF32 exists only on CUDA."""
    model = tiny_enformer(seed=3, conv_filters=FILTERS, heads={"human": 64}).to(device)
    ref, alt = variant_windows(3 if device.type == "cpu" else 8)
    precisions = ["fp32", "bf16", "bf16/fp32"] + (["tf32", "bf16/tf32"] if device.type == "cuda" else [])
    run = {p: VariantScorer(model, stats=["SAD"], precision=p, device=device, batch_size=8).score(ref, alt)["SAD"]
           for p in precisions}
    assert all(values.dtype == np.float32 for values in run.values())
    snv = [i for i in range(len(ref)) if i % 4 != 3]
    for precision, limit in (("bf16/fp32", 0.999), ("bf16/tf32", 0.9), ("tf32", 0.9)):
        if precision in run:
            r = correlations(run["fp32"][snv], run[precision][snv])
            assert min(r) > limit, (precision, r)
    bf16 = correlations(run["fp32"], run["bf16"])
    assert not np.array_equal(run["bf16"], run["fp32"])
    if device.type == "cpu":
        assert min(bf16) > 0.5, bf16  # r 0.65-0.87 here (0.77-0.84 measured on an AVX-512 CPU)
    else:
        assert np.median(bf16) > 0.5, bf16  # r 0.45-0.995 on an H200, deletions included
    with pytest.raises(ValueError, match="precision"):
        VariantScorer(model, precision="fp8")


def test_bf16_predictions_stay_within_a_few_bf16_roundings(tiny_enformer):
    """What bf16 costs, stated: bfloat16 keeps 8 significant bits (a rounding of 2^-8 = 0.39% relative), and
    the predictions of the scorer's bf16 path (both trunk stages autocast) stay within a few roundings of
    float32 (measured here: median 0.59% relative, worst 1.8% of the largest prediction). A SAD is a
    difference of two such predictions, hence the loose SAD correlations above."""
    model = tiny_enformer(seed=3, conv_filters=FILTERS, heads={"human": 64})
    ref, alt = variant_windows(2)
    fp32 = VariantScorer(model, precision="fp32", batch_size=4)._predict_pairs(ref, alt)[0].numpy()
    bf16 = VariantScorer(model, precision="bf16", batch_size=4)._predict_pairs(ref, alt)[0].numpy()
    error = np.abs(bf16 - fp32)
    assert np.median(error / np.abs(fp32)) <= 4 * 2**-8
    assert error.max() <= 8 * 2**-8 * np.abs(fp32).max()
    assert error.max() > 0  # bf16 did run


def test_windows_travel_to_the_device_and_are_one_hot_encoded_there(device, tiny_enformer):
    """uint8 windows travel (pinned, asynchronously on CUDA) and are one-hot encoded on the device;
    many batches in a row (asynchronous copies must not mix them up), each against a host table."""
    scorer = VariantScorer(tiny_enformer(), device=device)
    table = np.zeros((256, 4), np.float32)
    table[np.frombuffer(b"ACGT", np.uint8), np.arange(4)] = 1  # N and anything else: all zeros
    rng = np.random.default_rng(0)
    batches = [np.frombuffer(b"ACGTN", np.uint8)[rng.integers(0, 5, (4, 4096))] for _ in range(20)]
    encoded = [scorer._encode(codes) for codes in batches]
    for codes, x in zip(batches, encoded, strict=True):
        assert x.device.type == device.type
        np.testing.assert_array_equal(x.cpu().numpy(), table[codes])


class OutOfMemoryAboveTwo(BaseCounter):
    """The toy model on a device that holds two sequences at most."""

    def predict_tracks(self, x, head, tracks=None):
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().predict_tracks(x, head, tracks)


def test_out_of_memory_halves_the_batch_and_retries(device):
    ref, alt = background()[None].repeat(3, 0), background()[None].repeat(3, 0)
    alt[:, VARIANT] = ord("T")
    scorer = VariantScorer(OutOfMemoryAboveTwo(), stats=["SAD"], batch_size=8, device=device)
    out = scorer.score(ref, alt)["SAD"]
    assert scorer.batch_size == 2
    np.testing.assert_array_equal(out, [[0, -1, 0, 1]] * 3)


def test_a_real_out_of_memory_error_halves_the_batch(cuda_device, tiny_enformer):
    """A real allocator failure (the process is allowed little more than it holds) halves the batch
    until it fits, with the scores of a CPU run."""
    device = cuda_device
    cuda_only(device, "a real out-of-memory error of the CUDA allocator (dry run on the CPU)")
    model = tiny_enformer(seed=3, conv_filters=FILTERS, heads={"human": 64})
    ref, alt = variant_windows(8)
    expected = VariantScorer(model, stats=["SAD"], precision="fp32", reuse=False).score(ref, alt)["SAD"]
    model = model.to(device)
    torch.cuda.empty_cache()
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    allowed = torch.cuda.memory_allocated(index) + 2**29  # batch 32 needs over a GB, 4 fits
    torch.cuda.set_per_process_memory_fraction(allowed / total, index)
    try:
        scorer = VariantScorer(model, stats=["SAD"], precision="fp32", reuse=False, device=device, batch_size=None)
        assert scorer.batch_size == 32
        got = scorer.score(ref, alt)["SAD"]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()
    assert 1 <= scorer.batch_size < 32
    # float32 on the CPU against float32 on the device, whose kernels sum in other orders: 1e-4 of the scale, as
    # in test_reference_trunk_reuse_equals_two_full_passes on a device (measured on an H200)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
