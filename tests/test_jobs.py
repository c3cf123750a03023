"""`enformer-score predict` and `contrib` from the command line, checked by value: predictions
against direct model calls, contributions against the official implementation's gradient."""
import hashlib
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import DATA, from_test_extra, relative_error
from test_contrib import FLANK, official_genome  # noqa: F401 (a fixture)
from test_predict import BED_LINES, CENTRES, independent_window

from enformer_vep import __version__
from enformer_vep.cli import cli
from enformer_vep.genome import Genome
from enformer_vep.jobs import ModelChoice, parse_bins, plot_contrib_job, plot_variant_job
from enformer_vep.weights import load_model, save_native

pyBigWig = from_test_extra("pyBigWig")

FASTA = DATA / "grch38_chr1_giab_hg002" / "reference.fa"


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_provenance(attrs, model, fasta, **options):
    """The provenance attributes every HDF5 output carries (as the scoring outputs do)."""
    assert attrs["enformer_vep_version"] == __version__
    assert (attrs["model_sha256"], attrs["model_source"]) == (sha256(model), str(model))
    assert attrs["fasta"] == os.path.abspath(fasta)
    with Genome(fasta) as genome:
        assert attrs["fasta_index_sha256"] == genome.index_checksum()
    recorded = json.loads(attrs["options"])
    assert {k: recorded[k] for k in options} == options


def one_line_error(result, *parts):
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for part in parts:
        assert part in result.output, result.output


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
            # float32, batched against one window a call: measured 1.9e-7 of the largest prediction
            assert relative_error(f["predictions"][i], want.numpy()) <= 1e-6
            assert f["bin_start"][i, 0] == centre - 57_344
        # the BED's first line says chr1 (the FASTA: 1), its second 1: each row keeps the name it was given
        assert f["chrom"][:].tolist() == [b"chr1", b"1"]
        assert_provenance(f.attrs, fast_model, FASTA, command="predict", regions=str(bed), tracks="^CAGE:",
                          organism="human", batch_size=2, bigwig=str(tmp_path / "bw"))
    bigwigs = sorted((tmp_path / "bw").glob("*.bw"))
    assert len(bigwigs) == 638
    with pyBigWig.open(str(bigwigs[0])) as bw:
        assert bw.chroms() == {"chr1": 860_893}  # the name of the first region on the contig


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
        assert_provenance(f.attrs, model, fasta, command="contrib", region=f"chrZ:{centre - 9}-{centre + 10}",
                          tracks="0", bins="443-452", device="cpu")
    # mean over 10 bins vs the official sum; float32 in TensorFlow's orders against torch's: measured 1.6e-6
    assert relative_error(scores * 10, reference) <= 1e-5
    lines = (tmp_path / "c.bedGraph").read_text().splitlines()
    assert lines[0].startswith("track type=bedGraph")
    chrom, start, end, value = lines[1].split("\t")
    first = int(np.flatnonzero(official_inputs[0].sum(-1))[0])  # N bases are left out
    assert (chrom, int(start), int(end)) == ("chrZ", FLANK + first, FLANK + first + 1)
    assert float(value) == pytest.approx(float(scores[first]), rel=1e-8)  # '%.9g': <= 5e-9 of the value


def test_contrib_needs_tracks_and_valid_bins(tmp_path, fast_model):
    base = ["contrib", "chr1:602000-602100", "--fasta", FASTA, "--model", fast_model, "--device", "cpu",
            "-o", tmp_path / "c"]
    result = run(*base)
    assert result.exit_code == 1 and "contrib needs --tracks" in result.output
    result = run(*base, "--tracks", "0", "--bins", "440-x")
    assert result.exit_code == 1 and "--bins expects" in result.output
    result = run(*base, "--tracks", "0", "--bins", "900")
    assert result.exit_code == 1 and "bins must be" in result.output


def test_contrib_and_its_plot_name_the_contig_and_the_tracks_as_given(tmp_path, fast_model):
    """The FASTA calls chr1 '1'; the user says chr1: so do the files and the figures. 638 CAGE tracks are
    summarised in the title; a --from-h5 file is plotted only under its own region."""
    result = run("contrib", "chr1:604300-604400", "--fasta", FASTA, "--model", fast_model, "--device", "cpu",
                 "--tracks", "^CAGE:", "-o", tmp_path / "c")
    assert result.exit_code == 0 and "638 tracks" in result.output, result.output
    lines = (tmp_path / "c.bedGraph").read_text().splitlines()
    assert 'name="chr1:604300-604400"' in lines[0] and {line.split("\t")[0] for line in lines[1:]} == {"chr1"}
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert (f.attrs["chrom"], f.attrs["fasta_chrom"], f.attrs["region_name"]) == ("chr1", "1", "chr1:604300-604400")
        assert len(f["target_ids"]) == 638 and all(t.startswith(b"CAGE:") for t in f["target_labels"][:])
        assert_provenance(f.attrs, fast_model, FASTA, command="contrib", region="chr1:604300-604400",
                          tracks="^CAGE:", bins=None, organism="human")
        scores = f["contribution"][:]
    label = f"fast.safetensors (sha256 {sha256(fast_model)[:12]})"

    computed = plot_contrib_job("chr1:604300-604400", FASTA, tmp_path / "c.png",
                                ModelChoice(model=str(fast_model), device="cpu", tracks="^CAGE:"))
    assert computed.get_suptitle() == f"chr1:604300-604400: gradient x input for 638 CAGE tracks\nmodel: {label}"
    assert [ax.get_xlabel() for ax in computed.axes] == ["chr1 position (bp, 1-based)"] * 2
    assert [ax.get_title(loc="left") for ax in computed.axes] == ["chr1:506,046-702,653", "chr1:604,300-604,400"]

    # the same region under the FASTA's name is the file's region; labels follow this command's name
    drawn = plot_contrib_job("1:604,300-604,400", FASTA, tmp_path / "h.png", ModelChoice(), from_h5=tmp_path / "c.h5")
    assert drawn.get_suptitle() == f"1:604300-604400: gradient x input for 638 CAGE tracks (from c.h5)\nmodel: {label}"
    assert drawn.axes[0].get_xlabel() == "1 position (bp, 1-based)"
    np.testing.assert_array_equal(drawn.axes[0].get_lines()[0].get_ydata(), scores)

    for other in ("chr1:604300-604500", "chr1:700000-700100"):
        result = run("plot", "contrib", other, "--fasta", FASTA, "--from-h5", tmp_path / "c.h5",
                     "-o", tmp_path / "x.png")
        one_line_error(result, "holds the contribution scores of chr1:604300-604400", f"not of {other}")
    assert not (tmp_path / "x.png").exists()
    assert run("predict", "chr1:604300-604400", "--fasta", FASTA, "--model", fast_model, "--device", "cpu",
               "--tracks", "0", "-o", tmp_path / "p.h5").exit_code == 0
    result = run("plot", "contrib", "chr1:604300-604400", "--fasta", FASTA, "--from-h5", tmp_path / "p.h5",
                 "-o", tmp_path / "x.png")
    one_line_error(result, "p.h5 is not an output of `enformer-score contrib`")


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


def test_plot_variant_from_a_scores_run_shows_its_strongest_tracks(tmp_path, fast_model, scored, monkeypatch):
    with h5py.File(scored / "six.chr1.h5", "r") as f:
        pos, ref, alt = int(f["pos"][2]), f["ref"][2].decode(), f["alt"][2].decode()
        sad = f["SAD"][2].astype(np.float32)
        labels = [t.decode() for t in f["target_labels"][:]]
        ids = [t.decode() for t in f["target_ids"][:]]
    strongest = np.argsort(-np.abs(sad), kind="stable")[:3]
    # another default model now: the figure must still use the run's (recorded in it, and at hand)
    other = tmp_path / "other.safetensors"
    perturbed_copy(fast_model, other)
    monkeypatch.setenv("ENFORMER_VEP_MODEL", str(other))
    figure = plot_variant_job(f"chr1:{pos}", FASTA, tmp_path / "v.png", ModelChoice(device="cpu"),
                              scores_dir=scored, top=3)
    assert len(figure.axes) == 6
    assert [figure.axes[2 * k].get_title(loc="left") for k in range(3)] == [labels[i] for i in strongest]
    assert [figure.axes[2 * k].get_title(loc="right") for k in range(3)] == [
        f"{ids[i]}   SAD {float(sad[i]):+.3g}, rank {rank} of 5313" for rank, i in enumerate(strongest, 1)]
    assert figure.axes[-1].get_xlim()[0] < pos < figure.axes[-1].get_xlim()[1]
    # the ID is '.', so the title names the variant once, then the model
    assert figure.get_suptitle() == (f"chr1:{pos} {ref}>{alt}\n"
                                     f"model: fast.safetensors (sha256 {sha256(fast_model)[:12]})")
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run's predictions: the same model, the same numbers (SAD = sum over bins of alt - ref); the run stores
    # float16 (half an ulp, <= 2^-11 of the value), float32 sums of 896 bins in other batches: measured 1.5e-4
    # of the value, all of it float16's
    for k, i in enumerate(strongest):
        delta = [line for line in figure.axes[2 * k + 1].get_lines() if line.get_label() == "alt - ref"][0]
        assert float(np.sum(delta.get_ydata()[:-1])) == pytest.approx(float(sad[i]), rel=2**-10, abs=1e-5)


def perturbed_copy(model, path):
    """Other weights of the same shape: ``model`` with one tensor changed."""
    from safetensors.torch import load_file

    state = load_file(str(model))
    name = next(k for k in state if k.endswith("weight"))
    state[name] = state[name] + 0.5
    save_native(state, path)
    return path


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory, fast_model):
    """A finished run of the first two GIAB records scored with a copy of the fast model that has since been
    moved (so the run's recorded source is gone), the moved copy and other weights."""
    lines = (DATA / "grch38_chr1_giab_hg002" / "input.vcf").read_text().splitlines(keepends=True)
    tmp = tmp_path_factory.mktemp("moved")
    (tmp / "two.vcf").write_text("".join([x for x in lines if x.startswith("#")]
                                         + [x for x in lines if not x.startswith("#")][:2]))
    shutil.copyfile(fast_model, tmp / "weights.safetensors")
    result = run(tmp / "two.vcf", "--fasta", FASTA, "--model", tmp / "weights.safetensors", "--device", "cpu",
                 "-o", tmp / "out")
    assert result.exit_code == 0, result.output
    (tmp / "weights.safetensors").rename(tmp / "moved.safetensors")
    return tmp / "out", tmp / "moved.safetensors", perturbed_copy(fast_model, tmp / "other.safetensors")


def test_plot_variant_predicts_with_the_runs_model_or_refuses(tmp_path, moved_run, monkeypatch):
    out, moved, other = moved_run
    monkeypatch.delenv("ENFORMER_VEP_MODEL", raising=False)
    base = ["plot", "variant", "chr1:604358", "--scores", out, "--fasta", FASTA, "--device", "cpu", "--top", "1"]
    wanted = sha256(moved)
    recorded = f"{out.parent / 'weights.safetensors'}, sha256 {wanted[:12]}"
    one_line_error(run(*base, "-o", tmp_path / "a.png"), f"the model {out} was scored with ({recorded})",
                   "those weights are not at hand here: pass those weights with --model")
    one_line_error(run(*base, "--model", other, "-o", tmp_path / "a.png"),
                   f"--model {other} (sha256 {sha256(other)[:12]}) is not the model {out} was scored with")
    monkeypatch.setenv("ENFORMER_VEP_MODEL", str(other))  # a default that is not the run's model
    one_line_error(run(*base, "-o", tmp_path / "a.png"), f"{other} has sha256 {sha256(other)[:12]}")
    assert not (tmp_path / "a.png").exists()

    for choice in (ModelChoice(model=str(moved), device="cpu"), ModelChoice(device="cpu")):
        monkeypatch.setenv("ENFORMER_VEP_MODEL", str(moved))  # the run's weights, found by their checksum
        figure = plot_variant_job("chr1:604358", FASTA, tmp_path / "b.png", choice, scores_dir=out, top=1)
        assert figure.get_suptitle().endswith(f"model: moved.safetensors (sha256 {wanted[:12]})")


def test_plot_variant_checks_ref_against_the_fasta(tmp_path, fast_model):
    base = ["--fasta", FASTA, "--model", fast_model, "--device", "cpu", "--tracks", "0"]
    one_line_error(run("plot", "variant", "chr1:604358:A:C", *base, "-o", tmp_path / "x.png"),
                   f"REF A of chr1:604358 does not match {FASTA}, which has G there")
    one_line_error(run("plot", "variant", "chr1:604358:GTC:G", *base, "-o", tmp_path / "x.png"),
                   "which has GGT there")
    one_line_error(run("plot", "variant", "chr1:604358:G:<DEL>", *base, "-o", tmp_path / "x.png"),
                   "ALT '<DEL>' of chr1:604358:G:<DEL>: plot variant takes alleles of A, C, G, T and N")
    assert not (tmp_path / "x.png").exists()
    result = run("plot", "variant", "chr1:604358:g:c", *base, "-o", tmp_path / "ok.png")  # case-insensitive
    assert result.exit_code == 0, result.output


def test_plot_variant_of_an_insertion_next_to_an_assembly_gap(tmp_path, fast_model, scored):
    """chr1:602113 T>TGCCCA (5 bp inserted); the bins reach into the N run of GRCh38 chr1 ending at 585,988."""
    pyfaidx = from_test_extra("pyfaidx")

    figure = plot_variant_job("chr1:602113", FASTA, tmp_path / "ins.png", ModelChoice(device="cpu"),
                              scores_dir=scored, top=2)
    assert figure.get_suptitle().splitlines()[0] == "chr1:602113 T>TGCCCA"
    caption = " ".join(figure.get_supxlabel().split())
    assert "5-bp insertion" in caption and "lie 5 bp off the reference's (hatched)" in caption
    assert "Grey: N" in caption
    first = 602_113 - 57_344  # 0-based start of bin 0
    bases = str(pyfaidx.Fasta(str(FASTA))["1"][first:first + 114_688])
    last_n = first + bases.rindex("N") + 1  # 0-based end of the N run
    assert bases[0] == "N" and "N" not in bases[last_n - first:]
    for k in range(2):
        top, bottom = figure.axes[2 * k], figure.axes[2 * k + 1]
        for ax in (top, bottom):
            (gap,) = [p for p in ax.patches if p.get_label() == "N (no sequence)"]
            assert (gap.get_x(), gap.get_x() + gap.get_width()) == (first + 0.5, last_n + 0.5)
        (hatched,) = [p for p in bottom.patches if p.get_hatch()]
        assert hatched.get_x() == 602_113 + 0.5  # from the first bin right of the variant's
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["ref", "alt", "variant", "alt > ref", "alt < ref", "N (no sequence)",
                      "alt bins 5 bp off the ref bins"]


def test_plot_commands_write_the_files(tmp_path, fast_model, scored):
    base = ["--fasta", FASTA, "--model", fast_model, "--device", "cpu"]
    result = run("plot", "variant", "chr1:604358:G:C", *base, "--tracks", "0-2", "-o", tmp_path / "v.pdf")
    assert result.exit_code == 0 and "6 panels" in result.output, result.output
    assert (tmp_path / "v.pdf").read_bytes()[:5] == b"%PDF-"
    result = run("plot", "contrib", "chr1:604300-604400", *base, "--tracks", "4675", "-o", tmp_path / "c.png")
    assert result.exit_code == 0 and "2 panels" in result.output, result.output
    result = run("plot", "contrib", "chr1:500000-600000", *base, "--tracks", "4675", "-o", tmp_path / "wide.png")
    assert result.exit_code == 0 and "1 panel" in result.output, result.output
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
    # written with 6 decimals (5e-7) from float64 sums of the same float32 predictions: measured 4.4e-7
    np.testing.assert_allclose([float(r[-1]) for r in rows], want, rtol=0, atol=1e-6)
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
