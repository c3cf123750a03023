import os

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from enformer_vep.errors import InputError
from enformer_vep.plots import BASE_COLORS, plot_contributions, plot_variant, save_figure

POS = 602_345
BIN_STARTS = POS - 1 - 57_344 + 128 * np.arange(896, dtype=np.int64)
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


def test_variant_figure_has_two_panels_per_track_titled_by_track_and_variant():
    fig, _, _ = _variant_figure(variant_id="rs1")
    assert len(fig.axes) == 6
    assert [ax.get_title(loc="left") for ax in fig.axes[::2]] == LABELS
    assert fig._suptitle.get_text() == "rs1   chr1:602345 A>G"
    assert [ax.get_legend() is not None for ax in fig.axes] == [True, False] * 3
    titled, _, _ = _variant_figure(tracks=1, title="Study X", variant_id=".")
    assert len(titled.axes) == 2
    assert titled._suptitle.get_text() == "Study X\nchr1:602345 A>G"
    assert titled.get_figheight() < fig.get_figheight()


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
        np.testing.assert_allclose(delta.get_ydata()[:-1], alt[:, k].astype(float) - ref[:, k], rtol=1e-6)
        # The gain and loss fills together enclose the same difference: their y extremes match it.
        fills = [c for c in bottom.collections if isinstance(c, PolyCollection)]
        assert len(fills) == 2
        ys = np.concatenate([path.vertices[:, 1] for c in fills for path in c.get_paths()])
        np.testing.assert_allclose([ys.min(), ys.max()], [(alt[:, k] - ref[:, k]).min(), (alt[:, k] - ref[:, k]).max()],
                                   rtol=1e-6)
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
