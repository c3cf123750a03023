"""The model against the official implementation's own numbers (tests/data/official_small)
and against hand-derived expectations for its building blocks."""
import copy
import math

import numpy as np
import pytest
import torch
from helpers import DATA, load_fixture_weights, relative_error

from enformer_vep.model import (
    Enformer,
    EnformerConfig,
    MultiHeadAttention,
    SoftmaxPool,
    gelu,
    relative_position_features,
    relative_shift,
)
from enformer_vep.scoring import precision_mode
from enformer_vep.weights import build_model, convert_official


@pytest.fixture(scope="module")
def npz_model():
    weights = load_fixture_weights()
    return build_model(convert_official({path: (lambda v=v: v) for path, v in weights.items()}))


@pytest.fixture
def official_model(npz_model, device):
    """The fixture model on ``device`` (a copy: the module's CPU model stays where it is)."""
    return npz_model if device.type == "cpu" else copy.deepcopy(npz_model).to(device)


# fp32: TensorFlow's and torch's float32 kernels sum in other orders through the trunk (a few 2^-24 roundings
# per layer): measured 1.4e-6 of the largest value on the CPU, bound 1e-5 (a device sums in other orders again).
# bf16 keeps 8 bits (2^-8 = 3.9e-3 a rounding): CPU autocast measured 1.15e-2 (~3 roundings), bound 5e-2.
# tf32 keeps 10 (2^-11 = 4.9e-4 a rounding): 1e-2, the bound of its rounding measured on an H200 (TF32 on CPU
# is float32, so only CUDA has a tf32 case)
@pytest.mark.parametrize("precision, limit", [("fp32", 1e-5), pytest.param("tf32", 1e-2, marks=pytest.mark.gpu),
                                              ("bf16", 5e-2)])
def test_parity_with_official_outputs_from_npz_weights(official_model, device, official_inputs, official_outputs,
                                                       precision, limit):
    x = torch.from_numpy(official_inputs).to(device)
    with torch.inference_mode(), precision_mode(precision, device):
        trunk = official_model.trunk(x).float()
        heads = {name: torch.nn.functional.softplus(head(trunk)).float()
                 for name, head in official_model.heads.items()}
    assert relative_error(trunk.cpu().numpy(), official_outputs["trunk"]) <= limit
    for head in ("human", "mouse"):
        got = heads[head].cpu().numpy()[:, :, official_outputs[f"{head}_tracks"]]
        assert relative_error(got, official_outputs[head]) <= limit, head


def test_hub_length_input_is_cropped_to_its_centre(npz_model, official_inputs):
    x = torch.from_numpy(official_inputs[:1])
    pad = torch.ones(1, 98_304, 4)  # anything outside the centre must have no effect
    long = torch.cat([pad, x, pad], dim=1)
    out, out_long = npz_model.predict(x), npz_model.predict(long)
    assert long.shape[1] == 393_216
    assert torch.equal(out["human"], out_long["human"])


def test_input_gradient_matches_official(official_model, device, official_inputs, official_outputs):
    # fp32 pinned: cuDNN convolutions default to TF32 on CUDA
    with precision_mode("fp32", device):
        x = torch.from_numpy(official_inputs[:1]).to(device).requires_grad_(True)
        objective = official_model(x)["human"][0, 443:453, 0].sum()
        objective.backward()
    # float32 in TensorFlow's summation orders against torch's: measured on the CPU 1.2e-7 (the objective) and
    # 1.4e-6 of the largest gradient; a device's kernels sum in other orders again: 1e-4 there
    cpu = device.type == "cpu"
    assert math.isclose(objective.item(), float(official_outputs["grad_target"]), rel_tol=1e-6 if cpu else 1e-4)
    assert relative_error(x.grad[0].cpu().numpy(), official_outputs["grad"]) <= (1e-5 if cpu else 1e-4)


@pytest.mark.parametrize("key,seq_len", [("F192_T1536", 1536), ("F192_T1024", 1024), ("F48_T1536", 1536)])
def test_positional_features_equal_official_float32_tables(key, seq_len):
    official = np.load(DATA / "positional_features.npz")[key]
    ours = relative_position_features(seq_len, official.shape[1]).numpy()
    n = official.shape[1] // 6
    assert ours.shape == official.shape
    gamma = np.r_[2 * n:3 * n, 5 * n:6 * n]
    central = np.r_[n:2 * n, 4 * n:5 * n]
    np.testing.assert_array_equal(ours[:, gamma], official[:, gamma])
    np.testing.assert_array_equal(ours[:, central], official[:, central])
    # the exponentials in float32, as the official code computes them: values <= 1, an ulp <= 1.2e-7; measured 3.6e-7
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seq_len, num_features", [(300, 12), (200, 18), (64, 6)])
def test_positional_features_off_the_shipped_tables_follow_the_formula(seq_len, num_features):
    """Sizes without a shipped table, against the official formulas written out in float64 numpy:
    [exponential | central mask | gamma] of |d| then the same times sign(d), each gamma basis divided
    by its maximum over the distances (not over the bases)."""
    import math

    n = num_features // 6
    d = np.arange(-(seq_len - 1), seq_len, dtype=np.float64)
    x = np.abs(d)[:, None]
    half_life = 2.0 ** np.linspace(3.0, math.log2(seq_len), n)
    exponential = np.exp(-math.log(2.0) / half_life * x)
    central = ((2.0 ** np.arange(1, n + 1) - 1) > x).astype(np.float64)
    stddev = seq_len / (2 * n)
    mean = np.linspace(seq_len / n, seq_len, n)
    concentration, rate = (mean / stddev) ** 2, mean / stddev**2
    log_pdf = np.where(x > 0, (concentration - 1) * np.log(np.maximum(x, 1e-300)), np.where(concentration == 1, 0.0,
                                                                                            -np.inf)) - rate * x
    log_pdf -= np.array([math.lgamma(c) for c in concentration]) - concentration * np.log(rate)
    gamma = np.exp(log_pdf) + 1e-8
    gamma /= gamma.max(axis=0, keepdims=True)
    symmetric = np.concatenate([exponential, central, gamma], axis=1)
    expected = np.concatenate([symmetric, np.sign(d)[:, None] * symmetric], axis=1)
    ours = relative_position_features(seq_len, num_features).numpy().astype(np.float64)
    assert ours.shape == expected.shape == (2 * seq_len - 1, num_features)
    # float32 arithmetic: exp of values <= 1 to a few ulp (2^-24 relative; measured 6.8e-8); the gamma pdf's
    # lgamma/xlogy cancel in float32 (the official code's own rounding), measured 1.8e-5 of its peak at these sizes
    classes = {"exponential": np.r_[0:n, 3 * n:4 * n], "central": np.r_[n:2 * n, 4 * n:5 * n],
               "gamma": np.r_[2 * n:3 * n, 5 * n:6 * n]}
    np.testing.assert_allclose(ours[:, classes["exponential"]], expected[:, classes["exponential"]], atol=3e-7)
    np.testing.assert_array_equal(ours[:, classes["central"]], expected[:, classes["central"]])
    np.testing.assert_allclose(ours[:, classes["gamma"]], expected[:, classes["gamma"]], atol=1e-4)


def test_gamma_features_are_normalised_per_basis_over_positions():
    """Off the shipped tables the float32 formula is used: each basis peaks at exactly 1."""
    feats = relative_position_features(300, 12).numpy()  # 2 basis functions per class
    gamma = feats[:, 4:6]
    np.testing.assert_array_equal(gamma.max(axis=0), [1.0, 1.0])


def test_default_configuration_has_the_published_parameter_count():
    with torch.device("meta"):
        model = Enformer()
    heads = {name: sum(p.numel() for p in head.parameters()) for name, head in model.heads.items()}
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.config.conv_filters == [768, 896, 1024, 1152, 1280, 1536]
    assert total == 251_221_292
    assert heads == {"human": 16_326_849, "mouse": 5_048_939}


def test_relative_shift_puts_distance_key_minus_query_at_each_entry():
    t = 5
    distances = torch.arange(-(t - 1), t, dtype=torch.float32)  # column c holds distance c - (t-1)
    logits = distances.expand(1, 1, t, 2 * t - 1)
    shifted = relative_shift(logits)[0, 0]
    expected = torch.tensor([[j - i for j in range(t)] for i in range(t)], dtype=torch.float32)
    assert torch.equal(shifted, expected)


def test_relative_shift_of_batches_and_heads_takes_column_j_minus_i_plus_t_minus_1():
    t = 6
    x = torch.randn(2, 3, t, 2 * t - 1)
    expected = torch.empty(2, 3, t, t)
    for i in range(t):
        for j in range(t):
            expected[:, :, i, j] = x[:, :, i, j - i + t - 1]
    assert torch.equal(relative_shift(x), expected)
    assert torch.equal(relative_shift(x.transpose(0, 1).contiguous().transpose(0, 1)), expected)  # any strides


def test_attention_equals_the_relative_position_formula_computed_by_hand():
    """softmax_j((q_i/sqrt(K) + r_w) . k_j + (q_i/sqrt(K) + r_r) . r_k[j - i]) v_j per head, in float64 loops."""
    cfg = EnformerConfig(channels=24, num_heads=2, num_transformer_layers=1, key_size=8, conv_filters=[24] * 6,
                         heads={"human": 1})
    torch.manual_seed(3)
    attention = MultiHeadAttention(cfg).eval()
    with torch.no_grad():
        attention.r_w_bias.normal_()
        attention.r_r_bias.normal_()
    t = 10
    x = torch.randn(2, t, cfg.channels)
    with torch.no_grad():
        got = attention(x).double().numpy()
        q = attention.to_q(x).double().numpy().reshape(2, t, 2, 8) / math.sqrt(8)
        k = attention.to_k(x).double().numpy().reshape(2, t, 2, 8)
        v = attention.to_v(x).double().numpy().reshape(2, t, 2, 12)
        features = relative_position_features(t, cfg.num_relative_position_features)
        r_k = attention.to_rel_k(features).double().numpy().reshape(2 * t - 1, 2, 8)  # row n: distance n - (t-1)
        r_w, r_r = attention.r_w_bias.double().numpy()[0, :, 0], attention.r_r_bias.double().numpy()[0, :, 0]
        out_w = attention.to_out.weight.double().numpy()
        out_b = attention.to_out.bias.double().numpy()
    heads = np.zeros((2, t, 2, 12))
    for b in range(2):
        for h in range(2):
            for i in range(t):
                logits = np.array([(q[b, i, h] + r_w[h]) @ k[b, j, h] + (q[b, i, h] + r_r[h]) @ r_k[j - i + t - 1, h]
                                   for j in range(t)])
                weights = np.exp(logits - logits.max())
                heads[b, i, h] = (weights / weights.sum()) @ v[b, :, h]
    expected = heads.reshape(2, t, 24) @ out_w.T + out_b
    # float32 against float64: sums of 8 products, a softmax over 10, the 24-wide output layer: a few 2^-24
    # roundings of the largest output; measured 1.5e-7 of it
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_gelu_is_the_sigmoid_approximation():
    x = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    expected = torch.tensor([v * (1 / (1 + math.exp(-1.702 * v))) for v in x.tolist()])
    # float32 exp, add, divide, multiply against float64 rounded once: ~4 roundings of 2^-24; measured 8e-8
    torch.testing.assert_close(gelu(x), expected, rtol=5e-7, atol=0)
    assert not torch.allclose(gelu(x), torch.nn.functional.gelu(x), atol=1e-3)


def test_softmax_pool_weights_each_pair_by_its_softmax():
    pool = SoftmaxPool(2)
    x = torch.tensor([[[1.0, 3.0, -1.0, 0.0], [2.0, 2.0, 5.0, 1.0]]])  # [1, 2 channels, 4]
    # default logits are 2 x identity: weight of a = e^(2a) / (e^(2a) + e^(2b))
    def pooled(a, b):
        wa = math.exp(2 * a) / (math.exp(2 * a) + math.exp(2 * b))
        return wa * a + (1 - wa) * b
    expected = torch.tensor([[[pooled(1, 3), pooled(-1, 0)], [pooled(2, 2), pooled(5, 1)]]])
    # a float32 softmax of two and a weighted sum against float64: a few roundings of 2^-24; measured 0
    torch.testing.assert_close(pool(x), expected, rtol=5e-7, atol=0)


def tiny_config(**overrides):
    config = dict(channels=48, num_heads=2, num_transformer_layers=1, heads={"human": 3},
                  conv_filters=[32, 32, 32, 32, 48, 48], target_length=8)
    config.update(overrides)
    return EnformerConfig(**config)


def test_max_pooling_and_other_lengths():
    torch.manual_seed(0)
    model = Enformer(tiny_config(pooling_type="max")).eval()
    x = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 128 * 16)), 4).float()
    assert model.predict(x)["human"].shape == (2, 8, 3)
    assert isinstance(model.stem.pool, torch.nn.MaxPool1d)
    assert model.predict(x[:, : 128 * 12])["human"].shape == (2, 8, 3)


def test_bad_input_shapes_are_refused_clearly():
    model = Enformer(tiny_config()).eval()
    with pytest.raises(ValueError, match="multiple of 128"):
        model.predict(torch.zeros(1, 128 * 16 + 1, 4))
    with pytest.raises(ValueError, match="at least 8 bins"):
        model.predict(torch.zeros(1, 128 * 4, 4))
    with pytest.raises(ValueError, match=r"\[batch, length, 4\]"):
        model.predict(torch.zeros(128 * 16, 4))


def test_train_mode_uses_batch_statistics_and_dropout():
    torch.manual_seed(0)
    model = Enformer(tiny_config())
    x = torch.nn.functional.one_hot(torch.randint(0, 4, (4, 128 * 16)), 4).float()
    captured = {}
    model.conv_tower[0].conv.norm.register_forward_hook(lambda m, i, o: captured.update(out=o, inp=i[0]))
    first = model(x)["human"]
    inp = captured["inp"]
    batch_normalised = (inp - inp.mean(dim=(0, 2), keepdim=True)) / torch.sqrt(
        inp.var(dim=(0, 2), unbiased=False, keepdim=True) + 1e-5)
    # float32 batch statistics in two orders (torch's batch norm, mean/var here): an ulp or two of the normalised
    # values (|x| < 8: 2^-21 = 4.8e-7); measured 4.8e-7
    torch.testing.assert_close(captured["out"], batch_normalised, rtol=0, atol=2e-6)
    assert not torch.equal(first, model(x)["human"])  # dropout draws differ between calls
    model.eval()
    assert torch.equal(model.predict(x)["human"], model.predict(x)["human"])


def test_predict_refuses_train_mode_and_keeps_no_graph():
    model = Enformer(tiny_config())
    with pytest.raises(RuntimeError, match="eval"):
        model.predict(torch.zeros(1, 128 * 16, 4))
    out = model.eval().predict(torch.zeros(1, 128 * 16, 4))["human"]
    assert not out.requires_grad and out.is_inference()


def test_predict_tracks_computes_only_the_chosen_columns():
    torch.manual_seed(1)
    model = Enformer(tiny_config(heads={"human": 7, "mouse": 2})).eval()
    x = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 128 * 16)), 4).float()
    full = model.predict(x)
    # a sliced head may sum its 48 products in another order: a few float32 roundings (2^-24) of each output;
    # measured 0 (the same order here)
    torch.testing.assert_close(model.predict_tracks(x, "human", torch.tensor([5, 1])), full["human"][..., [5, 1]],
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.predict_tracks(x, "mouse"), full["mouse"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("changes", [
    [(98_303, "G")],                       # a SNV where variant windows put it
    [(0, "T")], [(196_607, "A")],          # at the input's ends (patch would cross them)
    [(500, "A"), (501, "C"), (502, "G")],  # an MNP near the start
    [(70_000, "T")],                       # inside a run of N
    [(120_000, "A"), (120_700, "C")],      # two changes several bins apart
    [(98_303, "N")],                       # a base turned into N
])
def test_convolve_changed_equals_a_full_pass(changes):
    torch.manual_seed(5)
    model = Enformer(tiny_config(channels=24, conv_filters=[16, 16, 16, 16, 24, 24], target_length=896)).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
    rng = np.random.default_rng(2)
    codes = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, 196_608)].copy()
    codes[69_000:71_000] = ord("N")
    for position, base in changes:  # make sure each change really changes the base
        if codes[position] == ord(base):
            codes[position] = ord("A" if base != "A" else "C")
    alt = codes.copy()
    for position, base in changes:
        alt[position] = ord(base)
    table = torch.zeros(256, 4)
    for i, b in enumerate(b"ACGT"):
        table[b, i] = 1
    x_ref, x_alt = table[torch.from_numpy(codes).long()][None], table[torch.from_numpy(alt).long()][None]
    changed = np.nonzero(codes != alt)[0]
    with torch.inference_mode():
        reference = model.convolve(x_ref)
        full = model.convolve(x_alt)
        patched = model.convolve_changed(reference, x_alt, [(int(changed[0]), int(changed[-1]))])
    assert not torch.equal(full, reference)
    # float32, the patch's convolutions over a shorter input against the full pass's: measured 1.6e-7 of the largest
    assert relative_error(patched.numpy(), full.numpy()) <= 1e-6
    # every bin the change can reach was recomputed; the others are the reference's
    first, last = model.affected_bins(int(changed[0]), int(changed[-1]))
    untouched = torch.ones(reference.shape[1], dtype=torch.bool)
    untouched[max(first, 0):last + 1] = False
    assert torch.equal(full[0, untouched], reference[0, untouched])


def test_recompute_bins_anywhere_equals_a_full_pass(tiny_enformer):
    """Spans at the input's ends (their patches are cut there, where the padding is the input's own), inside,
    several in one row and one reaching past both ends (clipped): the bins asked equal a full pass, the others
    are left as they were."""
    model = tiny_enformer(seed=2, conv_filters=[16, 16, 16, 16, 24, 24], target_length=32, random_statistics=True)
    x = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 64 * 128), generator=torch.Generator().manual_seed(1)),
                                    4).float()
    with torch.inference_mode():
        full = model._conv_stages(x)
        conv = model.recompute_bins(torch.zeros_like(full), x, [(0, 0, 2), (0, 61, 63), (0, 30, 30), (1, -5, 70)])
    asked = torch.zeros(64, dtype=torch.bool)
    asked[[0, 1, 2, 30, 61, 62, 63]] = True
    # float32, patches cut at the input's ends against the full pass: measured 6.4e-7 of the largest value
    assert relative_error(conv[0, asked].numpy(), full[0, asked].numpy()) <= 3e-6
    assert not conv[0, ~asked].any()
    assert relative_error(conv[1].numpy(), full[1].numpy()) <= 3e-6
