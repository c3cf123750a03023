"""README's command options that no other test checks by value, exercised through `enformer-score` (in-process
CliRunner) and checked against independent expectations: direct model calls on
windows cut here from the FASTA text, gradients taken here with torch, plain numpy, h5py reads, the TF-written
Basenji2 sample (`expected.npz`), the official fixture weights and enformer-pytorch's own tensors.

Covered: `merge --overwrite`; `predict`/`contrib` with `--organism mouse`, `--targets`, `--batch-size`, `--bins`;
`plot variant` (drawn curves, `--top`, the 50-track limit); `plot contrib` (`--bins`, `--from-h5`); `pca --stat`,
`--transform`, `--max-rows`; `train --bf16` (CPU), `--clip-grad-norm`, two `--data` heads, `--shuffle-buffer`;
`evaluate --max-batches`, `--tracks`, `--head`, `--targets`; `convert` from the archive, Sonnet, enformer-pytorch and
native forms. (The SLURM example's `afterok` chaining: tests/test_slurm_examples.py.)"""
import gzip
import json
import os
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import DATA, from_test_extra, load_fixture_weights, relative_error
from safetensors.numpy import load_file
from safetensors.torch import save_model
from test_pca import reference_pca, table, write_done

from enformer_vep import jobs
from enformer_vep.cli import cli
from enformer_vep.model import Enformer
from enformer_vep.plots import BASE_COLORS
from enformer_vep.weights import load_model, save_native

pyfaidx = from_test_extra("pyfaidx")
enformer_pytorch = from_test_extra("enformer_pytorch")

GIAB = DATA / "grch38_chr1_giab_hg002"
FASTA = GIAB / "reference.fa"
BASENJI = DATA / "basenji2_tf_sample"
MOUSE_TABLE = Path(jobs.__file__).parent / "data" / "targets_mouse.txt"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "slurm"
WINDOW, HALF = 393_216, 196_608

# The two-head model's human head has 7 tracks of our own: described by this table (--targets).
HUMAN_TABLE = [("H0", "DNASE:own a"), ("H1", "CAGE:own b"), ("H2", "CHIP:own c"), ("H3", "CAGE:own d"),
               ("H4", "ATAC:own e"), ("H5", "DNASE:own f"), ("H6", "CAGE:own g")]
HUMAN_CAGE = [1, 3, 6]
BED_LINES = ["chr1\t602000\t605000\tmiddle", "1\t850000\t851000\tnear_end"]
CENTRES = [603_500, 850_500]  # (start0 + end) // 2
VARIANT = (604_358, "G", "C")  # chr1, GIAB's second record
CONTRIB_REGION, CONTRIB_CENTRE, CONTRIB_BINS = "chr1:604300-604400", (604_299 + 604_400) // 2, [440, 441, 450]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *parts):
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for part in parts:
        assert part in result.output, result.output


def mouse_table():
    """(identifiers, descriptions) of the released mouse track table, read by hand."""
    rows = [line.split("\t") for line in MOUSE_TABLE.read_text().splitlines()[1:]]
    return [r[2] for r in rows], [r[7] for r in rows]


def onehot(text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode(), np.uint8)
    return (codes[:, None] == np.frombuffer(b"ACGT", np.uint8)[None]).astype(np.float32)


@pytest.fixture(scope="module")
def chr1():
    """GRCh38 chr1 of the slice (its FASTA calls it '1') as one upper-case string, read with pyfaidx."""
    return str(pyfaidx.Fasta(str(FASTA))["1"][:]).upper()


def window_text(chr1: str, start: int) -> str:
    """The 393,216 bases from 0-based ``start``, N past the contig's ends (string slicing)."""
    end = start + WINDOW
    text = "N" * max(0, -start) + chr1[max(start, 0):min(end, len(chr1))] + "N" * max(0, end - len(chr1))
    assert len(text) == WINDOW
    return text


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory, tiny_enformer):
    """A tiny random model with our own 7-track human head and the released 1643-track mouse head: its
    native file, the model itself (eval mode) and a track table for the human head."""
    model = tiny_enformer(seed=21, channels=12, pooling="max", conv_filters=[6, 6, 6, 6, 8, 12],
                          heads={"human": 7, "mouse": 1643})
    root = tmp_path_factory.mktemp("two_heads")
    save_native(model.state_dict(),
                root / "two_heads.safetensors")
    (root / "human_table.tsv").write_text("index\tidentifier\tdescription\n"
                                          + "".join(f"{i}\t{t}\t{d}\n" for i, (t, d) in enumerate(HUMAN_TABLE)))
    return root / "two_heads.safetensors", model, root / "human_table.tsv"


# --- predict: --organism mouse, --targets, --batch-size ----------------------------------------------


@pytest.fixture(scope="module")
def region_predictions(two_heads, chr1):
    """Both heads' predictions for the two BED regions' windows, by one direct model call."""
    _, model, _ = two_heads
    x = torch.from_numpy(np.stack([onehot(window_text(chr1, c - HALF)) for c in CENTRES]))
    with torch.inference_mode():
        return {head: values.numpy() for head, values in model.predict(x).items()}


@pytest.fixture
def batches_seen(monkeypatch):
    """The batch sizes of the model's forward passes during a command (Enformer.predict_tracks wrapped)."""
    seen, original = [], Enformer.predict_tracks

    def counting(self, x, *args, **kwargs):
        seen.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(Enformer, "predict_tracks", counting)
    return seen


def test_predict_mouse_head_with_either_batch_size_equals_direct_model_calls(tmp_path, two_heads, region_predictions,
                                                                           batches_seen):
    """`predict --organism mouse --tracks '^CAGE:'`: the mouse head's CAGE columns (found in the released mouse table
    read by hand) equal a direct model call on windows cut from the FASTA text; `--batch-size 1` and `2` run the two
    regions in passes of that size and agree with each other and with the direct call to float32 rounding."""
    path, _, _ = two_heads
    bed = tmp_path / "regions.bed"
    bed.write_text("\n".join(BED_LINES) + "\n")
    ids, labels = mouse_table()
    cage = [i for i, label in enumerate(labels) if label.startswith("CAGE:")]
    assert len(cage) == 357
    got = {}
    for batch_size, passes in ((1, [1, 1]), (2, [2])):
        batches_seen.clear()
        result = run("predict", bed, "--fasta", FASTA, "--model", path, "--device", "cpu", "--organism", "mouse",
                     "--tracks", "^CAGE:", "--batch-size", batch_size, "-o", tmp_path / f"p{batch_size}.h5")
        assert result.exit_code == 0, result.output
        assert batches_seen == passes
        with h5py.File(tmp_path / f"p{batch_size}.h5", "r") as f:
            assert [t.decode() for t in f["target_ids"][:]] == [ids[i] for i in cage]
            assert [t.decode() for t in f["target_labels"][:]] == [labels[i] for i in cage]
            assert json.loads(f.attrs["options"])["organism"] == "mouse"
            got[batch_size] = f["predictions"][:]
        for i in range(2):
            assert relative_error(got[batch_size][i], region_predictions["mouse"][i][:, cage]) <= 1e-5
    assert relative_error(got[1], got[2]) <= 1e-6


def test_predict_with_a_track_table_of_our_own(tmp_path, two_heads, region_predictions):
    """`--targets TABLE` names a head that differs from the released one: `--tracks '^CAGE:'` is searched in that
    table's descriptions (rows 1, 3, 6 by hand), the file names the tracks as the table does, and the values are the
    human head's columns of a direct model call. Without the table the 7-track head is refused."""
    path, _, human_table = two_heads
    result = run("predict", "chr1:602001-605000", "--fasta", FASTA, "--model", path, "--device", "cpu",
                 "--targets", human_table, "--tracks", "^CAGE:", "-o", tmp_path / "own.h5")
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "own.h5", "r") as f:
        assert [t.decode() for t in f["target_ids"][:]] == [HUMAN_TABLE[i][0] for i in HUMAN_CAGE]
        assert [t.decode() for t in f["target_labels"][:]] == [HUMAN_TABLE[i][1] for i in HUMAN_CAGE]
        assert relative_error(f["predictions"][0], region_predictions["human"][0][:, HUMAN_CAGE]) <= 1e-5
    one_line_error(run("predict", "chr1:602001-605000", "--fasta", FASTA, "--model", path, "--device", "cpu",
                       "-o", tmp_path / "x.h5"), "head has 7 tracks but the track table has 5313", "--targets")
    assert not (tmp_path / "x.h5").exists()


# --- contrib and plot contrib: --organism mouse, --bins, --from-h5 ------------------------------------


@pytest.fixture(scope="module")
def mouse_contributions(two_heads, chr1):
    """Gradient x input, taken here with torch: the objective is the mean of the mouse head's CAGE columns over
    CONTRIB_BINS for the window centred on CONTRIB_REGION; the scores cover the central 196,608 bp."""
    _, model, _ = two_heads
    _, labels = mouse_table()
    cage = [i for i, label in enumerate(labels) if label.startswith("CAGE:")]
    x = torch.from_numpy(onehot(window_text(chr1, CONTRIB_CENTRE - HALF)))[None].requires_grad_(True)
    objective = model(x)["mouse"][0][CONTRIB_BINS][:, cage].mean()
    (gradient,) = torch.autograd.grad(objective, x)
    scores = (gradient * x).sum(-1)[0, HALF // 2:-HALF // 2].detach().numpy()
    positions = CONTRIB_CENTRE - HALF // 2 + np.arange(HALF)
    return positions, scores, float(objective.detach())


def test_contrib_of_the_mouse_head_over_chosen_bins_is_the_gradient_taken_here(tmp_path, two_heads,
                                                                               mouse_contributions):
    """`contrib --organism mouse --tracks '^CAGE:' --bins 440-441,450`: per base the gradient of the mean over those
    bins and the mouse CAGE columns, times the input, as torch computes it here on the window cut from the FASTA."""
    path, _, _ = two_heads
    positions, scores, objective = mouse_contributions
    result = run("contrib", CONTRIB_REGION, "--fasta", FASTA, "--model", path, "--device", "cpu", "--organism",
                 "mouse", "--tracks", "^CAGE:", "--bins", "440-441,450", "-o", tmp_path / "c")
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f.attrs["head"] == "mouse" and f.attrs["bins"].tolist() == CONTRIB_BINS
        np.testing.assert_array_equal(f["position"][:], positions)
        assert relative_error(f["contribution"][:], scores) <= 1e-5
        assert f.attrs["objective"] == pytest.approx(objective, rel=1e-5)
    assert np.count_nonzero(scores) > 100_000


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot commands build, kept as the command saves them (jobs.save_figure wrapped)."""
    figures, original = [], jobs.save_figure

    def keep(figure, path):
        figures.append(figure)
        original(figure, path)

    monkeypatch.setattr(jobs, "save_figure", keep)
    return figures


def test_plot_contrib_draws_the_gradient_over_the_chosen_bins(tmp_path, two_heads, mouse_contributions, drawn):
    """`plot contrib --organism mouse --tracks '^CAGE:' --bins 440-441,450`: the whole-window curve and the per-base
    bars of the 101-bp region are the gradient x input computed here (1-based x)."""
    path, _, _ = two_heads
    positions, scores, _ = mouse_contributions
    result = run("plot", "contrib", CONTRIB_REGION, "--fasta", FASTA, "--model", path, "--device", "cpu",
                 "--organism", "mouse", "--tracks", "^CAGE:", "--bins", "440-441,450", "-o", tmp_path / "c.png")
    assert result.exit_code == 0 and "2 panels" in result.output, result.output
    (figure,) = drawn
    whole, zoom = figure.axes
    (line,) = [line for line in whole.get_lines() if len(line.get_xdata()) == HALF]
    np.testing.assert_array_equal(line.get_xdata(), positions + 1)
    assert relative_error(line.get_ydata(), scores) <= 1e-5
    inside = slice(604_299 - positions[0], 604_400 - positions[0])
    assert len(zoom.patches) == 101
    assert relative_error([bar.get_height() for bar in zoom.patches], scores[inside]) <= 1e-5
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_contrib_from_h5_draws_the_files_scores(tmp_path, drawn):
    """`plot contrib --from-h5`: a contrib file written here by hand (random scores and bases) is drawn as it is:
    the curve is its scores, the region's bars are its scores coloured by its bases, the title names its tracks."""
    rng = np.random.default_rng(4)
    positions = 604_000 + np.arange(1_000, dtype=np.int64)
    scores = rng.normal(size=1_000).astype(np.float32)
    bases = rng.choice(list("ACGT"), 1_000)
    with h5py.File(tmp_path / "hand.h5", "w") as f:
        f["position"], f["contribution"] = positions, scores
        f["sequence"] = np.array(bases, dtype="S1")
        f["target_labels"] = np.array([b"CAGE:liver", b"DNASE:lung"])
        f.attrs.update({"chrom": "chr1", "region_start": 604_299, "region_end": 604_400, "tracks": [3, 9]})
    result = run("plot", "contrib", CONTRIB_REGION, "--fasta", FASTA, "--from-h5", tmp_path / "hand.h5",
                 "-o", tmp_path / "h.pdf")
    assert result.exit_code == 0 and "2 panels" in result.output, result.output
    (figure,) = drawn
    assert figure.get_suptitle() == f"{CONTRIB_REGION}: gradient x input for CAGE:liver; DNASE:lung (from hand.h5)"
    whole, zoom = figure.axes
    (line,) = [line for line in whole.get_lines() if len(line.get_xdata()) == 1_000]
    np.testing.assert_array_equal(line.get_xdata(), positions + 1)
    np.testing.assert_array_equal(line.get_ydata(), scores)
    np.testing.assert_array_equal([bar.get_height() for bar in zoom.patches], scores[299:400])
    for bar, base in zip(zoom.patches, bases[299:400], strict=True):
        colour = BASE_COLORS[base]
        assert bar.get_facecolor()[:3] == pytest.approx([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    assert (tmp_path / "h.pdf").read_bytes()[:5] == b"%PDF-"


# --- plot variant: the drawn curves, --top, the 50-track limit ----------------------------------------


@pytest.fixture(scope="module")
def variant_predictions(two_heads, chr1):
    """The mouse head's predictions [896, 1643] for the reference and the alternative window of chr1:604358 G>C, cut
    from the FASTA text here (window [POS - 196,608, POS + 196,608), the base at offset 196,607 replaced)."""
    _, model, _ = two_heads
    pos, ref, alt = VARIANT
    reference = window_text(chr1, pos - HALF)
    assert reference[HALF - 1] == ref
    alternative = reference[:HALF - 1] + alt + reference[HALF:]
    with torch.inference_mode():
        out = model.predict(torch.from_numpy(np.stack([onehot(reference), onehot(alternative)])))["mouse"].numpy()
    assert np.abs(out[1] - out[0]).max() > 1e-3 * np.abs(out[0]).max()  # the SNV moves the predictions
    return out[0], out[1]


def line_data(ax, label):
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return np.asarray(line.get_ydata()[:-1], dtype=np.float64)  # steps: the last value is repeated


def shows_label(title: str, label: str) -> bool:
    """A panel title shows a track description, cut with '...' where it is too long for the panel."""
    return title == label or (title.endswith("...") and label.startswith(title[:-3]) and len(title) > 20)


def assert_curves(figure, columns, ref, alt):
    """Each track's panels draw the direct call's ref and alt predictions and their difference."""
    assert len(figure.axes) == 2 * len(columns)
    for k, column in enumerate(columns):
        top, bottom = figure.axes[2 * k], figure.axes[2 * k + 1]
        assert relative_error(line_data(top, "ref"), ref[:, column]) <= 1e-5
        assert relative_error(line_data(top, "alt"), alt[:, column]) <= 1e-5
        difference = alt[:, column].astype(np.float64) - ref[:, column]
        assert np.abs(line_data(bottom, "alt - ref") - difference).max() <= 1e-5 * np.abs(ref[:, column]).max()


def test_plot_variant_draws_the_models_ref_and_alt_predictions(tmp_path, two_heads, variant_predictions, drawn):
    """`plot variant CHR:POS:REF:ALT --organism mouse --tracks 5,100,1000`: the drawn ref and alt curves are the
    direct model call's predictions of the two windows cut here, each panel titled with the table's description
    (left) and identifier (right)."""
    path, _, _ = two_heads
    ref, alt = variant_predictions
    ids, labels = mouse_table()
    result = run("plot", "variant", "chr1:604358:G:C", "--fasta", FASTA, "--model", path, "--device", "cpu",
                 "--organism", "mouse", "--tracks", "5,100,1000", "-o", tmp_path / "v.png")
    assert result.exit_code == 0 and "6 panels" in result.output, result.output
    (figure,) = drawn
    assert_curves(figure, [5, 100, 1000], ref, alt)
    assert all(shows_label(figure.axes[2 * k].get_title(loc="left"), labels[i]) for k, i in enumerate((5, 100, 1000)))
    assert [figure.axes[2 * k].get_title(loc="right") for k in range(3)] == [ids[i] for i in (5, 100, 1000)]


def test_plot_variant_top_tracks_of_a_scores_run(tmp_path, two_heads, variant_predictions, drawn):
    """`plot variant ID --scores RUN --top 3`: the three tracks of largest |SAD| in the run's file (read with h5py,
    ranked with numpy), drawn with the run's model: the curves are the direct call's predictions of those columns."""
    path, _, _ = two_heads
    ref, alt = variant_predictions
    _, labels = mouse_table()
    header = [line for line in (GIAB / "input.vcf").read_text().splitlines(keepends=True) if line.startswith("#")]
    (tmp_path / "one.vcf").write_text("".join(header) + "chr1\t604358\trs_opt1\tG\tC\t50\tPASS\t.\tGT\t0/1\n")
    result = run(tmp_path / "one.vcf", "--fasta", FASTA, "--model", path, "--device", "cpu", "--organism", "mouse",
                 "--tracks", "0-39", "--stats", "SAD", "--no-progress", "-o", tmp_path / "run")
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "run" / "one.chr1.h5", "r") as f:
        sad = f["SAD"][0].astype(np.float32)
        assert [t.decode() for t in f["target_ids"][:]] == mouse_table()[0][:40]
    strongest = np.argsort(-np.abs(sad), kind="stable")[:3].tolist()
    result = run("plot", "variant", "rs_opt1", "--scores", tmp_path / "run", "--fasta", FASTA, "--device", "cpu",
                 "--organism", "mouse", "--top", "3", "-o", tmp_path / "top.png")
    assert result.exit_code == 0 and "6 panels" in result.output, result.output
    (figure,) = drawn
    assert all(shows_label(figure.axes[2 * k].get_title(loc="left"), labels[i]) for k, i in enumerate(strongest))
    assert_curves(figure, strongest, ref, alt)
    assert figure.get_suptitle().startswith("rs_opt1   chr1:604358 G>C")


def test_plot_variant_refuses_more_than_50_tracks(tmp_path, two_heads):
    """At most 50 tracks: `--tracks 0-50` (51) is refused with a one-line error naming the limit, `--top 51` by the
    option's range; neither writes a figure."""
    path, _, _ = two_heads
    base = ["plot", "variant", "chr1:604358:G:C", "--fasta", FASTA, "--model", path, "--device", "cpu",
            "--organism", "mouse", "-o", tmp_path / "x.png"]
    one_line_error(run(*base, "--tracks", "0-50"), "51 tracks", "at most 50")
    result = run(*base, "--top", "51")
    assert result.exit_code == 2 and "--top" in result.output and "1<=x<=50" in result.output, result.output
    assert not (tmp_path / "x.png").exists()


# --- merge --overwrite ---------------------------------------------------------------------------------


def test_merge_overwrite_replaces_a_different_earlier_result(tmp_path, two_heads):
    """OUT holds the merge of a SAD run's two shards; merging a SAR run's shards there is refused (OUT unchanged),
    and with --overwrite OUT then holds the SAR run: its rows are the two shard files' rows read with h5py, in order,
    and nothing of the SAD run is left."""
    path, _, _ = two_heads
    lines = (GIAB / "input.vcf").read_text().splitlines(keepends=True)
    body = [line for line in lines if not line.startswith("#")][1:3]  # chr1:604358 G>C, chr1:604360 T>C
    (tmp_path / "two.vcf").write_text("".join([line for line in lines if line.startswith("#")] + body))
    for stats in ("SAD", "SAR"):
        for k in (1, 2):
            result = run(tmp_path / "two.vcf", "--fasta", FASTA, "--model", path, "--device", "cpu", "--organism",
                         "mouse", "--tracks", "0-3", "--stats", stats, "--checkpoint-every", "1", "--shard", f"{k}/2",
                         "--no-progress", "-o", tmp_path / f"{stats}{k}")
            assert result.exit_code == 0, result.output
    out = tmp_path / "merged"
    assert run("merge", tmp_path / "SAD1", tmp_path / "SAD2", "-o", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    one_line_error(run("merge", tmp_path / "SAR1", tmp_path / "SAR2", "-o", out),
                   "holds a finished run made with other settings", '--stats: ["SAD"] -> ["SAR"]', "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    result = run("merge", tmp_path / "SAR1", tmp_path / "SAR2", "-o", out, "--overwrite")
    assert result.exit_code == 0 and "merged 2 shards: 2 rows into 1 file" in result.output, result.output
    shards = [h5py.File(tmp_path / f"SAR{k}" / "two.chr1.h5", "r") for k in (1, 2)]
    with h5py.File(out / "two.chr1.h5", "r") as f:
        assert "SAD" not in f and f["pos"][:].tolist() == [604_358, 604_360]
        np.testing.assert_array_equal(f["SAR"][:], np.concatenate([s["SAR"][:] for s in shards]))
        assert [a.decode() for a in f["alt"][:]] == ["C", "C"]
    for shard in shards:
        shard.close()
    assert json.loads((out / "run.json").read_text())["options"]["stats"] == ["SAR"]
    done = json.loads((out / "done.json").read_text())
    assert done["summary"]["scored"] == 2 and (out / "two.chr1.h5").read_bytes() != before["two.chr1.h5"]


# --- pca: --stat, --transform, --max-rows ----------------------------------------------------------------

PCA_IDS = [f"T{i:02d}" for i in range(12)]
PCA_SIZES = {"chr1": 40, "chr2": 25}


@pytest.fixture(scope="module")
def pca_run(tmp_path_factory):
    """A finished run's directory written by hand: run.json, p.CHROM.h5 with SAD and SAR of different low-rank
    structure over 12 tracks (float16), done.json. Returns the directory and the SAD and SAR rows of both files."""
    directory = tmp_path_factory.mktemp("pca_run")
    rng = np.random.default_rng(8)
    (directory / "run.json").write_text(json.dumps({"vcf": "in.vcf", "options": {}}))
    rows = {"SAD": [], "SAR": []}
    for chrom, n in PCA_SIZES.items():
        pos = np.sort(rng.choice(np.arange(1_000, 900_000), n, replace=False))
        sad = (rng.normal(size=(n, 2)) * [5, 2]) @ rng.normal(size=(2, 12)) + 0.2 * rng.normal(size=(n, 12)) + 1
        sar = (rng.normal(size=(n, 3)) * [3, 1, 0.5]) @ rng.normal(size=(3, 12)) + 0.1 * rng.normal(size=(n, 12))
        with h5py.File(directory / f"p.{chrom}.h5", "w") as f:
            f["snp"] = np.array([f"rs_{chrom}_{i}" for i in range(n)], dtype="S")
            f["chr"] = np.array([chrom] * n, dtype="S")
            f["pos"] = pos.astype(np.uint32)
            f["ref"], f["alt"] = np.array(["A"] * n, dtype="S"), np.array(["G"] * n, dtype="S")
            f["SAD"], f["SAR"] = sad.astype(np.float16), sar.astype(np.float16)
            f["target_ids"] = np.array(PCA_IDS, dtype="S")
            f["target_labels"] = np.array([f"CAGE:{t}" for t in PCA_IDS], dtype="S")
            f["ref_allele"], f["alt_allele"] = h5py.SoftLink("/ref"), h5py.SoftLink("/alt")
            rows["SAD"].append(f["SAD"][:].astype(np.float64))
            rows["SAR"].append(f["SAR"][:].astype(np.float64))
    write_done(directory, PCA_SIZES)
    return directory, {name: np.concatenate(parts) for name, parts in rows.items()}


def pc_values(out: Path) -> np.ndarray:
    """The PC columns of both tables, in file order (chr1 then chr2)."""
    return np.array([line[5:] for chrom in PCA_SIZES for line in table(out / f"p.{chrom}.pc.tsv.gz")], dtype=float)


def test_pca_of_sar(tmp_path, pca_run):
    """`pca --stat SAR`: pca.npz and the tables are numpy's SVD of the centred SAR matrix (not of SAD)."""
    directory, rows = pca_run
    result = run("pca", directory, "-o", tmp_path / "out", "--stat", "SAR", "--components", "3", "--no-progress")
    assert result.exit_code == 0 and "PC0..PC2 of SAR" in result.output, result.output
    mean, components, variance, _, coords = reference_pca(rows["SAR"], 3)
    with np.load(tmp_path / "out" / "pca.npz") as z:
        assert str(z["stat"]) == "SAR" and z["target_ids"].tolist() == PCA_IDS
        np.testing.assert_allclose(z["mean"], mean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(z["components"], components, rtol=0, atol=1e-8)
        np.testing.assert_allclose(z["explained_variance"], variance, rtol=1e-9)
        assert np.abs(z["components"][0] - reference_pca(rows["SAD"], 3)[1][0]).max() > 0.1
    np.testing.assert_allclose(pc_values(tmp_path / "out"), coords, rtol=1e-5, atol=1e-5)


def test_pca_transform_applies_a_saved_fit_as_numpy_projects(tmp_path, pca_run):
    """`pca --transform FIT.npz --components 2`: a transform of SAR written here by hand (random mean, orthonormal
    components from numpy's QR) gives tables whose PCs are (SAR - mean) . components[:2] in numpy; no fit is written."""
    directory, rows = pca_run
    rng = np.random.default_rng(2)
    components = np.linalg.qr(rng.normal(size=(12, 4)))[0].T
    mean = rng.normal(size=12)
    np.savez(tmp_path / "fit.npz", mean=mean, components=components, explained_variance=np.array([4.0, 3, 2, 1]),
             explained_variance_ratio=np.array([0.4, 0.3, 0.2, 0.1]), target_ids=np.array(PCA_IDS),
             stat=np.array("SAR"), rows=np.int64(99))
    result = run("pca", directory, "-o", tmp_path / "out", "--transform", tmp_path / "fit.npz", "--components", "2",
                 "--no-progress")
    assert result.exit_code == 0 and "PC0..PC1 of SAR" in result.output, result.output
    with gzip.open(tmp_path / "out" / "p.chr1.pc.tsv.gz", "rt") as f:
        assert f.readline() == "#CHROM\tPOS\tID\tREF\tALT\tPC0\tPC1\n"
    np.testing.assert_allclose(pc_values(tmp_path / "out"), (rows["SAR"] - mean) @ components[:2].T,
                               rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "out" / "pca.npz").exists()


def test_pca_max_rows_fits_on_evenly_spaced_variants(tmp_path, pca_run):
    """`pca --max-rows 10`: the fit is numpy's SVD of 10 evenly spaced rows of the 65 (row i * 65 // 10), and every
    variant is projected on it."""
    directory, rows = pca_run
    result = run("pca", directory, "-o", tmp_path / "out", "--max-rows", "10", "--components", "3", "--no-progress")
    assert result.exit_code == 0 and "65 variants" in result.output, result.output
    chosen = rows["SAD"][np.arange(10) * 65 // 10]
    mean, components, variance, _, _ = reference_pca(chosen, 3)
    with np.load(tmp_path / "out" / "pca.npz") as z:
        assert int(z["rows"]) == 10
        np.testing.assert_allclose(z["mean"], mean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(z["components"], components, rtol=0, atol=1e-8)
        np.testing.assert_allclose(z["explained_variance"], variance, rtol=1e-9)
    np.testing.assert_allclose(pc_values(tmp_path / "out"), (rows["SAD"] - mean) @ components.T, rtol=1e-5, atol=1e-5)
    assert np.abs(mean - rows["SAD"].mean(0)).max() > 1e-3  # a fit on all rows would differ


# --- train and evaluate on the TF-written Basenji2 sample ------------------------------------------------


@pytest.fixture(scope="module")
def sample():
    """The sample's decoded arrays as TensorFlow wrote them: {split: [(x [1, 131072, 4], y [1, 896, 10])]}."""
    with np.load(BASENJI / "expected.npz") as z:
        return {split: [(torch.from_numpy(z[f"{split}_{i}_sequence"].astype(np.float32))[None],
                         torch.from_numpy(z[f"{split}_{i}_target"].astype(np.float32))[None]) for i in range(n)]
                for split, n in (("train", 3), ("valid", 2))}


@pytest.fixture(scope="module")
def init_model(tmp_path_factory, tiny_enformer):
    """Starting weights with a 10-track human and a 10-track mouse head (the sample's track count)."""
    model = tiny_enformer(seed=13, channels=12, pooling="max", conv_filters=[6, 6, 6, 6, 8, 12],
                          heads={"human": 10, "mouse": 10}, doubled=False)
    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    save_native(model.state_dict(), path)
    return path


def loss_of(model, head, x, y):
    """Poisson loss by README's formula, mean(pred - target * log(pred + 1e-7)), of a direct model call."""
    pred = model.head_tracks(model.trunk(x), head)
    return (pred - y * torch.log(pred + 1e-7)).mean()


def train_args(init, *extra):
    return ["train", "--init", init, "--warmup", "0", "--no-progress", "--device", "cpu", *extra]


def test_train_bf16_is_refused_on_the_cpu(tmp_path, init_model):
    """`--bf16` is a CUDA mode: on the CPU the command stops with a one-line error naming it, and writes no weights."""
    result = run(*train_args(init_model, "--data", f"human={BASENJI}", "--steps", "1", "--bf16",
                             "-o", tmp_path / "bf16.safetensors"))
    one_line_error(result, "--bf16", "CUDA")
    assert not (tmp_path / "bf16.safetensors").exists()


def test_train_clips_the_global_gradient_norm(tmp_path, init_model, sample):
    """`--clip-grad-norm 0.05`: the gradient Adam took (its first moment / (1 - beta1) in the checkpoint) is the
    gradient computed here (same weights, dropout seed and first example) scaled to global norm 0.05."""
    clip = 0.05
    result = run(*train_args(init_model, "--data", f"human={BASENJI}", "--steps", "1", "--lr", "1e-3",
                             "--clip-grad-norm", clip, "--shuffle-buffer", "0", "--seed", "3",
                             "--checkpoint", tmp_path / "ck.pt", "-o", tmp_path / "out.safetensors"))
    assert result.exit_code == 0, result.output
    model = load_model(init_model)
    model.train()
    torch.manual_seed(3)
    loss_of(model, "human", *sample["train"][0]).backward()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
    assert norm > 4 * clip  # the clipping acts
    state = torch.load(tmp_path / "ck.pt", weights_only=True)["optimizer"]["state"]
    taken = {names[i]: entry["exp_avg"] / 0.1 for i, entry in state.items()}
    assert set(taken) == set(grads)  # the mouse head, without data, took no step
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in taken.values()]))) == pytest.approx(clip,
                                                                                                      rel=1e-4)
    scale = clip / (norm + 1e-6)
    for name, gradient in grads.items():
        torch.testing.assert_close(taken[name], gradient * scale, rtol=1e-4, atol=1e-6 * clip)


def recorded_examples(history, heads, model, sample, seed):
    """For each recorded step and head, the training example whose loss it is: the losses of the fixed model
    (the learning rate is too small to move it) on each example, with the dropout draws the run made at that
    step (seeded by --seed, one forward pass per head and step in the order given)."""
    torch.manual_seed(seed)
    chosen = []
    with torch.no_grad():
        for step in history:
            row = {}
            for head in heads:
                before = torch.get_rng_state()
                losses = []
                for x, y in sample["train"]:
                    torch.set_rng_state(before)  # every candidate sees the same dropout draws
                    losses.append(float(loss_of(model, head, x, y)))
                matches = [i for i, value in enumerate(losses) if value == pytest.approx(step[head], rel=1e-6)]
                assert len(matches) == 1, (head, step[head], losses)
                row[head] = matches[0]
            chosen.append(row)
    return chosen


def test_train_two_heads_in_the_order_given_with_a_shuffle_buffer(tmp_path, init_model, sample):
    """`--data mouse=DIR --data human=DIR --shuffle-buffer 3 --seed 1`, 3 steps: every step makes one Adam step per
    head, mouse then human (the recorded losses are each head's loss of a direct call with the run's dropout draws in
    that order, and Adam counted 3 steps per head, 6 for the trunk); each head's stream is a shuffled permutation of
    the 3 examples. With `--shuffle-buffer 0` the examples come in file order."""
    model = load_model(init_model)
    model.train()
    orders = {}
    for buffer in (3, 0):
        checkpoint = tmp_path / f"ck{buffer}.pt"
        result = run(*train_args(init_model, "--data", f"mouse={BASENJI}", "--data", f"human={BASENJI}", "--steps",
                                 "3", "--lr", "1e-30", "--shuffle-buffer", buffer, "--seed", "1", "--checkpoint",
                                 checkpoint, "-o", tmp_path / f"out{buffer}.safetensors"))
        assert result.exit_code == 0 and "(last losses: mouse " in result.output, result.output
        saved = torch.load(checkpoint, weights_only=True)
        assert saved["heads"] == ["mouse", "human"] and len(saved["history"]) == 3
        chosen = recorded_examples(saved["history"], ["mouse", "human"], model, sample, seed=1)
        assert all(row["mouse"] == row["human"] for row in chosen)  # the two streams, seeded alike
        orders[buffer] = [row["human"] for row in chosen]
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        steps = {names[i]: int(entry["step"]) for i, entry in saved["optimizer"]["state"].items()}
        assert {steps[n] for n in names if n.startswith("heads.")} == {3} and steps["stem.conv.weight"] == 6
    assert orders[0] == [0, 1, 2]
    assert sorted(orders[3]) == [0, 1, 2] and orders[3] != [0, 1, 2]
    # the dropout draws tell the heads' order: the human loss with the first draws (human first) is not the recorded
    torch.manual_seed(1)
    with torch.no_grad():
        human_first = float(loss_of(model, "human", *sample["train"][0]))
    assert human_first != pytest.approx(saved["history"][0]["human"], rel=1e-6)


def test_evaluate_head_tracks_targets_and_max_batches(tmp_path, init_model, sample):
    """`evaluate --head mouse --targets TABLE --tracks '^CAGE:' --max-batches 1`: Pearson r of the mouse head's
    columns 3 and 7 (the table's CAGE rows) over the first validation sequence only, as numpy's corrcoef of a direct
    call gives it, named as the table names them; without --max-batches, over both sequences."""
    model = load_model(init_model)
    with torch.inference_mode():
        pred = [model.predict(x)["mouse"][0].double().numpy() for x, _ in sample["valid"]]
    target = [y[0].double().numpy() for _, y in sample["valid"]]

    def pearson(n):
        p, t = np.concatenate(pred[:n]), np.concatenate(target[:n])
        return [np.corrcoef(p[:, k], t[:, k])[0, 1] for k in (3, 7)]

    names = [("M0", "DNASE:a"), ("M1", "DNASE:b"), ("M2", "CHIP:c"), ("M3", "CAGE:d"), ("M4", "ATAC:e"),
             ("M5", "DNASE:f"), ("M6", "CHIP:g"), ("M7", "CAGE:h"), ("M8", "ATAC:i"), ("M9", "DNASE:j")]
    (tmp_path / "mouse.tsv").write_text("identifier\tdescription\n" + "".join(f"{i}\t{d}\n" for i, d in names))
    base = ["evaluate", "--model", init_model, "--data", BASENJI, "--head", "mouse", "--device", "cpu"]
    result = run(*base, "--targets", tmp_path / "mouse.tsv", "--tracks", "^CAGE:", "--max-batches", "1",
                 "-o", tmp_path / "one.tsv")
    assert result.exit_code == 0 and "mouse valid: mean Pearson r" in result.output, result.output
    assert "over 2 tracks, 1 sequence" in result.output
    rows = [line.split("\t") for line in (tmp_path / "one.tsv").read_text().splitlines()[1:]]
    assert [r[:3] for r in rows] == [["3", "M3", "CAGE:d"], ["7", "M7", "CAGE:h"]]
    np.testing.assert_allclose([float(r[3]) for r in rows], pearson(1), atol=2e-6)

    result = run(*base, "--tracks", "3,7", "-o", tmp_path / "two.tsv")
    assert result.exit_code == 0 and "over 2 tracks, 2 sequences" in result.output, result.output
    rows = [line.split("\t") for line in (tmp_path / "two.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["3", "7"]
    np.testing.assert_allclose([float(r[3]) for r in rows], pearson(2), atol=2e-6)
    assert np.abs(np.subtract(pearson(1), pearson(2))).max() > 1e-3  # one batch and two differ


# --- convert from every source form --------------------------------------------------------------------

# (fixture key, our tensor name, how the official array becomes ours): one of each kind of tensor
OFFICIAL_PICKS = [
    ("_trunk._layers.0._layers.0.w", "stem.conv.weight", lambda w: w.transpose(2, 1, 0)),
    ("_trunk._layers.0._layers.2._logit_linear.w", "stem.pool.logits.weight", lambda w: w.T[:, :, None]),
    ("_trunk._layers.0._layers.1._module._layers.0.moving_variance.average", "stem.pointwise.norm.running_var",
     lambda w: w.reshape(-1)),
    ("_trunk._layers.2._layers.1._layers.0._module._layers.1._q_layer.w", "transformer.1.attention.to_q.weight",
     lambda w: w.T),
    ("_trunk._layers.2._layers.0._layers.0._module._layers.1._r_w_bias", "transformer.0.attention.r_w_bias",
     lambda w: w),
    ("_trunk._layers.2._layers.1._layers.1._module._layers.0.scale", "transformer.1.mlp_norm.weight", lambda w: w),
    ("_trunk._layers.4._layers.0._layers.2.w", "final.conv.weight", lambda w: w.transpose(2, 1, 0)),
    ("_heads.mouse._layers.0.w", "heads.mouse.weight", lambda w: w.T),
    ("_heads.mouse._layers.0.b", "heads.mouse.bias", lambda w: w),
]


def convert(source, dest):
    result = run("convert", source, dest)
    assert result.exit_code == 0, result.output
    return result.output


def test_convert_savedmodel_archives_and_sonnet_checkpoints(tmp_path, official_bundle_dir, monkeypatch):
    """`convert` from the SavedModel's .tar.gz, .tgz and .tar and from a Sonnet checkpoint (prefix, and its .index
    path): each prints the fixture's architecture and writes the fixture's weights (tensors of every kind checked
    against the official values, bf16-packed losslessly in weights_bf16.npz); all forms give identical files."""
    monkeypatch.setenv("ENFORMER_VEP_CACHE", str(tmp_path / "cache"))
    variables = official_bundle_dir / "variables"
    with tarfile.open(tmp_path / "enformer_1.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.add(variables, arcname="enformer_1/variables")
    os.link(tmp_path / "enformer_1.tar.gz", tmp_path / "enformer_1.tgz")
    with tarfile.open(tmp_path / "enformer_1.tar", "w") as tar:
        tar.add(variables, arcname="enformer_1/variables")
    prefix = tmp_path / "enformer-fine-tuned-human-1"
    for suffix in (".index", ".data-00000-of-00001"):  # a checkpoint's two files (a bundle, as SavedModel's is)
        os.symlink(variables / ("variables" + suffix), str(prefix) + suffix)
    sources = [tmp_path / "enformer_1.tar.gz", tmp_path / "enformer_1.tgz", tmp_path / "enformer_1.tar", prefix,
               str(prefix) + ".index"]
    official_weights = load_fixture_weights()
    first = None
    for i, source in enumerate(sources):
        output = convert(source, tmp_path / f"c{i}.safetensors")
        assert ("channels 384, 2 transformer layers, 8 attention heads, attention pooling, "
                "tracks: human 5313, mouse 1643") in output
        tensors = load_file(str(tmp_path / f"c{i}.safetensors"))
        for key, name, transform in OFFICIAL_PICKS:
            official = official_weights[key.replace(".", "/")]
            np.testing.assert_array_equal(tensors[name], transform(official), err_msg=f"{source}: {name}")
        first = first or tensors
        assert tensors.keys() == first.keys() and all(np.array_equal(tensors[k], first[k]) for k in first), source


@pytest.fixture(scope="module")
def their_model():
    """A small random enformer-pytorch model (every float tensor drawn at random, biases and statistics included)."""
    torch.manual_seed(17)
    model = enformer_pytorch.Enformer.from_hparams(dim=48, depth=1, heads=2, attn_dim_key=16, dim_divisible_by=8,
                                                   output_heads={"human": 5, "mouse": 3})
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor).abs_() + 0.5 if name.endswith("running_var")
                             else torch.randn_like(tensor))
    return model.eval()


# (enformer-pytorch tensor, ours): their layout is theirs (lucidrains/enformer-pytorch), spelled out here
THEIR_PICKS = [("stem.0.weight", "stem.conv.weight"), ("stem.1.fn.0.running_var", "stem.pointwise.norm.running_var"),
               ("conv_tower.0.0.2.weight", "conv_tower.0.conv.conv.weight"),
               ("transformer.0.0.fn.1.to_q.weight", "transformer.0.attention.to_q.weight"),
               ("transformer.0.0.fn.1.rel_content_bias", "transformer.0.attention.r_w_bias"),
               ("transformer.0.0.fn.1.rel_pos_bias", "transformer.0.attention.r_r_bias"),
               ("transformer.0.1.fn.4.weight", "transformer.0.mlp_out.weight"),
               ("final_pointwise.1.2.weight", "final.conv.weight"), ("_heads.mouse.0.weight", "heads.mouse.weight"),
               ("_heads.human.0.bias", "heads.human.bias")]


def test_convert_enformer_pytorch_directories_and_files(tmp_path, their_model):
    """`convert` from an enformer-pytorch directory (config.json with pytorch_model.bin, or with model.safetensors)
    and from either weights file alone: the architecture their model was built with, their tensors under our names
    (the attention-pool 1x1 Conv2d kernel as a Conv1d one), and the same file from every form."""
    theirs = {k: v.numpy() for k, v in their_model.state_dict().items()}
    for form in ("pytorch_model.bin", "model.safetensors"):
        directory = tmp_path / form.split(".")[0]
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(their_model.config.to_dict()))
        if form == "pytorch_model.bin":
            torch.save(their_model.state_dict(), directory / form)
        else:
            save_model(their_model, str(directory / form))
    sources = [tmp_path / "pytorch_model", tmp_path / "model", tmp_path / "pytorch_model" / "pytorch_model.bin",
               tmp_path / "model" / "model.safetensors"]
    first = None
    for i, source in enumerate(sources):
        output = convert(source, tmp_path / f"c{i}.safetensors")
        assert ("channels 48, 1 transformer layer, 2 attention heads, attention pooling, "
                "tracks: human 5, mouse 3") in output
        tensors = load_file(str(tmp_path / f"c{i}.safetensors"))
        for their_name, name in THEIR_PICKS:
            np.testing.assert_array_equal(tensors[name], theirs[their_name], err_msg=f"{source}: {name}")
        np.testing.assert_array_equal(tensors["conv_tower.2.pool.logits.weight"],
                                      theirs["conv_tower.2.2.to_attn_logits.weight"][..., 0])
        first = first or tensors
        assert tensors.keys() == first.keys() and all(np.array_equal(tensors[k], first[k]) for k in first), source


def test_convert_a_native_file(tmp_path, two_heads):
    """`convert` of one of our own files: the same tensors (read back with safetensors), the architecture printed."""
    path, _, _ = two_heads
    output = convert(path, tmp_path / "again.safetensors")
    assert "channels 12, 1 transformer layer, 2 attention heads, max pooling, tracks: human 7, mouse 1643" in output
    source, copy = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert source.keys() == copy.keys() and all(np.array_equal(source[k], copy[k]) for k in source)
