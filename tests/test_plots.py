import os

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from enformer_vep.errors import InputError
from enformer_vep.plots import (
    BASE_COLORS,
    n_stretches,
    plot_contributions,
    plot_variant,
    reference_coordinates,
    save_figure,
    track_summary,
)
from enformer_vep.regions import bin_starts

POS = 602_345
BIN_STARTS = bin_starts(POS)  # bin 447 ends with the variant's base, as for scoring (docs/spec.md §3.3)
LABELS = ["DNASE:liver", "CAGE:brain", "CHIP:CTCF"]


def _predictions(tracks=3, seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.gamma(2.0, 1.0, (896, tracks)).astype(np.float32)
    alt = (ref * rng.uniform(0.5, 1.5, ref.shape)).astype(np.float32)
    return ref, alt


def _variant_figure(tracks=3, **kwargs):
    ref, alt = _predictions(tracks)
    return plot_variant(ref, alt, BIN_STARTS, LABELS[:tracks], chrom="chr1", pos=POS,
                        ref_allele="A", alt_allele="G", **kwargs), ref, alt


def _line(ax, label):
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return line


def _caption(fig) -> str:
    """The figure's caption as one line (it is wrapped to the figure's width)."""
    return " ".join(fig.get_supxlabel().split())


def _legend(fig):
    (legend,) = fig.legends
    return legend, [text.get_text() for text in legend.get_texts()]


def test_variant_figure_has_two_panels_per_track_titled_by_track_and_variant():
    fig, _, _ = _variant_figure(variant_id="rs1")
    assert len(fig.axes) == 6
    assert [ax.get_title(loc="left") for ax in fig.axes[::2]] == LABELS
    assert fig._suptitle.get_text() == "rs1   chr1:602345 A>G"
    assert [ax.get_legend() for ax in fig.axes] == [None] * 6  # one legend for the figure, none on the data
    assert _legend(fig)[1] == ["ref", "alt", "variant", "alt > ref", "alt < ref"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["predicted signal", "alt - ref"] * 3
    titled, _, _ = _variant_figure(tracks=1, title="Study X", variant_id=".", model="enformer.safetensors (sha256 ab)")
    assert len(titled.axes) == 2
    assert titled._suptitle.get_text() == "Study X\nchr1:602345 A>G\nmodel: enformer.safetensors (sha256 ab)"
    assert titled.get_figheight() < fig.get_figheight()


def test_variant_panels_carry_track_identifiers_and_notes():
    fig, _, _ = _variant_figure(track_ids=["ENCFF1", "CNhs2", "ENCFF3"], notes=["SAD +0.5, rank 1 of 9", "", ""])
    assert [ax.get_title(loc="right") for ax in fig.axes[::2]] == ["ENCFF1   SAD +0.5, rank 1 of 9", "CNhs2", "ENCFF3"]
    assert [ax.get_title(loc="right") for ax in fig.axes[1::2]] == [""] * 3
    with pytest.raises(InputError, match="2 track ids and 3 notes for 3 tracks"):
        _variant_figure(track_ids=["a", "b"], notes=["", "", ""])


def test_variant_legend_matches_the_drawn_ref_and_alt_and_stays_off_the_data():
    fig, _, _ = _variant_figure()
    legend, texts = _legend(fig)
    for k in range(3):
        top = fig.axes[2 * k]
        assert len(top.collections) == 0  # no shading under the lines that the legend would not show
        ref, alt = _line(top, "ref"), _line(top, "alt")
        # ref and alt differ in colour and in line style, so they are told apart even without colour
        assert ref.get_color() != alt.get_color() and ref.get_linestyle() != alt.get_linestyle()
    drawn = {text: handle for text, handle in zip(texts, legend.legend_handles, strict=True)}
    top = fig.axes[0]
    for label in ("ref", "alt", "variant"):
        assert drawn[label].get_color() == _line(top, label).get_color()
        assert drawn[label].get_linestyle() == _line(top, label).get_linestyle()
    gain, loss = [c for c in fig.axes[1].collections if isinstance(c, PolyCollection)]
    np.testing.assert_allclose(drawn["alt > ref"].get_facecolor(), gain.get_facecolor()[0])
    np.testing.assert_allclose(drawn["alt < ref"].get_facecolor(), loss.get_facecolor()[0])
    fig.draw_without_rendering()
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)


def test_n_stretches_are_shaded_and_explained():
    gaps = [(int(BIN_STARTS[0]) - 1_000, int(BIN_STARTS[10]) + 5), (POS + 2_000, POS + 3_000), (10, 20)]
    fig, _, _ = _variant_figure(gaps=gaps)
    first_edge = BIN_STARTS[0] + 0.5
    for ax in fig.axes:
        shaded = [p for p in ax.patches if p.get_label() == "N (no sequence)"]
        spans = sorted((p.get_x(), p.get_x() + p.get_width()) for p in shaded)
        # cut to the axis; the gap outside the bins (10-20) is not drawn
        assert spans == [(first_edge, BIN_STARTS[10] + 5.5), (POS + 2_000.5, POS + 3_000.5)]
    assert "N (no sequence)" in _legend(fig)[1]
    assert "Grey: N" in _caption(fig)
    plain, _, _ = _variant_figure(gaps=[(10, 20)])
    assert "N (no sequence)" not in _legend(plain)[1] and plain._supxlabel is None


def test_n_stretches_of_a_sequence():
    codes = np.frombuffer(b"NNACGTNNNAN", dtype=np.uint8)
    assert n_stretches(codes, 100) == [(100, 102), (106, 109), (110, 111)]
    assert n_stretches(np.frombuffer(b"ACGT", dtype=np.uint8), 0) == []


def test_track_summary_lists_a_few_tracks_and_counts_many():
    assert track_summary(["CAGE:brain", "DNASE:liver"]) == "CAGE:brain; DNASE:liver"
    assert track_summary([f"CAGE:cell {i}" for i in range(638)]) == "638 CAGE tracks"
    assert track_summary(["CAGE:a", "DNASE:b", "CAGE:c", "plain"]) == "4 tracks: 2 CAGE, 1 DNASE, 1 other"


def test_variant_x_axis_is_one_based_genome_coordinates_of_the_bins():
    fig, _, _ = _variant_figure()
    first_base, last_base = BIN_STARTS[0] + 1, BIN_STARTS[-1] + 128
    for ax in fig.axes:
        assert ax.get_xlim() == (first_base - 0.5, last_base + 0.5)
        markers = [line for line in ax.get_lines() if line.get_label() == "variant"]
        assert len(markers) == 1 and list(markers[0].get_xdata()) == [POS, POS]
    bottom = fig.axes[-1]
    assert "chr1" in bottom.get_xlabel()
    assert bottom.xaxis.get_major_formatter()(602_345) == "602,345"


def test_variant_panels_plot_the_predictions_and_their_difference():
    fig, ref, alt = _variant_figure()
    edges = np.append(BIN_STARTS, BIN_STARTS[-1] + 128) + 0.5
    for k in range(3):
        top, bottom = fig.axes[2 * k], fig.axes[2 * k + 1]
        for label, values in (("ref", ref[:, k]), ("alt", alt[:, k])):
            line = _line(top, label)
            np.testing.assert_array_equal(line.get_xdata(), edges)
            np.testing.assert_allclose(line.get_ydata()[:-1], values)
        delta = _line(bottom, "alt - ref")
        assert delta.get_drawstyle() == "steps-post"
        np.testing.assert_array_equal(delta.get_xdata(), edges)
        # float32 predictions drawn as float64: exact, or one float32 rounding (2^-24) of a difference; measured 0
        np.testing.assert_allclose(delta.get_ydata()[:-1], alt[:, k].astype(float) - ref[:, k], rtol=1e-7)
        # The gain and loss fills together enclose the same difference: their y extremes match it.
        fills = [c for c in bottom.collections if isinstance(c, PolyCollection)]
        assert len(fills) == 2
        ys = np.concatenate([path.vertices[:, 1] for c in fills for path in c.get_paths()])
        np.testing.assert_allclose([ys.min(), ys.max()], [(alt[:, k] - ref[:, k]).min(), (alt[:, k] - ref[:, k]).max()],
                                   rtol=1e-7)
        zero = [line for line in bottom.get_lines() if list(line.get_ydata()) == [0, 0]]
        assert len(zero) == 1
        assert bottom.get_ylim()[0] == -bottom.get_ylim()[1]


def test_variant_inputs_are_checked():
    ref, alt = _predictions()
    common = dict(chrom="chr1", pos=POS, ref_allele="A", alt_allele="G")
    with pytest.raises(InputError, match="must both be"):
        plot_variant(ref, alt[:, :2], BIN_STARTS, LABELS, **common)
    with pytest.raises(InputError, match="must both be"):
        plot_variant(ref, alt, BIN_STARTS, LABELS[:2], **common)
    gapped = BIN_STARTS.copy()
    gapped[500:] += 1
    with pytest.raises(InputError, match="contiguous"):
        plot_variant(ref, alt, gapped, LABELS, **common)


@pytest.mark.parametrize("alt_allele, shift", [("A" + "T" * 128, 1), ("A" + "T" * 256, 2)])
def test_an_insertion_of_whole_bins_is_drawn_in_reference_coordinates(alt_allele, shift):
    ref, _ = _predictions(1)
    # the alternative's window: the left flank and variant bin as in the reference, then `shift` bins of
    # inserted sequence, then the reference's right flank pushed `shift` bins to the right
    alt = np.concatenate([ref[:448] * 1.5, np.full((shift, 1), 9.0), ref[448:896 - shift]])
    fig = plot_variant(ref, alt, BIN_STARTS, LABELS[:1], chrom="chr1", pos=POS, ref_allele="A", alt_allele=alt_allele)
    top, bottom = fig.axes
    drawn = _line(top, "alt").get_ydata()[:-1]
    # the alternative's float32 values drawn as float64: exact (measured 0); 1e-7 allows one float32 rounding
    np.testing.assert_allclose(drawn[:448], ref[:448, 0] * 1.5, rtol=1e-7)
    np.testing.assert_allclose(drawn[448:896 - shift], ref[448:896 - shift, 0], rtol=1e-7)  # back in place
    assert np.isnan(drawn[896 - shift:]).all()  # past the alternative window's end
    delta = _line(bottom, "alt - ref").get_ydata()[:-1]
    assert np.all(delta[448:896 - shift] == 0)  # no difference all along the right flank
    assert f"{len(alt_allele) - 1}-bp insertion" in _caption(fig)
    assert f"drawn {shift} bin" in _caption(fig) and "of inserted sequence" in _caption(fig)
    assert not [p for p in bottom.patches if p.get_hatch()]  # aligned exactly: nothing hatched


def test_a_deletion_of_a_whole_bin_leaves_the_deleted_bin_empty():
    ref, _ = _predictions(1)
    alt = np.concatenate([ref[:448], ref[449:], np.ones((1, 1), np.float32)])  # bin 448 deleted, the rest pulled in
    fig = plot_variant(ref, alt, BIN_STARTS, LABELS[:1], chrom="chr1", pos=POS, ref_allele="A" + "C" * 128,
                       alt_allele="A")
    drawn = _line(fig.axes[0], "alt").get_ydata()[:-1]
    assert np.flatnonzero(np.isnan(drawn)).tolist() == [448]
    np.testing.assert_allclose(drawn[449:], ref[449:, 0], rtol=1e-7)  # float32 drawn as float64: measured exact
    assert "128-bp deletion" in _caption(fig) and "deleted bins are left empty" in _caption(fig)


def test_a_short_indel_marks_the_offset_right_flank():
    ref, alt = _predictions(1)
    fig = plot_variant(ref, alt, BIN_STARTS, LABELS[:1], chrom="chr1", pos=POS, ref_allele="T", alt_allele="TGCCCA")
    top, bottom = fig.axes
    np.testing.assert_allclose(_line(top, "alt").get_ydata()[:-1], alt[:, 0], rtol=1e-7)  # not moved; exact
    (hatched,) = [p for p in bottom.patches if p.get_hatch()]
    assert (hatched.get_x(), hatched.get_x() + hatched.get_width()) == (BIN_STARTS[448] + 0.5, BIN_STARTS[-1] + 128.5)
    assert "alt bins 5 bp off the ref bins" in _legend(fig)[1]
    assert "5-bp insertion" in _caption(fig) and "5 bp off" in _caption(fig)


def test_reference_coordinates_by_hand():
    alt = np.arange(10, dtype=float)[:, None]
    starts = 1_000 + 128 * np.arange(10)
    pos = 1_000 + 128 * 4 + 128  # its base, pos - 1, is the last of bin 4
    moved, shift, offset = reference_coordinates(alt, starts, pos, 1, 1 + 300)  # 300 bp: 2 bins and -56 bp
    assert (shift, offset) == (2, 300 - 256)
    np.testing.assert_array_equal(moved[:, 0], [0, 1, 2, 3, 4, 7, 8, 9, np.nan, np.nan])
    moved, shift, offset = reference_coordinates(alt, starts, pos, 1 + 200, 1)  # deletion: -2 bins, +56 bp
    assert (shift, offset) == (-2, -200 + 256)
    np.testing.assert_array_equal(moved[:, 0], [0, 1, 2, 3, 4, np.nan, np.nan, 5, 6, 7])
    moved, shift, offset = reference_coordinates(alt, starts, pos, 3, 1)
    assert (shift, offset) == (0, -2)
    np.testing.assert_array_equal(moved, alt)


L = 300
POSITIONS = 10_000 + np.arange(L, dtype=np.int64)
SCORES = np.random.default_rng(1).normal(0, 1, L).astype(np.float32)
SEQUENCE = "".join(np.random.default_rng(2).choice(list("ACGTN"), L))


def test_contributions_without_zoom_is_one_panel_over_the_span():
    fig = plot_contributions(POSITIONS, SCORES, chrom="chr7", highlight=10_100)
    (ax,) = fig.axes
    assert ax.get_xlim() == (10_000.5, 10_300.5)
    assert "chr7" in ax.get_xlabel()
    line = [line for line in ax.get_lines() if len(line.get_xdata()) == L]
    assert len(line) == 1
    np.testing.assert_array_equal(line[0].get_xdata(), POSITIONS + 1)
    np.testing.assert_allclose(line[0].get_ydata(), SCORES)
    assert any(list(line.get_xdata()) == [10_101, 10_101] for line in ax.get_lines())


@pytest.mark.parametrize("sequence", [SEQUENCE.lower(), np.frombuffer(SEQUENCE.encode(), dtype=np.uint8)])
def test_contributions_zoom_draws_one_bar_per_base_coloured_by_base(sequence):
    fig = plot_contributions(POSITIONS, SCORES, chrom="chr7", sequence=sequence, zoom=(10_050, 10_090),
                             title="Contributions of rs1")
    assert len(fig.axes) == 2 and fig._suptitle.get_text() == "Contributions of rs1"
    whole, zoom = fig.axes
    assert whole.get_xlim() == (10_000.5, 10_300.5)
    assert zoom.get_xlim() == (10_050.5, 10_090.5)
    bars = zoom.patches
    assert len(bars) == 40
    np.testing.assert_allclose([bar.get_x() + bar.get_width() / 2 for bar in bars], np.arange(10_051, 10_091))
    np.testing.assert_allclose([bar.get_height() for bar in bars], SCORES[50:90])
    for bar, base in zip(bars, SEQUENCE[50:90], strict=True):
        expected = BASE_COLORS.get(base)
        if expected is not None:
            assert bar.get_facecolor() == pytest.approx((*(int(expected[i:i + 2], 16) / 255 for i in (1, 3, 5)), 1))


def test_contribution_inputs_are_checked():
    with pytest.raises(InputError, match="zoom"):
        plot_contributions(POSITIONS, SCORES, chrom="chr7", zoom=(10_290, 10_301))
    with pytest.raises(InputError, match="zoom"):
        plot_contributions(POSITIONS, SCORES, chrom="chr7", zoom=(10_050, 10_050))
    with pytest.raises(InputError, match="sequence has 299 bases"):
        plot_contributions(POSITIONS, SCORES, chrom="chr7", sequence=SEQUENCE[1:])
    with pytest.raises(InputError, match="same non-empty"):
        plot_contributions(POSITIONS, SCORES[1:], chrom="chr7")
    with pytest.raises(InputError, match="increasing"):
        plot_contributions(POSITIONS[::-1], SCORES, chrom="chr7")


@pytest.mark.parametrize("name, magic", [("v.png", b"\x89PNG\r\n\x1a\n"), ("v.PDF", b"%PDF-")])
def test_save_writes_the_format_of_the_extension_without_leftovers(tmp_path, name, magic):
    fig, _, _ = _variant_figure(tracks=1)
    path = tmp_path / name
    path.write_bytes(b"old")
    save_figure(fig, path)
    assert path.read_bytes().startswith(magic)
    assert os.listdir(tmp_path) == [name]
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_refuses_other_extensions(tmp_path):
    fig = plot_contributions(POSITIONS, SCORES, chrom="chr7")
    for name in ("c.svg", "c", "c.png.gz"):
        with pytest.raises(InputError, match=r"\.png or \.pdf") as error:
            save_figure(fig, tmp_path / name)
        assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="cannot write"):
        save_figure(fig, tmp_path / "missing" / "c.png")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    fig = plot_contributions(POSITIONS, SCORES, chrom="chr7")
    path = tmp_path / "c.png"
    path.write_bytes(b"old")

    def broken(file, **kwargs):
        file.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, path)
    assert os.listdir(tmp_path) == ["c.png"] and path.read_bytes() == b"old"


def test_variant_figure_draws_the_genes_tss():
    """A genes panel on top: a tick per TSS inside the bins and each gene named once with its direction;
    each TSS also a dash-dot line on every ref/alt panel (1-based x); a TSS outside the window is not drawn;
    the legend names it. Without TSSs the figure has no genes panel."""
    inside, other, outside = POS + 1_000, POS - 20_000, POS + 90_000  # 0-based TSS positions
    fig, _, _ = _variant_figure(tss=[(inside, "GENE1", "+"), (inside + 500, "GENE1", "+"), (other, "GENE2", "-"),
                                     (outside, "FAR", "+")])
    genes, tracks = fig.axes[0], fig.axes[1:]
    assert len(tracks) == 6 and genes.get_ylabel() == "genes (TSS)"
    want = [other + 1, inside + 1, inside + 501]
    assert sorted(line.get_xdata()[0] for line in genes.get_lines()) == want
    for top in tracks[::2]:
        assert sorted(line.get_xdata()[0] for line in top.get_lines() if line.get_label() == "TSS") == want
    assert not [line for line in tracks[1].get_lines() if line.get_label() == "TSS"]
    assert sorted((text.get_text(), text.get_position()[0]) for text in genes.texts) == \
        [("GENE1 →", inside + 1), ("GENE2 ←", other + 1)]
    assert "TSS" in _legend(fig)[1]
    assert len(_variant_figure(tss=[(outside, "FAR", "+")])[0].axes) == 6
