"""The CUDA side: the same checks as on CPU, on a GPU (``pytest -m gpu``).

Deselected where no GPU is visible (see conftest.py). ``ENFORMER_VEP_TEST_DEVICE=cpu pytest -m gpu``
runs them on the CPU instead: a dry run of the code paths before spending GPU time
(benchmarks/gpu_check.sh --dry-run); the few CUDA-only checks then skip, saying why.
"""
import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from enformer_vep.model import HUB_SEQUENCE_LENGTH
from enformer_vep.pipeline import ScoreOptions, score_vcf
from enformer_vep.scoring import VariantScorer, precision_mode

from helpers import DATA, relative_error
from test_model import load_fixture_weights
from test_scoring import tiny_enformer
from test_training import MOTIFS, motif_factory, tiny_model

pytestmark = pytest.mark.gpu

DEVICE = torch.device(os.environ.get("ENFORMER_VEP_TEST_DEVICE", "cuda"))
GIAB = DATA / "grch38_chr1_giab_hg002"
CENTRE = HUB_SEQUENCE_LENGTH // 2 - 1


def cuda_only(what: str):
    if DEVICE.type != "cuda":
        pytest.skip(f"{what} needs CUDA (dry run on {DEVICE})")


@pytest.fixture(scope="module")
def official_model():
    from enformer_vep.weights import build_model, convert_official

    weights = load_fixture_weights()
    return build_model(convert_official({path: (lambda v=v: v) for path, v in weights.items()})).to(DEVICE).eval()


@pytest.mark.parametrize("precision, limit", [("fp32", 1e-5), ("tf32", 1e-2), ("bf16", 5e-2)])
def test_official_parity_on_the_device(official_model, official_inputs, official_outputs, precision, limit):
    """The official outputs (TensorFlow, float32) reproduced on the device; fp32 to the CPU's limit."""
    x = torch.from_numpy(official_inputs).to(DEVICE)
    with torch.inference_mode(), precision_mode(precision, DEVICE):
        trunk = official_model.trunk(x).float()
        human = torch.nn.functional.softplus(official_model.heads["human"](trunk)).float()
    assert relative_error(trunk.cpu().numpy(), official_outputs["trunk"]) <= limit
    got = human.cpu().numpy()[:, :, official_outputs["human_tracks"]]
    assert relative_error(got, official_outputs["human"]) <= limit


def test_input_gradient_on_the_device_matches_official(official_model, official_inputs, official_outputs):
    with precision_mode("fp32", DEVICE):
        x = torch.from_numpy(official_inputs[:1]).to(DEVICE).requires_grad_(True)
        objective = official_model(x)["human"][0, 443:453, 0].sum()
        objective.backward()
    assert relative_error(x.grad.cpu().numpy(), official_outputs["grad"]) <= 1e-4


def windows(n: int, seed: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Random reference windows and alternatives: SNVs, an MNP and a 3-bp deletion at the centre."""
    rng = np.random.default_rng(seed)
    ref = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, (n, HUB_SEQUENCE_LENGTH))].copy()
    alt = ref.copy()
    for i in range(n):
        if i % 4 == 3:  # deletion: the right flank moves left by 3 bp, N enters at the end
            alt[i, CENTRE + 1:-3] = ref[i, CENTRE + 4:]
            alt[i, -3:] = ord("N")
        elif i % 4 == 2:
            alt[i, CENTRE:CENTRE + 3] = ord("G")
        else:
            alt[i, CENTRE] = ord("A") if ref[i, CENTRE] != ord("A") else ord("C")
    return ref, alt


def correlations(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(x, y)[0, 1]) for x, y in zip(a, b)]


def test_scorer_on_the_device_matches_the_cpu():
    model = tiny_enformer(human=64)
    ref, alt = windows(8)
    expected = VariantScorer(model, stats=["SAD", "SAR"], precision="fp32", reuse=False).score(ref, alt)
    model = model.to(DEVICE)
    for reuse in (False, True):
        got = VariantScorer(model, stats=["SAD", "SAR"], precision="fp32", reuse=reuse, device=DEVICE,
                            batch_size=6).score(ref, alt)
        for name in ("SAD", "SAR"):
            scale = np.abs(expected[name]).max()
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-4 * scale, err_msg=(name, reuse))


def test_reduced_precisions_on_the_device_keep_snv_differences_exact():
    """bf16 context with the changed bins and the transformer in fp32: SNV/MNP effects agree with fp32
    (r > 0.999). TF32's 10-bit mantissas are amplified by this tiny random network (r 0.96-0.997 on an
    H200; the released size's agreement is bench_score's), all-bf16 and the deletion (whose conv tower
    runs in full in bf16) more (median r 0.77 there): looser bounds."""
    model = tiny_enformer(human=64).to(DEVICE)
    ref, alt = windows(8)
    run = {p: VariantScorer(model, stats=["SAD"], precision=p, device=DEVICE, batch_size=8).score(ref, alt)["SAD"]
           for p in ("fp32", "tf32", "bf16", "bf16/tf32", "bf16/fp32")}
    snv = [i for i in range(8) if i % 4 != 3]
    for precision, limit in (("bf16/fp32", 0.999), ("bf16/tf32", 0.9), ("tf32", 0.9)):
        r = correlations(run["fp32"][snv], run[precision][snv])
        assert min(r) > limit, (precision, r)
    assert np.median(correlations(run["fp32"], run["bf16"])) > 0.5  # r 0.45-0.995 on an H200
    assert not np.array_equal(run["bf16"], run["fp32"])


def test_transfer_and_encoding_on_the_device():
    """uint8 windows travel (pinned, asynchronously on CUDA) and are one-hot encoded on the device; many
    batches in a row, each compared with a one-hot built on the host."""
    scorer = VariantScorer(tiny_enformer(), device=DEVICE)
    table = np.zeros((256, 4), np.float32)
    table[np.frombuffer(b"ACGT", np.uint8), np.arange(4)] = 1
    rng = np.random.default_rng(0)
    batches = [np.frombuffer(b"ACGTN", np.uint8)[rng.integers(0, 5, (4, 4096))] for _ in range(20)]
    encoded = [scorer._encode(codes) for codes in batches]
    for codes, x in zip(batches, encoded):
        assert x.device.type == DEVICE.type
        np.testing.assert_array_equal(x.cpu().numpy(), table[codes])


def test_out_of_memory_halves_the_batch_on_the_device():
    """A real allocator failure (the process is allowed little more than it holds) halves the batch
    until it fits, with the same scores as a CPU run."""
    cuda_only("an out-of-memory error of the CUDA allocator")
    model = tiny_enformer(human=64)
    ref, alt = windows(8)
    expected = VariantScorer(model, stats=["SAD"], precision="fp32", reuse=False).score(ref, alt)["SAD"]
    model = model.to(DEVICE)
    torch.cuda.empty_cache()
    index = torch.cuda.current_device() if DEVICE.index is None else DEVICE.index
    total = torch.cuda.get_device_properties(index).total_memory
    allowed = torch.cuda.memory_allocated(index) + 2**29  # batch 32 needs over a GB, 4 fits
    torch.cuda.set_per_process_memory_fraction(allowed / total, index)
    try:
        scorer = VariantScorer(model, stats=["SAD"], precision="fp32", reuse=False, device=DEVICE, batch_size=None)
        assert scorer.batch_size == 32
        got = scorer.score(ref, alt)["SAD"]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()
    assert 1 <= scorer.batch_size < 32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_score_vcf_on_the_device_matches_the_cpu(tmp_path, fast_model):
    def run(device, out):
        options = ScoreOptions(vcf=str(GIAB / "input.vcf.gz"), fasta=str(GIAB / "reference.fa"), out_dir=str(out),
                               model=str(fast_model), device=device, stats=("SAD", "SAR"), tracks="0-99",
                               precision="fp32", reuse=False, progress=False)
        summary = score_vcf(options)
        import h5py
        with h5py.File(next(iter(summary.files.values()))) as f:
            return {k: f[k][()] for k in ("SAD", "SAR", "snp", "pos")}

    cpu = run("cpu", tmp_path / "cpu")
    device = run(str(DEVICE), tmp_path / "device")
    assert np.array_equal(cpu["snp"], device["snp"]) and np.array_equal(cpu["pos"], device["pos"])
    for name in ("SAD", "SAR"):
        a, b = cpu[name].astype(np.float32), device[name].astype(np.float32)
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3 * np.abs(a).max(), err_msg=name)


def test_two_workers_on_one_device_write_the_files_of_one(tmp_path, fast_model):
    """--devices D,D (two worker processes sharing the device) gives byte-identical files."""
    devices = f"{DEVICE},{DEVICE}" if DEVICE.type == "cpu" else "cuda:0,cuda:0"
    single = "cpu" if DEVICE.type == "cpu" else "cuda:0"
    common = [str(GIAB / "input.vcf.gz"), "--fasta", str(GIAB / "reference.fa"), "--model", str(fast_model),
              "--tracks", "0-49", "--checkpoint-every", "20", "--no-progress"]
    for name, flags in (("one", ["--device", single]), ("two", ["--devices", devices])):
        result = subprocess.run([sys.executable, "-m", "enformer_vep", *common, "-o", str(tmp_path / name), *flags],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_file() and p.name != "done.json")
    assert "input.chr1.h5" in files
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "one", tmp_path / "two", files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_bf16_training_on_the_device_learns_the_planted_motifs():
    cuda_only("bf16 autocast training (refused on CPU)")
    from enformer_vep.training import TrainConfig, evaluate, train

    model = tiny_model(seed=0, bins=32, channels=24, heads={"human": 1, "mouse": 1}).to(DEVICE)
    config = TrainConfig(steps=260, learning_rate=5e-3, warmup_steps=10, checkpoint_every=None, bf16=True)
    data = {head: motif_factory(head, seed, 10**6) for head, seed in (("human", 1), ("mouse", 2))}
    history = train(model, data, config, progress=False)
    assert history[-1]["human"] < history[0]["human"]
    for head in MOTIFS:
        assert evaluate(model, motif_factory(head, 99, 4)(), head).mean_r > 0.9, head
