"""read_scores / read_gene_scores / top against plain h5py reads of the same files."""
import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from enformer_vep.cli import cli
from enformer_vep.errors import InputError
from enformer_vep.reader import read_gene_scores, read_scores, top_variants


@pytest.fixture
def run(gene_run):
    """The shared run (conftest ``gene_run``): 13 variants, SAD and SAR over tracks 0-9 and the CAGE track 4675."""
    return gene_run


def plain(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f if isinstance(f[name], h5py.Dataset)}


def test_read_scores_equals_the_file(run):
    f = plain(run / "input.chr1.h5")
    table = read_scores(run)
    assert table.shape == f["SAD"].shape and table.dtypes.unique().tolist() == [np.float32]
    np.testing.assert_array_equal(table.to_numpy(), f["SAD"].astype(np.float32))
    assert table.columns.tolist() == f["target_ids"].astype(str).tolist()
    assert table.index.names == ["chr", "pos", "ref", "alt", "snp"]
    for name in ("chr", "ref", "alt", "snp"):
        assert table.index.get_level_values(name).tolist() == f[name].astype(str).tolist()
    assert table.index.get_level_values("pos").tolist() == f["pos"].tolist()
    np.testing.assert_array_equal(read_scores(run / "input.chr1.h5", stat="SAR").to_numpy(), f["SAR"])


def test_only_the_rows_and_tracks_asked(run):
    f = plain(run / "input.chr1.h5")
    inside = (f["pos"] >= 820_000) & (f["pos"] <= 845_000)
    ids = f["target_ids"].astype(str)
    for tracks, columns in [([3, 0], [3, 0]), ([ids[5], ids[10]], [5, 10]), ("2-4", [2, 3, 4]), ("^CAGE", [10])]:
        table = read_scores(run, tracks=tracks, region="1:820,000-845,000")  # Ensembl name for the VCF's chr1
        np.testing.assert_array_equal(table.to_numpy(), f["SAD"][inside][:, columns].astype(np.float32))
        assert table.columns.tolist() == ids[columns].tolist()
    assert read_scores(run, region="chr1:1-100").shape == (0, 11)


def test_read_gene_scores_equals_the_file_joined_to_its_variants(run):
    genes, variants = plain(run / "input.chr1.genes.h5"), plain(run / "input.chr1.h5")
    table = read_gene_scores(run, stat="SED")
    np.testing.assert_array_equal(table.to_numpy(), genes["SED"].astype(np.float32))
    index = table.index.to_frame(index=False)
    assert index["pos"].tolist() == variants["pos"][genes["si"]].tolist()
    assert index["snp"].tolist() == variants["snp"][genes["si"]].astype(str).tolist()
    assert index["gene_id"].tolist() == genes["gene_id"].astype(str).tolist()
    assert index["tss_distance"].tolist() == genes["tss_distance"].tolist()
    inside = variants["pos"][genes["si"]] >= 840_000
    part = read_gene_scores(run, region="chr1:840000-851000", tracks=[10])
    np.testing.assert_array_equal(part.to_numpy()[:, 0], genes["logSED"][inside, 10].astype(np.float32))


def test_anndata(run):
    f = plain(run / "input.chr1.h5")
    data = read_scores(run, stat=["SAD", "SAR"], as_anndata=True)
    np.testing.assert_array_equal(data.X, f["SAD"].astype(np.float32))
    np.testing.assert_array_equal(data.layers["SAR"], f["SAR"].astype(np.float32))
    assert data.obs["pos"].tolist() == f["pos"].tolist()
    assert data.var_names.tolist() == f["target_ids"].astype(str).tolist()
    assert data.var["description"].tolist() == f["target_labels"].astype(str).tolist()
    genes = read_gene_scores(run, stat=["SED", "logSED"], as_anndata=True)
    assert genes.obs["gene_name"].tolist() == plain(run / "input.chr1.genes.h5")["gene_name"].astype(str).tolist()


def test_top_lists_the_strongest_alleles_by_hand(run, tmp_path):
    f = plain(run / "input.chr1.h5")
    sad = f["SAD"].astype(np.float32)
    strength = np.abs(sad).max(axis=1)
    order = np.argsort(-strength, kind="stable")[:5]
    result = CliRunner().invoke(cli, ["top", str(run), "-n", "5", "--tsv", str(tmp_path / "top.tsv")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "top.tsv", sep="\t")
    assert table["pos"].tolist() == f["pos"][order].tolist()
    strongest = np.abs(sad[order]).argmax(axis=1)
    np.testing.assert_allclose(table["SAD"], sad[order, strongest])
    assert table["track"].tolist() == f["target_ids"][strongest].astype(str).tolist()
    second = np.argsort(-np.abs(sad[order]), axis=1, kind="stable")[:, 1]
    assert table["track_2"].tolist() == f["target_ids"][second].astype(str).tolist()
    assert str(f["pos"][order[0]]) in result.output.splitlines()[1]
    cage = top_variants(run, 3, family="cage")
    assert cage["track"].tolist() == [f["target_ids"][10].decode()] * 3
    assert cage["pos"].tolist() == f["pos"][np.argsort(-np.abs(sad[:, 10]), kind="stable")[:3]].tolist()


@pytest.mark.parametrize("call, message", [
    (lambda run: read_scores(run, stat="SADR"), "has no SADR"),
    (lambda run: read_scores(run, tracks=["nope"]), "'nope' is not among"),
    (lambda run: read_scores(run, tracks=[99]), "track column 99"),
    (lambda run: read_scores(run, region="chr9:1-10"), "contig chr9 is not among the run's"),
    (lambda run: read_scores(run, stat=["SAD", "SAR"]), "several need as_anndata"),
    (lambda run: read_scores(run.parent), "not a finished enformer-score run"),
    (lambda run: top_variants(run, family="ATAC"), "no ATAC tracks in the run; its families: DNASE, CAGE"),
])
def test_clear_errors(run, call, message):
    with pytest.raises(InputError, match=message):
        call(run)
