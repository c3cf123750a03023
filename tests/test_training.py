"""Training, evaluation and fine-tuning (enformer_vep.training) on tiny CPU models."""
import math

import numpy as np
import pytest
import torch

from enformer_vep.errors import InputError
from enformer_vep.targets import Targets
from enformer_vep.training import (
    EvalResult,
    TrainConfig,
    evaluate,
    freeze_trunk,
    load_checkpoint,
    make_optimizer,
    poisson_loss,
    replace_head,
    save_trained,
    train,
    warmup_factor,
)
from enformer_vep.weights import load_model

BIN = 128


@pytest.fixture
def tiny_model(tiny_enformer):
    """``tiny_model(seed, bins, heads, channels)``: conftest's tiny Enformer with torch's initial weights
    (not doubled: they train well), inputs of 128 * bins bp, all bins kept, two heads by default."""
    def make(seed=0, bins=8, heads=None, channels=12):
        return tiny_enformer(seed=seed, channels=channels, target_length=bins, doubled=False,
                             heads=heads or {"human": 3, "mouse": 2})
    return make


def random_factory(n_tracks, bins=8, batch=2, per_epoch=3, seed=0):
    """A data factory: ``per_epoch`` random batches, reshuffled by epoch."""
    def factory(epoch=0):
        rng = np.random.default_rng([seed, epoch])
        for _ in range(per_epoch):
            x = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=(batch, bins * BIN))]
            y = rng.gamma(2.0, 1.0, size=(batch, bins, n_tracks)).astype(np.float32)
            yield x, y
    return factory


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_poisson_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    target = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    terms = [1.0 - 0.0, 2.0 - 1.0 * math.log(2.0 + 1e-7), 3.0 - 2.0 * math.log(3.0 + 1e-7),
             0.5 - 4.0 * math.log(0.5 + 1e-7)]
    # float32 logs, products and a mean of 4 against float64: a few roundings of 2^-24; measured 1.1e-8
    assert poisson_loss(pred, target).item() == pytest.approx(sum(terms) / 4, rel=5e-7)
    # a zero prediction stays finite thanks to the epsilon (float32: 1e-7 and its log rounded; measured 1.6e-8)
    zero = poisson_loss(torch.zeros(1), torch.ones(1)).item()
    assert zero == pytest.approx(-math.log(1e-7), rel=5e-7)


def test_warmup_learning_rates_by_hand(tiny_model):
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    model = tiny_model()
    optimizer, scheduler = make_optimizer(model, TrainConfig(learning_rate=1e-3, warmup_steps=4))
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # float64: the base rate times the factor, one rounding (2^-53); measured exact
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rel=2**-52, abs=0)
    # train() applies it: Adam's first update moves each parameter by ~lr (|m / sqrt(v)| = 1)
    before = model.heads["human"].weight.detach().clone()
    train(model, {"human": random_factory(3)},
          TrainConfig(steps=1, learning_rate=1e-2, warmup_steps=4, heads=["human"]), progress=False)
    step = (model.heads["human"].weight.detach() - before).abs()
    # float32 weights: the step is exact to half an ulp of the weight (<= 1.2e-5 of it for |w| < 0.5), and Adam's
    # eps (1e-8) is negligible beside the largest gradient; measured 2e-6
    assert step.max().item() == pytest.approx(1e-2 / 4, rel=5e-5)


def grad_norm(model):
    return torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in model.parameters() if p.grad is not None])).item()


def test_gradient_clipping_is_applied(tiny_model):
    data = {"human": random_factory(3)}
    model = tiny_model()
    train(model, data, TrainConfig(steps=1, heads=["human"]), progress=False)
    unclipped = grad_norm(model)
    assert unclipped > 0.01
    model = tiny_model()
    train(model, data, TrainConfig(steps=1, heads=["human"], clip_grad_norm=0.01), progress=False)
    # clip_grad_norm_ scales by 0.01 / (norm + 1e-6): 1e-6 / norm short of 0.01, plus float32 roundings of the
    # norms (~1e-7); measured 3.0e-7
    assert grad_norm(model) == pytest.approx(0.01, rel=2e-6)


def test_resume_continues_exactly(tmp_path, tiny_model):
    """Interrupted after 5 batches (checkpoint at step 4), resumed into a fresh model: the same
    losses and weights as an uninterrupted run, bit for bit (dropout RNG, Adam, schedule, data)."""
    config = TrainConfig(steps=7, learning_rate=3e-3, warmup_steps=3, clip_grad_norm=1.0, seed=5,
                         checkpoint_every=2)
    data = {"human": random_factory(3, seed=1), "mouse": random_factory(2, seed=2)}

    model = tiny_model(seed=0)
    full = train(model, data, config, checkpoint_path=tmp_path / "full.ckpt", progress=False)
    assert len(full) == 7 and all(set(step) == {"human", "mouse"} for step in full)
    full_state = state_copy(model)

    def interrupting(epoch=0):  # mouse's 5th batch never arrives
        for i, batch in enumerate(random_factory(2, seed=2)(epoch)):
            if epoch * 3 + i == 4:
                raise KeyboardInterrupt
            yield batch

    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(seed=0), {"human": data["human"], "mouse": interrupting}, config,
              checkpoint_path=path, progress=False)
    saved = load_checkpoint(path)
    assert saved["step"] == 4
    assert saved["data"] == {"human": {"epoch": 1, "position": 1}, "mouse": {"epoch": 1, "position": 1}}

    fresh = tiny_model(seed=123)  # different initial weights: all must come from the checkpoint
    torch.manual_seed(999)        # and a different global RNG state
    resumed = train(fresh, data, config, checkpoint_path=path, progress=False)
    assert resumed == full
    for name, tensor in state_copy(fresh).items():
        assert torch.equal(tensor, full_state[name]), name
    # a finished run resumes to nothing
    assert train(fresh, data, config, checkpoint_path=path, progress=False) == full
    assert not (tmp_path / "run.ckpt.partial").exists()


def test_evaluate_matches_numpy_corrcoef(tmp_path, tiny_model):
    model = tiny_model(seed=3)
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(3):
        x = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=(2, 8 * BIN))]
        y = (1000 + rng.normal(size=(2, 8, 3))).astype(np.float32)  # a large offset: cancellation test
        batches.append((x, y))
    model.eval()
    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(x))["human"].numpy() for x, _ in batches])
    # targets that follow the predictions (tracks 0 and 2, with opposite signs) plus noise
    scaled = (pred - pred.mean((0, 1))) / pred.std((0, 1)) * np.array([1.0, 0.0, -2.0], np.float32)
    batches = [(x, y + scaled[2 * i:2 * i + 2]) for i, (x, y) in enumerate(batches)]
    target = np.concatenate([y for _, y in batches])
    expected = [np.corrcoef(pred[..., t].ravel(), target[..., t].ravel())[0, 1] for t in range(3)]
    model.train()
    result = evaluate(model, iter(batches), "human")
    assert model.training  # restored
    assert isinstance(result, EvalResult) and result.n_bins == 48 and result.n_sequences == 6
    # float64 merges (Chan) against numpy's two passes over the same float32 predictions: centring values near
    # 1000 costs ~2^-53 x 1000 = 1e-13 of unit deviations (a plain float64 sum of squares would lose ~1e-10,
    # float32 everything); measured 6e-16
    np.testing.assert_allclose(result.r, expected, rtol=1e-12, atol=1e-13)
    assert expected[0] > 0.5 and expected[2] < -0.5  # the check covers strong correlations
    assert result.mean_r == pytest.approx(np.mean(expected), abs=1e-13)
    # float32 means of 48 terms per batch (merged in float64) against one of 144: ~5e-7; measured 0
    assert result.loss == pytest.approx(poisson_loss(torch.from_numpy(pred), torch.from_numpy(target)).item(), rel=2e-6)
    # a subset of tracks, with targets holding all columns or just the chosen ones
    subset = evaluate(model, iter(batches), "human", tracks=[2, 0])
    # (the subset's predictions come from a sliced linear layer: float32 rounding differs; measured 4.7e-7)
    np.testing.assert_allclose(subset.r, [expected[2], expected[0]], atol=2e-6)
    chosen = [(x, y[..., [2, 0]]) for x, y in batches]
    np.testing.assert_allclose(evaluate(model, iter(chosen), "human", tracks=[2, 0]).r, subset.r, rtol=1e-12)

    targets = Targets(ids=["ENCFF0", "ENCFF1", "ENCFF2"], labels=["DNASE:a", "CAGE:b", "CHIP:c"])
    path = subset.write_tsv(tmp_path / "r.tsv", targets)
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tidentifier\tdescription\tr"
    assert lines[1].split("\t")[:3] == ["2", "ENCFF2", "CHIP:c"]
    assert float(lines[1].split("\t")[3]) == pytest.approx(subset.r[0], abs=1e-6)  # 6 decimals: 5e-7
    assert lines[2].split("\t")[:3] == ["0", "ENCFF0", "DNASE:a"] and len(lines) == 3


def test_replace_head_and_freeze_trunk(tmp_path, tiny_model):
    model = tiny_model(seed=4)
    replace_head(model, "mine", 5)
    replace_head(model, "mouse", 4)  # replacing an existing head changes its size
    assert model.config.heads == {"human": 3, "mouse": 4, "mine": 5}
    out = model(torch.zeros(1, 8 * BIN, 4))
    assert out["mine"].shape == (1, 8, 5) and out["mouse"].shape == (1, 8, 4)
    assert (out["mine"] >= 0).all()  # softplus

    model.train()
    freeze_trunk(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and not any(m.training for m in norms) and model.heads.training
    before = state_copy(model)
    history = train(model, {"mine": random_factory(5, seed=3)},
                    TrainConfig(steps=3, learning_rate=1e-2, warmup_steps=0), progress=False)
    assert len(history) == 3 and set(history[0]) == {"mine"}
    after = state_copy(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"heads.mine.weight", "heads.mine.bias"}  # BN statistics included: unchanged
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("heads.mine"))

    freeze_trunk(model, frozen=False)
    assert all(p.requires_grad for p in model.parameters())
    # the fine-tuned model exports to our native format with its new heads
    loaded = load_model(save_trained(model, tmp_path / "tuned.safetensors"))
    assert loaded.config.heads == {"human": 3, "mouse": 4, "mine": 5}
    for name, tensor in loaded.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, after[name]), name


# --- learning a synthetic task --------------------------------------------------------------

MOTIFS = {"human": ["TGACTCA"], "mouse": ["CACGTG"]}
TASK_BINS = 32


def motif_batch(rng, motifs, batch, bins=TASK_BINS):
    """Random sequences with planted motifs; track j of a bin = occurrences of motif j starting in it."""
    length = bins * BIN
    seqs = rng.integers(0, 4, size=(batch, length))
    codes = [np.array(["ACGT".index(c) for c in m]) for m in motifs]
    for s in range(batch):
        for code in codes:
            for pos in rng.integers(0, length - len(code), size=rng.poisson(rng.uniform(2, 40))):
                seqs[s, pos:pos + len(code)] = code
    y = np.zeros((batch, bins, len(motifs)), np.float32)
    for j, code in enumerate(codes):
        hits = (np.lib.stride_tricks.sliding_window_view(seqs, len(code), axis=1) == code).all(-1)
        for s in range(batch):
            np.add.at(y[s, :, j], np.nonzero(hits[s])[0] // BIN, 1)
    return np.eye(4, dtype=np.float32)[seqs], y


def motif_factory(head, seed, n_batches, batch=8):
    def factory(epoch=0):
        rng = np.random.default_rng([seed, epoch])
        for _ in range(n_batches):
            yield motif_batch(rng, MOTIFS[head], batch)
    return factory


def test_motif_batch_counts_by_hand():
    x, y = motif_batch(np.random.default_rng(0), ["CACGTG"], 2)
    seq = "".join("ACGT"[i] for i in x[1].argmax(-1))
    for b in range(TASK_BINS):
        starts = [i for i in range(b * BIN, min((b + 1) * BIN, len(seq))) if seq.startswith("CACGTG", i)]
        assert y[1, b, 0] == len(starts)
    assert y.sum() > 10


@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["fp32", "bf16"])
def test_learns_planted_motif_counts(tiny_model, device, bf16):
    """Human and mouse steps alternate; each head learns to count its motif per bin and predicts
    held-out sequences with Pearson r > 0.9 (a bound on learning, not on rounding); with bf16 autocast too (a
    CUDA mode, so gpu-marked; its 2^-8 roundings of activations are far below what r > 0.9 allows; on the CPU
    it is refused)."""
    model = tiny_model(seed=0, bins=TASK_BINS, channels=24, heads={"human": 1, "mouse": 1}).to(device)
    config = TrainConfig(steps=260, learning_rate=5e-3, warmup_steps=10, checkpoint_every=None, bf16=bf16)
    data = {"human": motif_factory("human", 1, 10**6), "mouse": motif_factory("mouse", 2, 10**6)}
    if bf16 and device.type == "cpu":
        with pytest.raises(InputError, match="bf16 training needs a CUDA device"):
            train(model, data, config, progress=False)
        return
    history = train(model, data, config, progress=False)
    assert history[-1]["human"] < history[0]["human"] and history[-1]["mouse"] < history[0]["mouse"]
    for head in ("human", "mouse"):
        result = evaluate(model, motif_factory(head, 99, 4)(), head)  # held-out sequences
        assert result.mean_r > 0.9, (head, result.r)
