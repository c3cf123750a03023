"""Gradient x input contributions against the official implementation's input gradient, and their files."""
import math

import h5py
import numpy as np
import pytest
import torch
from helpers import DATA, load_fixture_weights, relative_error

from enformer_vep.contrib import contributions, write_contrib
from enformer_vep.errors import InputError
from enformer_vep.genome import Genome
from enformer_vep.regions import Region, read_regions
from enformer_vep.scoring import precision_mode
from enformer_vep.targets import packaged_targets
from enformer_vep.weights import build_model, convert_official, load_model

FLANK = 1_000  # random bases before and after the fixture's sequence in the test contig


@pytest.fixture(scope="module")
def official_genome(tmp_path_factory, official_inputs):
    """A FASTA whose contig 'chrZ' holds the fixture's first input (all-zero rows as N) at
    [FLANK, FLANK + 196,608), between random bases."""
    onehot = official_inputs[0]
    assert set(onehot.sum(-1).tolist()) <= {0.0, 1.0}
    bases = np.where(onehot.sum(-1) == 0, ord("N"), np.frombuffer(b"ACGT", np.uint8)[onehot.argmax(-1)])
    rng = np.random.default_rng(0)
    flank = lambda: np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, FLANK)]  # noqa: E731
    text = np.concatenate([flank(), bases, flank()]).astype(np.uint8).tobytes().decode()
    path = tmp_path_factory.mktemp("official_fasta") / "official.fa"
    path.write_text(">chrZ\n" + "".join(text[i:i + 60] + "\n" for i in range(0, len(text), 60)))
    with Genome(path) as genome:
        yield genome


def test_contributions_match_the_official_input_gradient(official_genome, official_inputs, official_outputs, device):
    model = build_model(convert_official({path: (lambda v=v: v) for path, v in load_fixture_weights().items()}))
    centre = FLANK + 98_304  # the central 196,608 bp of the window then start at FLANK
    (region,) = read_regions(f"Z:{centre - 49}-{centre + 51}", official_genome.contigs)  # 0-based [c-50, c+51)
    assert (region.chrom, region.fasta_chrom, (region.start + region.end) // 2) == ("Z", "chrZ", centre)
    with precision_mode("fp32", device):  # float32 on CUDA too, where cuDNN would use TF32 by default
        positions, scores, objective = contributions(model.to(device), official_genome, region, tracks=np.array([0]),
                                                     bins=np.arange(443, 453), device=device)
    np.testing.assert_array_equal(positions, FLANK + np.arange(196_608))
    assert scores.dtype == np.float32 and positions.dtype == np.int64
    # official: gradient of the SUM over bins 443..452 of track 0; ours is their MEAN
    onehot = official_inputs[0]
    reference = (official_outputs["grad"] * onehot).sum(-1)
    # float32 in TensorFlow's summation orders against torch's: measured on the CPU 1.6e-6 of the largest
    # contribution and 3e-8 (the objective); a device's kernels sum in other orders again: 1e-4 there
    cpu = device.type == "cpu"
    assert relative_error(scores * 10, reference) <= (1e-5 if cpu else 1e-4)
    assert math.isclose(objective * 10, float(official_outputs["grad_target"]), rel_tol=1e-6 if cpu else 1e-4)
    assert np.all(scores[onehot.sum(-1) == 0] == 0)  # N bases contribute nothing
    assert np.count_nonzero(onehot.sum(-1) == 0) > 0


@pytest.fixture(scope="module")
def small_run(fast_model):
    """Default-bin contributions of a small random model for a region at the edge of an assembly gap
    (GRCh38 N runs 207,667-257,666 and 297,969-347,968, 1-based) on the real chr1 slice."""
    model = load_model(fast_model)
    region = Region("1", 257_000, 258_000, "gap_edge")
    tracks = np.array([4675, 10])
    with Genome(DATA / "grch38_chr1_giab_hg002" / "reference.fa") as genome:
        yield model, genome, region, tracks, contributions(model, genome, region, tracks=tracks)


def test_default_objective_is_the_mean_over_the_central_three_bins(small_run):
    model, genome, region, tracks, (positions, scores, objective) = small_run
    centre = 257_500
    np.testing.assert_array_equal(positions, centre - 98_304 + np.arange(196_608))
    # an independent forward pass over the full 393,216-bp window
    codes = genome.fetch("1", centre - 196_608, centre + 196_608)
    x = torch.from_numpy((codes[:, None] == np.frombuffer(b"ACGT", np.uint8)[None]).astype(np.float32))[None]
    predictions = model.predict(x)["human"][0][:, tracks].numpy()
    means = np.array([predictions[b:b + 3].mean() for b in range(894)])  # of every 3 consecutive bins
    assert math.isclose(objective, means[447], rel_tol=1e-6)  # float32 means of 6 values: ~2e-7; measured 0
    assert np.argmin(np.abs(means - objective)) == 447
    assert np.all(scores[codes[98_304:-98_304] == ord("N")] == 0)
    assert np.count_nonzero(scores) > 90_000  # of the 96,608 non-N bases


def test_contribution_files_round_trip(small_run, tmp_path):
    _, genome, region, tracks, (positions, scores, objective) = small_run
    sequence = genome.fetch(region.chrom, positions[0], positions[-1] + 1)
    bedgraph, h5 = write_contrib(tmp_path / "out", region, positions, scores, sequence, head="human",
                                 tracks=tracks, bins=[447, 448, 449], objective=objective)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bedGraph", "out.h5"]  # no temporaries left
    lines = open(bedgraph).read().splitlines()
    assert lines[0].startswith("track type=bedGraph")
    rows = [line.split("\t") for line in lines[1:]]
    kept = sequence != ord("N")  # the gap's bases (score 0) are left out of the bedGraph
    assert len(rows) == kept.sum() < len(positions)
    assert all(r[0] == "1" and int(r[2]) == int(r[1]) + 1 for r in rows)
    np.testing.assert_array_equal([int(r[1]) for r in rows], positions[kept])
    np.testing.assert_array_equal(np.array([float(r[3]) for r in rows], np.float32), scores[kept])
    with h5py.File(h5) as f:
        assert f.attrs["chrom"] == "1" and f.attrs["head"] == "human"
        assert f.attrs["tracks"].tolist() == [4675, 10] and f.attrs["bins"].tolist() == [447, 448, 449]
        assert f.attrs["objective"] == objective
        np.testing.assert_array_equal(f["position"][:], positions)
        np.testing.assert_array_equal(f["contribution"][:], scores)
        assert f["sequence"].dtype == "S1"
        assert f["sequence"][:].tobytes() == sequence.tobytes()


def test_contribution_files_name_the_contig_as_given_and_carry_provenance(small_run, tmp_path):
    """The region said 'chr1' where the FASTA says '1': the bedGraph and the HDF5 file say 'chr1'."""
    _, genome, region, tracks, (positions, scores, objective) = small_run
    given = Region("chr1", region.start, region.end, "chr1:257001-258000", fasta_chrom="1")
    sequence = genome.fetch(given.fasta_chrom, positions[0], positions[-1] + 1)
    targets = packaged_targets("human").subset(tracks)
    attrs = {"model_sha256": "cd" * 32, "fasta_index_sha256": genome.index_checksum()}
    bedgraph, h5 = write_contrib(tmp_path / "out", given, positions, scores, sequence, head="human", tracks=tracks,
                                 bins=[447, 448, 449], objective=objective, targets=targets, attrs=attrs)
    lines = open(bedgraph).read().splitlines()
    assert 'name="chr1:257001-258000"' in lines[0]
    assert {line.split("\t")[0] for line in lines[1:]} == {"chr1"}
    with h5py.File(h5) as f:
        assert (f.attrs["chrom"], f.attrs["fasta_chrom"], f.attrs["region_name"]) == ("chr1", "1", given.name)
        assert {k: f.attrs[k] for k in attrs} == attrs
        assert f["target_ids"][:].tolist() == [b"CNhs10608", targets.ids[1].encode()]
        assert f["target_labels"][0].decode() == targets.labels[0]


def test_bad_tracks_or_bins_are_refused(small_run):
    model, genome, region, _, _ = small_run
    with pytest.raises(InputError, match="tracks must be a non-empty selection of 0..5312"):
        contributions(model, genome, region, tracks=np.array([5313]))
    with pytest.raises(InputError, match="bins must be a non-empty selection of 0..895"):
        contributions(model, genome, region, tracks=np.array([0]), bins=np.array([896]))
