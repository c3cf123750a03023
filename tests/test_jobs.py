"""`enformer-score predict` and `contrib` from the command line, checked by value: predictions
against direct model calls, contributions against the official implementation's gradient."""
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import DATA, relative_error
from test_contrib import FLANK, official_genome  # noqa: F401 (a fixture)
from test_predict import BED_LINES, CENTRES, independent_window

from enformer_vep.cli import cli
from enformer_vep.jobs import parse_bins
from enformer_vep.weights import load_model

FASTA = DATA / "grch38_chr1_giab_hg002" / "reference.fa"


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def test_predict_command_writes_the_model_predictions(tmp_path, fast_model):
    bed = tmp_path / "regions.bed"
    bed.write_text("\n".join(BED_LINES[:2]) + "\n")
    result = run("predict", bed, "--fasta", FASTA, "--model", fast_model, "--device", "cpu", "--tracks", "^CAGE:",
                 "-o", tmp_path / "p.h5", "--bigwig", tmp_path / "bw")
    assert result.exit_code == 0, result.output
    model = load_model(fast_model)
    labels = [line.split("\t")[7] for line in open("enformer_vep/data/targets_human.txt").read().splitlines()[1:]]
    cage = [i for i, label in enumerate(labels) if label.startswith("CAGE:")]
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert f["predictions"].shape == (2, 896, len(cage)) and len(cage) == 638
        assert [t.decode() for t in f["target_labels"][:]] == [labels[i] for i in cage]
        for i, centre in enumerate(CENTRES[:2]):
            with torch.inference_mode():
                want = model.predict(torch.from_numpy(independent_window(centre))[None])["human"][0][:, cage]
            assert relative_error(f["predictions"][i], want.numpy()) <= 1e-5
            assert f["bin_start"][i, 0] == centre - 57_344
    assert len(list((tmp_path / "bw").glob("*.bw"))) == 638


def test_contrib_command_matches_the_official_gradient(tmp_path, official_genome, official_bundle_dir,  # noqa: F811
                                                       official_inputs, official_outputs):
    model = tmp_path / "official.safetensors"
    assert run("convert", official_bundle_dir, model).exit_code == 0
    centre = FLANK + 98_304
    fasta = official_genome.path
    result = run("contrib", f"chrZ:{centre - 9}-{centre + 10}", "--fasta", fasta, "--model", model, "--device", "cpu",
                 "--tracks", "0", "--bins", "443-452", "-o", tmp_path / "c")
    assert result.exit_code == 0, result.output
    reference = (official_outputs["grad"] * official_inputs[0]).sum(-1)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        np.testing.assert_array_equal(f["position"][:], FLANK + np.arange(196_608))
        scores = f["contribution"][:]
        assert f.attrs["bins"].tolist() == list(range(443, 453))
    assert relative_error(scores * 10, reference) <= 1e-4  # mean over 10 bins vs the official sum
    lines = (tmp_path / "c.bedGraph").read_text().splitlines()
    assert lines[0].startswith("track type=bedGraph")
    chrom, start, end, value = lines[1].split("\t")
    first = int(np.flatnonzero(official_inputs[0].sum(-1))[0])  # N bases are left out
    assert (chrom, int(start), int(end)) == ("chrZ", FLANK + first, FLANK + first + 1)
    assert float(value) == pytest.approx(float(scores[first]), rel=1e-6)


def test_contrib_needs_tracks_and_valid_bins(tmp_path, fast_model):
    base = ["contrib", "chr1:602000-602100", "--fasta", FASTA, "--model", fast_model, "--device", "cpu",
            "-o", tmp_path / "c"]
    result = run(*base)
    assert result.exit_code == 1 and "contrib needs --tracks" in result.output
    result = run(*base, "--tracks", "0", "--bins", "440-x")
    assert result.exit_code == 1 and "--bins expects" in result.output
    result = run(*base, "--tracks", "0", "--bins", "900")
    assert result.exit_code == 1 and "bins must be" in result.output


def test_parse_bins():
    assert parse_bins(None) is None
    assert parse_bins("440,447-449,448").tolist() == [440, 447, 448, 449]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, fast_model):
    """A finished run over the first 6 GIAB records."""
    lines = (DATA / "grch38_chr1_giab_hg002" / "input.vcf").read_text().splitlines(keepends=True)
    tmp = tmp_path_factory.mktemp("scored")
    (tmp / "six.vcf").write_text("".join([x for x in lines if x.startswith("#")]
                                         + [x for x in lines if not x.startswith("#")][:6]))
    result = run(tmp / "six.vcf", "--fasta", FASTA, "--model", fast_model, "--device", "cpu", "-o", tmp / "out")
    assert result.exit_code == 0, result.output
    return tmp / "out"


def test_plot_variant_from_a_scores_run_shows_its_strongest_tracks(tmp_path, fast_model, scored):
    from enformer_vep.jobs import ModelChoice, plot_variant_job

    with h5py.File(scored / "six.chr1.h5", "r") as f:
        pos, ref, alt = int(f["pos"][2]), f["ref"][2].decode(), f["alt"][2].decode()
        sad = f["SAD"][2].astype(np.float32)
        labels = [t.decode() for t in f["target_labels"][:]]
    strongest = [labels[i] for i in np.argsort(-np.abs(sad), kind="stable")[:3]]
    figure = plot_variant_job(f"chr1:{pos}", FASTA, tmp_path / "v.png", ModelChoice(model=fast_model, device="cpu"),
                              scores_dir=scored, top=3)
    assert len(figure.axes) == 6
    assert [figure.axes[2 * k].get_title(loc="left") for k in range(3)] == strongest
    assert figure.axes[-1].get_xlim()[0] < pos < figure.axes[-1].get_xlim()[1]
    assert f"chr1:{pos} {ref}>{alt}" in figure.get_suptitle()
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_commands_write_the_files(tmp_path, fast_model, scored):
    base = ["--fasta", FASTA, "--model", fast_model, "--device", "cpu"]
    result = run("plot", "variant", "chr1:604358:G:C", *base, "--tracks", "0-2", "-o", tmp_path / "v.pdf")
    assert result.exit_code == 0 and "6 panels" in result.output, result.output
    assert (tmp_path / "v.pdf").read_bytes()[:5] == b"%PDF-"
    result = run("plot", "contrib", "chr1:604300-604400", *base, "--tracks", "4675", "-o", tmp_path / "c.png")
    assert result.exit_code == 0 and "2 panels" in result.output, result.output
    result = run("plot", "contrib", "chr1:500000-600000", *base, "--tracks", "4675", "-o", tmp_path / "wide.png")
    assert result.exit_code == 0 and "1 panels" in result.output, result.output
    result = run("plot", "variant", "chr1:604358", *base, "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "CHR:POS:REF:ALT" in result.output
    result = run("plot", "variant", "rs_missing", *base, "--scores", scored, "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "no variant 'rs_missing'" in result.output


# --- train and evaluate on the TF-written Basenji2 sample -----------------------------------------

BASENJI = DATA / "basenji2_tf_sample"
TINY_CONFIG = {"channels": 12, "num_heads": 2, "num_transformer_layers": 1, "pooling_type": "max",
               "conv_filters": [6, 6, 6, 6, 8, 12], "heads": {"human": 10}}


def tensors(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


def test_train_resumes_exactly_and_evaluate_reports_pearson_per_track(tmp_path):
    import json

    from enformer_vep.basenji_data import examples

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    base = ["train", "--config", config, "--data", f"human={BASENJI}", "--warmup", "1", "--lr", "1e-3",
            "--checkpoint-every", "1", "--no-progress", "--shuffle-buffer", "0"]
    result = run(*base, "--steps", "3", "--checkpoint", tmp_path / "a.pt", "-o", tmp_path / "a.safetensors")
    assert result.exit_code == 0 and "after 3 steps" in result.output, result.output
    result = run(*base, "--steps", "2", "--checkpoint", tmp_path / "b.pt", "-o", tmp_path / "b2.safetensors")
    assert result.exit_code == 0
    # another --seed: only a real resume (weights, optimizer, RNG and data position from b.pt) can
    # still give run a's weights; unshuffled data keeps the batches independent of the seed
    result = run(*base, "--steps", "3", "--seed", "7", "--checkpoint", tmp_path / "b.pt",
                 "-o", tmp_path / "b.safetensors")
    assert result.exit_code == 0, result.output
    assert run(*base, "--steps", "3", "--seed", "7", "-o", tmp_path / "c.safetensors").exit_code == 0
    a, b, b2 = (tensors(tmp_path / name) for name in ("a.safetensors", "b.safetensors", "b2.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # resumed = uninterrupted
    assert any(not np.array_equal(a[k], b2[k]) for k in a)  # and the third step did something
    c = tensors(tmp_path / "c.safetensors")
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # a fresh run with that seed differs

    result = run("evaluate", "--model", tmp_path / "a.safetensors", "--data", BASENJI, "--split", "valid",
                 "--device", "cpu", "-o", tmp_path / "r.tsv")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in (tmp_path / "r.tsv").read_text().splitlines()[1:]]
    assert len(rows) == 10
    model = load_model(tmp_path / "a.safetensors")
    predictions, targets = [], []
    for x, y in examples(BASENJI, "valid"):
        with torch.inference_mode():
            predictions.append(model.predict(torch.from_numpy(x)[None])["human"][0].double().numpy())
        targets.append(y.astype(np.float64))
    p, t = np.concatenate(predictions), np.concatenate(targets)
    want = [np.corrcoef(p[:, k], t[:, k])[0, 1] for k in range(10)]
    np.testing.assert_allclose([float(r[-1]) for r in rows], want, rtol=1e-4, atol=1e-6)
    assert f"mean Pearson r {np.nanmean(want):.4f} over 10 tracks, 2 sequences" in result.output


def test_fine_tuning_a_new_head_with_a_frozen_trunk(tmp_path, fast_model):
    result = run("train", "--init", fast_model, "--new-head", "mine:10", "--freeze-trunk", "--data", f"mine={BASENJI}",
                 "--steps", "2", "--warmup", "1", "--no-progress", "--device", "cpu", "-o", tmp_path / "ft.safetensors")
    assert result.exit_code == 0, result.output
    before, after = tensors(fast_model), tensors(tmp_path / "ft.safetensors")
    assert after["heads.mine.weight"].shape == (10, 24)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # trunk and the other head untouched
    result = run("train", "--init", fast_model, "--data", f"human={BASENJI}", "--steps", "1", "--no-progress",
                 "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and "add --new-head human:10" in result.output
