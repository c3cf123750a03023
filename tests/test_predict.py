"""Region predictions on the real GRCh38 chr1 slice (FASTA contig '1', 860,893 bp): regions, windows
and bins against hand-worked coordinates, predictions against direct model calls on windows cut
independently with pyfaidx, and the HDF5 / bigWig files read back."""
import logging
import sys

import h5py
import numpy as np
import pytest
import torch
from helpers import DATA, from_test_extra, relative_error

from enformer_vep.errors import InputError
from enformer_vep.genome import Genome
from enformer_vep.predict import predict_regions, write_bigwigs, write_predictions_h5
from enformer_vep.regions import Region, read_regions, window_for
from enformer_vep.scoring import precision_mode
from enformer_vep.targets import packaged_targets
from enformer_vep.weights import load_model

pyBigWig, pyfaidx = from_test_extra("pyBigWig"), from_test_extra("pyfaidx")

FASTA = DATA / "grch38_chr1_giab_hg002" / "reference.fa"
CONTIG_LENGTH = 860_893
TRACKS = np.array([0, 4675, 5312])
# (BED line, centre): a region inside the slice (UCSC name), one at the contig start, one near its end
BED_LINES = ["chr1\t602000\t605000\tmiddle", "1\t100\t300", "1\t850000\t851000\tnear_end"]
CENTRES = [603_500, 200, 850_500]


@pytest.fixture(scope="module")
def genome():
    with Genome(FASTA) as g:
        yield g


@pytest.fixture(scope="module")
def model(fast_model):
    return load_model(fast_model)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    path = tmp_path_factory.mktemp("bed") / "regions.bed"
    path.write_text("\n".join(["browser position chr1:1-1000", "track name=demo", "# comment", ""] + BED_LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def results(model, genome, bed):
    regions = read_regions(bed, genome.contigs)
    return list(predict_regions(model, genome, regions, tracks=TRACKS, batch_size=2))


def independent_window(centre: int) -> np.ndarray:
    """One-hot ``[393216, 4]`` of the window centred on ``centre``: string slicing, N padding."""
    sequence = str(pyfaidx.Fasta(str(FASTA))["1"][:])
    start, end = centre - 196_608, centre + 196_608
    text = "N" * max(0, -start) + sequence[max(start, 0):min(end, len(sequence))] + "N" * max(0, end - len(sequence))
    assert len(text) == 393_216
    codes = np.frombuffer(text.encode(), np.uint8)
    return (codes[:, None] == np.frombuffer(b"ACGT", np.uint8)[None]).astype(np.float32)


# --- regions ----------------------------------------------------------------------------------------


def test_region_text_is_one_based_inclusive_and_resolves_aliases(genome):
    # the FASTA calls the contig '1': sequence is read there, but the region keeps the name it was given
    (region,) = read_regions("chr1:602,001-605,000", genome.contigs)
    assert region == Region("chr1", 602_000, 605_000, "chr1:602001-605000", fasta_chrom="1")
    (whole,) = read_regions("1", genome.contigs)
    assert (whole.start, whole.end, whole.chrom, whole.fasta_chrom, whole.name) == (0, CONTIG_LENGTH, "1", "1",
                                                                                    "1:1-860893")
    with pytest.raises(InputError, match=r"starts after the end of contig 'chr1' \(FASTA '1'\)"):
        read_regions("chr1:900,000-900,100", genome.contigs)


def test_window_and_bins_of_a_region_by_hand():
    # centre (602,000 + 605,000) // 2 = 603,500; window 603,500 - 196,608; bins from 603,500 - 57,344
    window_start, bins = window_for(Region("1", 602_000, 605_000, "r"))
    assert window_start == 406_892
    assert bins.dtype == np.int64 and bins.shape == (896,)
    assert (bins[0], bins[1], bins[447], bins[448], bins[895]) == (546_156, 546_284, 603_372, 603_500, 660_716)
    assert window_for(Region("1", 10, 13, "odd"))[0] == 11 - 196_608  # (10 + 13) // 2 = 11


def test_bed_lines_names_and_skipped_lines(genome, bed):
    regions = read_regions(bed, genome.contigs)
    assert regions == [Region("chr1", 602_000, 605_000, "middle", "1"), Region("1", 100, 300, "1:101-300"),
                       Region("1", 850_000, 851_000, "near_end")]
    (tmp := bed.parent / "unnamed.bed").write_text("chr1\t100\t300\n")
    assert read_regions(tmp, genome.contigs) == [Region("chr1", 100, 300, "chr1:101-300", "1")]


@pytest.mark.parametrize("line,message", [
    ("1\t100", r"line 2: expected tab-separated CHROM START END"),
    ("1 100 200", r"line 2: expected tab-separated"),
    ("1\t1e3\t2000", r"line 2: START and END must be integers"),
    ("1\t200\t200", r"line 2: need 0 <= START < END"),
    ("1\t-5\t200", r"line 2: need 0 <= START < END"),
    ("chr2\t100\t200", r"line 2: contig 'chr2' is not in the FASTA"),
    ("1\t860893\t861000", r"line 2: START 860893 is past the end of contig '1'"),
])
def test_malformed_bed_lines_are_refused_with_their_line_number(genome, tmp_path, line, message):
    path = tmp_path / "bad.bed"
    path.write_text(f"1\t0\t10\n{line}\n")
    with pytest.raises(InputError, match=message):
        read_regions(path, genome.contigs)


def test_bad_region_texts_and_empty_or_missing_beds(genome, tmp_path):
    with pytest.raises(InputError, match="contig 'chr2' is not in the FASTA"):
        read_regions("chr2:1-100", genome.contigs)
    with pytest.raises(InputError, match="start 200 is after end 100"):
        read_regions("1:200-100", genome.contigs)
    with pytest.raises(InputError, match="starts after the end of contig '1'"):
        read_regions("1:900,000-900,100", genome.contigs)
    with pytest.raises(InputError, match="no such BED file"):
        read_regions(str(tmp_path / "missing.bed"), genome.contigs)
    (tmp_path / "empty.bed").write_text("track name=x\n")
    with pytest.raises(InputError, match="no regions"):
        read_regions(tmp_path / "empty.bed", genome.contigs)


# --- predictions -------------------------------------------------------------------------------------


def test_predictions_equal_direct_model_calls_on_independent_windows(model, fast_model, genome, bed, device):
    """On ``device`` (in float32: cuDNN would use TF32 by default), against the CPU model's direct calls."""
    on_device = model if device.type == "cpu" else load_model(fast_model, device=device)
    with precision_mode("fp32", device):
        results = list(predict_regions(on_device, genome, read_regions(bed, genome.contigs), tracks=TRACKS,
                                       batch_size=2, device=device))
    assert [r.name for r, _, _ in results] == ["middle", "1:101-300", "near_end"]
    x = np.stack([independent_window(c) for c in CENTRES])
    direct = model.predict(torch.from_numpy(x))["human"][..., TRACKS].numpy()
    # float32, batched against the CPU's one-call batch: measured 1.9e-7 of the largest prediction on the CPU; a
    # device's float32 kernels sum in other orders
    limit = 1e-6 if device.type == "cpu" else 1e-5
    for (region, bins, predictions), centre, expected in zip(results, CENTRES, direct, strict=True):
        assert predictions.dtype == np.float32 and predictions.shape == (896, 3)
        np.testing.assert_array_equal(bins, centre - 57_344 + 128 * np.arange(896))
        assert relative_error(predictions, expected) <= limit, region.name
    assert not np.allclose(results[0][2], results[2][2])  # different sequences give different tracks


def test_long_regions_warn_that_the_bins_cover_only_their_centre(model, genome, caplog):
    regions = [Region("1", 400_000, 400_000 + 114_688, "fits"), Region("1", 400_000, 400_000 + 114_689, "long")]
    with caplog.at_level(logging.WARNING, logger="enformer_vep"):
        out = list(predict_regions(model, genome, regions, tracks=TRACKS[:1], batch_size=1))
    assert len(out) == 2
    warned = [r.getMessage() for r in caplog.records if r.name == "enformer_vep"]
    assert len(warned) == 1 and "long" in warned[0] and "114,689" in warned[0]


def test_tracks_outside_the_head_are_refused(model, genome):
    with pytest.raises(InputError, match="tracks must be a non-empty selection of 0..5312"):
        next(predict_regions(model, genome, [Region("1", 0, 10, "r")], tracks=np.array([5313])))


def test_hdf5_output(results, tmp_path):
    targets = packaged_targets("human").subset(TRACKS)
    path = tmp_path / "predictions.h5"
    attrs = {"model_sha256": "ab" * 32, "options": '{"tracks": "0"}'}
    assert write_predictions_h5(path, iter(results), targets, attrs) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.h5"]  # no temporary left behind
    with h5py.File(path) as f:
        assert f.attrs["bin_size"] == 128
        assert {k: f.attrs[k] for k in attrs} == attrs
        assert f["chrom"][:].tolist() == [b"chr1", b"1", b"1"]  # each region's contig as the BED names it
        assert f["name"][:].tolist() == [b"middle", b"1:101-300", b"near_end"]
        assert f["start"][:].tolist() == [602_000, 100, 850_000] and f["start"].dtype == np.int64
        assert f["end"][:].tolist() == [605_000, 300, 851_000]
        assert f["bin_start"].dtype == np.int64
        np.testing.assert_array_equal(f["bin_start"][:, 0], np.array(CENTRES) - 57_344)
        np.testing.assert_array_equal(np.diff(f["bin_start"][:], axis=1), 128)
        assert f["predictions"].dtype == np.float32 and f["predictions"].compression == "gzip"
        np.testing.assert_array_equal(f["predictions"][:], np.stack([p for _, _, p in results]))
        assert f["target_ids"][:].tolist() == [b"ENCFF833POA", b"CNhs10608", b"CNhs14245"]
        assert f["target_labels"][0].decode().startswith("DNASE:cerebellum")


# --- bigWig ------------------------------------------------------------------------------------------


def expected_intervals(results, track):
    """(start, end, value) of every bin within the contig, cut at its ends, sorted by position."""
    rows = []
    for (_, _, predictions), centre in zip(results, CENTRES, strict=True):
        for i in range(896):
            start, end = centre - 57_344 + 128 * i, centre - 57_344 + 128 * (i + 1)
            if end > 0 and start < CONTIG_LENGTH:
                rows.append((max(start, 0), min(end, CONTIG_LENGTH), float(predictions[i, track])))
    return sorted(rows)


def test_bigwig_values_read_back_equal_the_predictions(results, genome, tmp_path):
    targets = packaged_targets("human").subset(TRACKS)
    shuffled = [results[2], results[0], results[1]]  # entries must still go in sorted
    paths = write_bigwigs(tmp_path / "bw", shuffled, targets, genome.contigs, columns=TRACKS)
    assert [p.name for p in paths] == ["0000_ENCFF833POA.bw", "4675_CNhs10608.bw", "5312_CNhs14245.bw"]
    assert sorted(p.name for p in (tmp_path / "bw").iterdir()) == [p.name for p in paths]
    for track, path in enumerate(paths):
        with pyBigWig.open(str(path)) as bw:
            assert bw.chroms() == {"1": CONTIG_LENGTH}
            intervals = bw.intervals("1")
        expected = expected_intervals(results, track)
        # the first region's bin 446 straddles position 0 and the last one's bin 529 the contig end
        assert (0, 72) in [(s, e) for s, e, _ in intervals] and intervals[-1][:2] == (860_868, CONTIG_LENGTH)
        assert list(intervals) == expected


def test_bigwig_names_contigs_as_the_regions_do(genome, tmp_path, caplog):
    """The FASTA says '1': regions given on 'chr1' give bigWigs on 'chr1', whose values read back."""
    regions = [Region("chr1", 602_000, 605_000, "a", "1"), Region("1", 800_000, 800_100, "b")]
    results = [(r, window_for(r)[1], np.full((896, 1), i + 1, np.float32)) for i, r in enumerate(regions)]
    targets = packaged_targets("human").subset(np.array([0]))
    with caplog.at_level(logging.WARNING, logger="enformer_vep"):
        (path,) = write_bigwigs(tmp_path / "bw", results, targets, genome.contigs)
    with pyBigWig.open(str(path)) as bw:
        assert bw.chroms() == {"chr1": CONTIG_LENGTH}  # one name per contig: the first region's
        assert bw.intervals("chr1")[0] == (603_500 - 57_344, 603_500 - 57_344 + 128, 1.0)
        assert bw.intervals("chr1")[-1] == (800_050 + 57_344 - 128, 800_050 + 57_344, 2.0)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "enformer_vep"]
    assert "name one contig two ways ('chr1' and '1')" in warning


def test_bigwig_refuses_regions_with_overlapping_bins(genome, tmp_path):
    # 50 kb apart: the regions are disjoint, their 114,688-bp bin spans are not
    regions = [Region("1", 602_000, 605_000, "first"), Region("1", 653_000, 654_000, "second")]
    results = [(r, window_for(r)[1], np.ones((896, 1), np.float32)) for r in regions]
    targets = packaged_targets("human").subset(np.array([0]))
    with pytest.raises(InputError, match="regions first and second have overlapping output bins"):
        write_bigwigs(tmp_path / "bw", results, targets, genome.contigs)
    assert not (tmp_path / "bw").exists()


def test_bigwig_without_pybigwig_says_how_to_install_it(genome, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyBigWig", None)  # as if it were not installed
    targets = packaged_targets("human").subset(np.array([0]))
    with pytest.raises(InputError, match="pip install pyBigWig"):
        write_bigwigs(tmp_path / "bw", [], targets, genome.contigs)
