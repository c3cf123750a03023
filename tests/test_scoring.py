"""Statistics by hand, and the scorer on a base-counting toy model."""
import math

import numpy as np
import pytest
import torch
from toy_models import BaseCounter

from enformer_vep.scoring import VariantScorer, parse_statistics, shifted, statistics, to_float16

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


def score(ref, alt, **kwargs):
    scorer = VariantScorer(BaseCounter(), stats=["SAD", "SAR"], batch_size=3, **kwargs)
    return scorer.score(ref[None], alt[None])


def test_snv_on_the_toy_model():
    ref, alt = background(), background()
    ref[VARIANT], alt[VARIANT] = ord("A"), ord("G")  # bin 447 of a C background: 127 C + A -> 127 C + G
    out = score(ref, alt)
    np.testing.assert_array_equal(out["SAD"][0], [-1, 0, 1, 0])  # A C G T
    np.testing.assert_allclose(out["SAR"][0], [-1, 0, 1, 0], atol=1e-6)  # log2(1) - log2(2) for A


def test_rc_averages_strands_with_bins_flipped_back():
    ref, alt = background(), background()
    ref[VARIANT], alt[VARIANT] = ord("A"), ord("G")
    out = score(ref, alt, rc=True)
    # reverse strand: track A counts the forward T's, C counts G, G counts C, T counts A (same bin 447);
    # averaged ref at bin 447: A 0.5, C 63.5, G 63.5, T 0.5; alt: A 0, C 64, G 64, T 0; other bins 64 C / 64 G
    np.testing.assert_allclose(out["SAD"][0], [-0.5, 0.5, 0.5, -0.5], atol=1e-5)
    sar_a = math.log2(1) - math.log2(1.5)
    sar_c = math.log2(65) - math.log2(64.5)
    np.testing.assert_allclose(out["SAR"][0], [sar_a, sar_c, sar_c, sar_a], atol=1e-5)


def test_selected_tracks_only():
    ref, alt = background(), background()
    ref[VARIANT], alt[VARIANT] = ord("A"), ord("T")
    scorer = VariantScorer(BaseCounter(), stats=["SAD"], tracks=np.array([3, 0]))
    np.testing.assert_array_equal(scorer.score(ref[None], alt[None])["SAD"][0], [1, -1])


def test_batches_of_any_size_give_the_same_scores():
    rng = np.random.default_rng(0)
    ref = np.frombuffer(b"ACGTN", np.uint8)[rng.integers(0, 5, (5, WINDOW))]
    alt = ref.copy()
    alt[:, VARIANT - 300:VARIANT + 300] = ord("A")
    one = VariantScorer(BaseCounter(), batch_size=1, shifts=(-1, 0, 1)).score(ref, alt)
    many = VariantScorer(BaseCounter(), batch_size=7, shifts=(-1, 0, 1)).score(ref, alt)
    for name in one:
        np.testing.assert_array_equal(one[name], many[name])


def test_shifts_average_over_moved_windows():
    ref, alt = background(), background()
    ref[VARIANT], alt[VARIANT] = ord("A"), ord("G")
    out = score(ref, alt, shifts=(0, 1))
    # shift 0 puts the variant last in bin 447, shift 1 first in bin 448: averaged, each bin holds
    # half a variant base (ref: A 0.5 + C 127.5; alt: G 0.5 + C 127.5)
    np.testing.assert_allclose(out["SAD"][0], [-1, 0, 1, 0], atol=1e-5)
    sar = 2 * (math.log2(1.5) - math.log2(1))
    np.testing.assert_allclose(out["SAR"][0], [-sar, 0, sar, 0], atol=1e-5)


def test_reference_trunk_reuse_equals_two_full_passes():
    """SNVs (reused conv tower) and indels (full passes) near N runs, with shifts and both strands."""
    from enformer_vep.model import Enformer, EnformerConfig

    torch.manual_seed(3)
    model = Enformer(EnformerConfig(channels=24, num_heads=2, num_transformer_layers=1,
                                    conv_filters=[16, 16, 16, 16, 24, 24], heads={"human": 6})).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("weight") and tensor.ndim > 1:
                tensor.mul_(2.0)
    rng = np.random.default_rng(4)
    ref = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, (5, WINDOW))].copy()
    ref[1, VARIANT - 2000:VARIANT - 10] = ord("N")
    alt = ref.copy()
    alt[0, VARIANT] = ord("A") if ref[0, VARIANT] != ord("A") else ord("C")  # SNV
    alt[1, VARIANT:VARIANT + 3] = np.frombuffer(b"NGT", np.uint8)             # MNP beside an N run
    alt[2, VARIANT + 1:] = ref[2, VARIANT:-1]                                 # insertion: the rest shifts
    alt[3, VARIANT:] = np.r_[ref[3, VARIANT + 2:], [ord("N")] * 2]             # deletion
    # row 4: identical windows
    options = dict(stats=["SAD", "SAR", "SAX", "D2"], shifts=(0, 1), rc=True, batch_size=4)
    reused = VariantScorer(model, reuse=True, **options).score(ref, alt)
    full = VariantScorer(model, reuse=False, **options).score(ref, alt)
    assert np.abs(full["SAD"][:4]).min() > 0 and not full["SAD"][4].any()
    for name in options["stats"]:
        scale = np.abs(full[name]).max()
        np.testing.assert_allclose(reused[name], full[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def tiny_enformer(seed=3, **heads):
    from enformer_vep.model import Enformer, EnformerConfig

    torch.manual_seed(seed)
    model = Enformer(EnformerConfig(channels=24, num_heads=2, num_transformer_layers=1,
                                    conv_filters=[16, 16, 16, 16, 24, 24], heads=heads or {"human": 6})).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("weight") and tensor.ndim > 1:
                tensor.mul_(2.0)
    return model


def test_bf16_context_with_float32_differences_agrees_with_float32():
    model = tiny_enformer(human=64)
    rng = np.random.default_rng(6)
    ref = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, (3, WINDOW))].copy()
    alt = ref.copy()
    alt[:, VARIANT - 5:VARIANT + 5] = ord("G")
    fp32 = VariantScorer(model, stats=["SAD"], precision="fp32").score(ref, alt)["SAD"]
    bf16 = VariantScorer(model, stats=["SAD"], precision="bf16").score(ref, alt)["SAD"]
    mixed = VariantScorer(model, stats=["SAD"], precision="bf16/fp32").score(ref, alt)["SAD"]
    assert bf16.dtype == mixed.dtype == np.float32 and not np.array_equal(bf16, fp32)
    # all-bf16: both alleles' rounding differs everywhere, and this tiny random network amplifies it
    # (r 0.6-0.9 here); the real model's agreement is measured by benchmarks/bench_score.py
    for a, b in zip(fp32, bf16):
        assert np.corrcoef(a, b)[0, 1] > 0.5
    # bf16/fp32 with reuse: the shared context is bf16, but the bins the MNP changes are recomputed in
    # float32 for both alleles and the transformer runs in float32, so the difference is float32's
    for a, b in zip(fp32, mixed):
        assert np.corrcoef(a, b)[0, 1] > 0.999
    with pytest.raises(ValueError, match="precision"):
        VariantScorer(model, precision="fp8")


class OutOfMemoryAboveTwo(BaseCounter):
    """The toy model on a device that holds two sequences at most."""

    def predict_tracks(self, x, head, tracks=None):
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().predict_tracks(x, head, tracks)


def test_out_of_memory_halves_the_batch_and_retries():
    ref, alt = background()[None].repeat(3, 0), background()[None].repeat(3, 0)
    alt[:, VARIANT] = ord("T")
    scorer = VariantScorer(OutOfMemoryAboveTwo(), stats=["SAD"], batch_size=8)
    out = scorer.score(ref, alt)["SAD"]
    assert scorer.batch_size == 2
    np.testing.assert_array_equal(out, [[0, -1, 0, 1]] * 3)
