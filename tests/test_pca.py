"""`enformer-score pca`: principal components of SAD equal an SVD of the centred score matrix, and
the tabix-indexed tables return each variant's coordinates by region."""
import gzip
import json

import h5py
import numpy as np
import pysam
import pytest
from toy_models import BaseCounter

from enformer_vep import pca
from enformer_vep.atomic import sha256_file
from enformer_vep.errors import InputError
from enformer_vep.pca import PcaTransform, fit_pca, run_pca, scored_files, write_pc_tables
from enformer_vep.pipeline import ScoreOptions, score_vcf

TRACKS = 30
IDS = [f"ENCFF{i:03d}" for i in range(TRACKS)]
SIZES = {"chr1": 200, "chr2": 160, "chr10": 120}


@pytest.fixture(params=["one block", "64-row blocks"])
def blocks(request, monkeypatch):
    """Run with the default row blocks (one per file here) and with 64-row blocks (several per file)."""
    if request.param != "one block":
        monkeypatch.setattr(pca, "BLOCK_BYTES", 8 * TRACKS * 64)
    return request.param


LOADINGS, OFFSET = np.random.default_rng(42).normal(size=(3, TRACKS)), 4 * np.random.default_rng(43).normal(size=TRACKS)


def low_rank_sad(rng, n, tracks=TRACKS):
    """[n, tracks] float16: three latent factors of decreasing scale shared by every file, noise, and a
    non-zero mean."""
    latent = rng.normal(size=(n, 3)) * [6.0, 3.0, 1.5]
    return (latent @ LOADINGS[:, :tracks] + 0.3 * rng.normal(size=(n, tracks)) + OFFSET[:tracks]).astype(np.float16)


def write_h5(path, chrom, pos, sad, ids=IDS, chroms=None):
    """A chromosome file in the layout enformer-score writes; returns its rows."""
    n = len(pos)
    rows = {"snp": [f"rs_{chrom}_{i}" for i in range(n)], "chr": chroms or [chrom] * n, "pos": np.asarray(pos),
            "ref": ["ACGT"[i % 4] for i in range(n)], "alt": ["G" * (1 + i % 3) for i in range(n)], "SAD": sad}
    with h5py.File(path, "w") as f:
        for name in ("snp", "chr", "ref", "alt"):
            f[name] = np.array(rows[name], dtype="S")
        f["pos"] = rows["pos"].astype(np.uint32)
        f.create_dataset("SAD", data=sad, chunks=(min(n, 64), sad.shape[1]), compression="gzip")
        f["target_ids"] = np.array(ids, dtype="S")
        f["target_labels"] = np.array([f"CAGE:{t}" for t in ids], dtype="S")
        f["ref_allele"], f["alt_allele"] = h5py.SoftLink("/ref"), h5py.SoftLink("/alt")
    return rows


def write_done(directory, chroms):
    """done.json as a finished run writes it: every file with its rows and SHA-256, skipped.tsv too."""
    (directory / "skipped.tsv").write_text("chrom\tpos\tid\tref\talt\treason\trecord\n")
    files = {f"p.{c}.h5": {"chrom": c, "rows": n, "sha256": sha256_file(directory / f"p.{c}.h5")}
             for c, n in chroms.items()}
    files["skipped.tsv"] = {"sha256": sha256_file(directory / "skipped.tsv")}
    (directory / "done.json").write_text(json.dumps({"files": files, "summary": {"scored": sum(chroms.values())}}))


def fake_run(directory, seed=0, sizes=SIZES, ids=IDS, done=True):
    """A finished run's directory: ``p.CHROM.h5`` per chromosome (sorted positions, with multi-allelic
    repeats). Returns {chrom: rows}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    runs = {}
    for chrom, n in sizes.items():
        pos = np.sort(rng.choice(np.arange(10_000, 5_000_000, 7), size=n))
        pos[40:43] = pos[40:41]  # three ALT alleles of one record (when there are 43 rows)
        runs[chrom] = write_h5(directory / f"p.{chrom}.h5", chrom, pos, low_rank_sad(rng, n, len(ids)), ids)
    if done:
        write_done(directory, sizes)
    return runs


def reference_pca(X, k):
    """The same PCA straight from numpy's SVD of the centred full matrix, with the same sign
    convention: (mean, components [k, T], explained variance, ratio, coordinates [n, k])."""
    X = X.astype(np.float64)
    centred = X - X.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:k] * np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])[:, None]
    return X.mean(0), vt, s[:k] ** 2 / (len(X) - 1), s[:k] ** 2 / (s ** 2).sum(), centred @ vt.T


def table(path, *region):
    with pysam.TabixFile(str(path)) as tbx:
        return [line.split("\t") for line in tbx.fetch(*region)]


def assert_rows(lines, rows, index, coords):
    """Table lines equal the rows ``index`` of a file, values to the printed precision."""
    assert [line[:5] for line in lines] == [[rows["chr"][i], str(rows["pos"][i]), rows["snp"][i], rows["ref"][i],
                                             rows["alt"][i]] for i in index]
    np.testing.assert_allclose(np.array([line[5:] for line in lines], dtype=float).reshape(len(index), -1),
                               coords[index], rtol=1e-5, atol=1e-9)


def test_components_equal_the_svd_of_the_centred_matrix(tmp_path, blocks):
    runs = fake_run(tmp_path)
    X = np.concatenate([r["SAD"] for r in runs.values()])
    mean, components, variance, ratio, _ = reference_pca(X, 5)
    transform = fit_pca(scored_files(tmp_path), components=5)
    np.testing.assert_allclose(transform.mean, mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(transform.components, components, rtol=0, atol=1e-9)
    np.testing.assert_allclose(transform.explained_variance, variance, rtol=1e-10)
    np.testing.assert_allclose(transform.explained_variance_ratio, ratio, rtol=1e-10)
    assert transform.explained_variance_ratio[:3].sum() > 0.95  # the three latent factors
    assert transform.target_ids == IDS and transform.rows == len(X) and transform.stat == "SAD"
    np.testing.assert_allclose(transform.apply(X), (X - mean) @ components.T, rtol=0, atol=1e-8)


def test_max_rows_fits_on_evenly_spaced_rows_of_all_files(tmp_path, blocks):
    runs = fake_run(tmp_path)
    X = np.concatenate([r["SAD"] for r in runs.values()])
    chosen = np.arange(100) * len(X) // 100
    mean, components, variance, _, _ = reference_pca(X[chosen], 4)
    transform = fit_pca(scored_files(tmp_path), components=4, max_rows=100)
    assert transform.rows == 100
    np.testing.assert_allclose(transform.mean, mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(transform.components, components, rtol=0, atol=1e-9)
    np.testing.assert_allclose(transform.explained_variance, variance, rtol=1e-10)


def test_tables_return_each_variant_by_region(tmp_path, blocks):
    runs = fake_run(tmp_path / "scores")
    X = np.concatenate([r["SAD"] for r in runs.values()])
    *_, ratio, coords = reference_pca(X, 20)
    summary = run_pca(tmp_path / "scores", tmp_path / "pcs")
    out = tmp_path / "pcs"
    assert summary["rows"] == len(X) and summary["components"] == 20 and summary["fitted"]
    np.testing.assert_allclose(summary["explained_variance_ratio"], ratio, rtol=1e-9)
    assert sorted(summary["files"]) == sorted(str(out / f"p.{c}.pc.tsv.gz") for c in SIZES)
    assert summary["transform"] == str(out / "pca.npz") and (out / "pca.npz").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["pca.npz"] + [f"p.{c}.pc.tsv.gz{s}" for c in SIZES for s in ("", ".tbi")])
    offsets = np.cumsum([0] + list(SIZES.values()))
    for (chrom, rows), first in zip(runs.items(), offsets[:-1], strict=True):
        path = out / f"p.{chrom}.pc.tsv.gz"
        with gzip.open(path, "rt") as f:
            assert f.readline() == "#CHROM\tPOS\tID\tREF\tALT\t" + "\t".join(f"PC{i}" for i in range(20)) + "\n"
        with pysam.TabixFile(str(path)) as tbx:
            assert tbx.contigs == [chrom]
        file_coords = coords[first:first + len(rows["pos"])]
        assert_rows(table(path), rows, np.arange(len(rows["pos"])), file_coords)
        # a 0-based half-open region starting at the three alleles of one record
        start0, end = int(rows["pos"][40]) - 1, int(rows["pos"][90])
        inside = np.flatnonzero((rows["pos"] > start0) & (rows["pos"] <= end))
        assert len(inside) >= 51
        assert_rows(table(path, chrom, start0, end), rows, inside, file_coords)
        assert table(path, chrom, start0 + 1, int(rows["pos"][43]) - 1) == []


def test_unsorted_rows_are_sorted_stably_and_contigs_kept_together(tmp_path, blocks):
    rng = np.random.default_rng(3)
    pos = rng.choice(np.arange(1000, 1200), size=150)  # shuffled, with many repeated positions
    shuffled = write_h5(tmp_path / "p.chr1.h5", "chr1", pos, low_rank_sad(rng, 150))
    chroms = ["chrB" if i % 3 else "chrA" for i in range(150)]
    mixed = write_h5(tmp_path / "p.mixed.h5", "chrA", np.arange(150) % 7 + 5, low_rank_sad(rng, 150), chroms=chroms)
    transform = fit_pca([tmp_path / "p.chr1.h5", tmp_path / "p.mixed.h5"], components=3)
    tables = write_pc_tables([tmp_path / "p.chr1.h5", tmp_path / "p.mixed.h5"], transform, tmp_path / "out")
    assert tables == [tmp_path / "out" / "p.chr1.pc.tsv.gz", tmp_path / "out" / "p.mixed.pc.tsv.gz"]
    assert_rows(table(tables[0]), shuffled, np.argsort(pos, kind="stable"), transform.apply(shuffled["SAD"]))
    key = np.array([c == "chrB" for c in chroms]) * 1000 + mixed["pos"]
    assert_rows(table(tables[1]), mixed, np.argsort(key, kind="stable"), transform.apply(mixed["SAD"]))
    b_rows = [i for i in np.argsort(mixed["pos"], kind="stable") if chroms[i] == "chrB" and 6 <= mixed["pos"][i] <= 8]
    assert_rows(table(tables[1], "chrB", 5, 8), mixed, b_rows, transform.apply(mixed["SAD"]))


def test_a_saved_transform_applies_to_another_run(tmp_path, blocks):
    first = fake_run(tmp_path / "a", seed=1)
    second = fake_run(tmp_path / "b", seed=2, sizes={"chr3": 90, "chrX": 70})
    mean, components, *_ = reference_pca(np.concatenate([r["SAD"] for r in first.values()]), 6)
    run_pca(tmp_path / "a", tmp_path / "pa", components=6)
    fitted = fit_pca(scored_files(tmp_path / "a"), components=6)
    saved = PcaTransform.load(tmp_path / "pa" / "pca.npz")
    for name in ("mean", "components", "explained_variance", "explained_variance_ratio"):
        np.testing.assert_array_equal(getattr(saved, name), getattr(fitted, name))
    assert saved.target_ids == IDS and saved.stat == "SAD" and saved.rows == sum(SIZES.values())

    summary = run_pca(tmp_path / "b", tmp_path / "pb", transform_path=tmp_path / "pa" / "pca.npz")
    assert not summary["fitted"] and summary["rows"] == 160 and not (tmp_path / "pb" / "pca.npz").exists()
    assert summary["transform"] == str(tmp_path / "pa" / "pca.npz")
    for chrom, rows in second.items():
        expected = (rows["SAD"].astype(np.float64) - mean) @ components.T
        lines = table(tmp_path / "pb" / f"p.{chrom}.pc.tsv.gz")
        assert_rows(lines, rows, np.arange(len(lines)), expected)
        np.testing.assert_allclose(saved.apply(rows["SAD"]), expected, rtol=0, atol=1e-8)
    # the first components only
    run_pca(tmp_path / "b", tmp_path / "pb2", transform_path=tmp_path / "pa" / "pca.npz", components=2)
    lines = table(tmp_path / "pb2" / "p.chrX.pc.tsv.gz")
    assert_rows(lines, second["chrX"], np.arange(70), (second["chrX"]["SAD"] - mean) @ components[:2].T)


def test_scores_of_a_real_run(tmp_path):
    """An enformer-score run of a toy model (track c counts base c per bin) on two contigs."""
    rng = np.random.default_rng(5)
    genome = {c: rng.choice(list("ACGT"), size=600_000) for c in ("t", "u")}
    (tmp_path / "g.fa").write_text("".join(f">{c}\n" + "\n".join("".join(s[i:i + 60]) for i in range(0, len(s), 60))
                                           + "\n" for c, s in genome.items()))
    (tmp_path / "targets.txt").write_text("index\tgenome\tidentifier\tfile\tclip\tscale\tsum_stat\tdescription\n"
                                          + "".join(f"{i}\t0\tcount_{b}\t.\t0\t1\tsum\tTOY:{b}\n"
                                                    for i, b in enumerate("ACGT")))
    records = []
    for c, seq in genome.items():
        for i, p in enumerate(range(250_000, 250_000 + 900 * 9, 900)):
            ref = "".join(seq[p - 1:p + i % 3])  # SNVs and deletions of up to 2 bases
            alt = next(b for b in "ACGT" if b != seq[p - 1]) if i % 3 == 0 else ref[0]
            records.append(f"{c}\t{p}\tv{c}{i}\t{ref}\t{alt}\t.\tPASS\t.\n")
    (tmp_path / "in.vcf").write_text("##fileformat=VCFv4.2\n"
                                     + "".join(f"##contig=<ID={c},length=600000>\n" for c in genome)
                                     + "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n" + "".join(records))
    score_vcf(ScoreOptions(str(tmp_path / "in.vcf"), str(tmp_path / "g.fa"), str(tmp_path / "scores"),
                           targets=str(tmp_path / "targets.txt"), stats=("SAD",), progress=False), model=BaseCounter())
    summary = run_pca(tmp_path / "scores", tmp_path / "pcs", components=3)
    assert summary["rows"] == 18 and summary["files"] == [str(tmp_path / "pcs" / f"in.{c}.pc.tsv.gz") for c in "tu"]
    files = {c: h5py.File(tmp_path / "scores" / f"in.{c}.h5", "r") for c in "tu"}
    X = np.concatenate([f["SAD"][:] for f in files.values()])
    *_, variance, _, _ = reference_pca(X, 3)
    transform = PcaTransform.load(tmp_path / "pcs" / "pca.npz")
    assert transform.target_ids == [f"count_{b}" for b in "ACGT"]
    # eigenvalues are unique even where a toy's symmetric scores leave the eigenvectors free
    np.testing.assert_allclose(transform.explained_variance, variance, rtol=1e-9)
    np.testing.assert_allclose(transform.components @ transform.components.T, np.eye(3), atol=1e-12)
    for c, f in files.items():
        rows = {k: [v.decode() for v in f[k][:]] for k in ("snp", "chr", "ref", "alt")} | {"pos": f["pos"][:]}
        assert rows["snp"] == [f"v{c}{i}" for i in range(9)]
        assert_rows(table(tmp_path / "pcs" / f"in.{c}.pc.tsv.gz", c, 249_999, 254_500), rows, np.arange(6),
                    transform.apply(f["SAD"][:]))
        f.close()


# --- refusals -----------------------------------------------------------------------------------

def test_an_unfinished_or_altered_run_is_refused(tmp_path):
    fake_run(tmp_path / "run", done=False)
    with pytest.raises(InputError, match=r"unfinished run \(no done.json\)"):
        run_pca(tmp_path / "run", tmp_path / "out")
    write_done(tmp_path / "run", SIZES)
    with h5py.File(tmp_path / "run" / "p.chr2.h5", "a") as f:
        f["SAD"][0, 0] = 99
    with pytest.raises(InputError, match=r"p.chr2.h5 differs from its checksum in done.json"):
        run_pca(tmp_path / "run", tmp_path / "out")
    (tmp_path / "run" / "p.chr2.h5").unlink()
    with pytest.raises(InputError, match=r"lacks p.chr2.h5, listed in its done.json"):
        run_pca(tmp_path / "run", tmp_path / "out")
    with pytest.raises(InputError, match=r"is not a directory"):
        run_pca(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sizes, components, message", [
    (SIZES, 31, r"between 1 and 30 \(variants - 1 = 479, tracks = 30\), not 31"),
    ({"chr1": 2, "chr2": 1}, 3, r"between 1 and 2 \(variants - 1 = 2, tracks = 30\), not 3"),
    (SIZES, 0, r"between 1 and 30"),
    ({"chr1": 1}, 1, r"at least 2 variants; 1 given"),
])
def test_impossible_component_counts_are_refused(tmp_path, sizes, components, message):
    fake_run(tmp_path / "run", sizes=sizes)
    with pytest.raises(InputError, match=message):
        run_pca(tmp_path / "run", tmp_path / "out", components=components)
    assert not list((tmp_path / "out").iterdir())


def test_tracks_and_statistics_must_match(tmp_path):
    fake_run(tmp_path / "run")
    with pytest.raises(InputError, match=r"p.chr1.h5 has no SAR statistic \(choose one it has: SAD\)"):
        run_pca(tmp_path / "run", tmp_path / "out", stat="SAR")
    other = IDS[:29] + ["ENCFF999"]
    rng = np.random.default_rng(0)
    write_h5(tmp_path / "run" / "p.chr2.h5", "chr2", np.arange(1, 161), low_rank_sad(rng, 160), ids=other)
    write_done(tmp_path / "run", SIZES)
    with pytest.raises(InputError, match=r"p.chr2.h5 and .*p.chr1.h5 score different tracks"):
        run_pca(tmp_path / "run", tmp_path / "out")

    fake_run(tmp_path / "fit")
    run_pca(tmp_path / "fit", tmp_path / "fitted")
    fake_run(tmp_path / "fewer", ids=IDS[:29])
    fake_run(tmp_path / "renamed", ids=other)
    for directory, counts, track in (("fewer", "29 vs 30", 29), ("renamed", "30 vs 30", 29)):
        with pytest.raises(InputError, match=rf"other tracks than the PCA transform was fitted on \({counts} tracks, "
                                             rf"first difference at track {track}\)"):
            run_pca(tmp_path / directory, tmp_path / "out", transform_path=tmp_path / "fitted" / "pca.npz")
    with pytest.raises(InputError, match=r"holds principal components of SAD, not of SAR"):
        run_pca(tmp_path / "fit", tmp_path / "out", stat="SAR", transform_path=tmp_path / "fitted" / "pca.npz")
    with pytest.raises(InputError, match=r"holds 20 components, so between 1 and that many can be used, not 21"):
        run_pca(tmp_path / "fit", tmp_path / "out", components=21, transform_path=tmp_path / "fitted" / "pca.npz")
    with pytest.raises(InputError, match=r"takes 30 tracks, not an array of shape \(2, 29\)"):
        PcaTransform.load(tmp_path / "fitted" / "pca.npz").apply(np.zeros((2, 29)))


def test_missing_or_corrupt_transform_files_are_refused(tmp_path):
    fake_run(tmp_path / "run")
    run_pca(tmp_path / "run", tmp_path / "fitted", components=3)
    good = (tmp_path / "fitted" / "pca.npz").read_bytes()
    with pytest.raises(InputError, match=r"no PCA transform file .*absent.npz"):
        run_pca(tmp_path / "run", tmp_path / "out", transform_path=tmp_path / "absent.npz")
    for name, content in (("garbage.npz", b"not a zip"), ("truncated.npz", good[:len(good) // 2]),
                          ("array.npz", None), ("partial.npz", None)):
        path = tmp_path / name
        if name == "array.npz":
            np.save(open(path, "wb"), np.zeros(3))
        elif name == "partial.npz":
            np.savez(path, mean=np.zeros(30), components=np.zeros((3, 30)))
        else:
            path.write_bytes(content)
        with pytest.raises(InputError, match=rf"{name} is not a PCA transform written by `enformer-score pca`"):
            run_pca(tmp_path / "run", tmp_path / "out", transform_path=path)
    assert not list((tmp_path / "out").glob("*.gz"))


def test_pca_command_on_a_real_giab_run(tmp_path, fast_model):
    """`enformer-score pca` from the command line on 20 real GIAB variants scored over 40 tracks: the
    tables, queried by region with tabix, hold exactly those variants and their PCs."""
    from click.testing import CliRunner
    from helpers import DATA

    from enformer_vep.cli import cli

    giab = DATA / "grch38_chr1_giab_hg002"
    lines = (giab / "input.vcf").read_text().splitlines(keepends=True)
    (tmp_path / "twenty.vcf").write_text("".join([x for x in lines if x.startswith("#")]
                                                 + [x for x in lines if not x.startswith("#")][:20]))
    runner = CliRunner()
    result = runner.invoke(cli, [str(tmp_path / "twenty.vcf"), "--fasta", str(giab / "reference.fa"), "--model",
                                 str(fast_model), "--device", "cpu", "--tracks", "0-39", "-o", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["pca", str(tmp_path / "s"), "-o", str(tmp_path / "pc"), "--components", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 tables, 20 variants, PC0..PC2 of SAD" in result.output
    with h5py.File(tmp_path / "s" / "twenty.chr1.h5", "r") as f:
        X, pos = f["SAD"][:].astype(np.float64), f["pos"][:]
        ids = [s.decode() for s in f["snp"][:]]
    want = reference_pca(X, 3)[4]
    rows = table(tmp_path / "pc" / "twenty.chr1.pc.tsv.gz", "chr1", int(pos[4]) - 1, int(pos[9]))
    assert [r[2] for r in rows] == ids[4:10] and [int(r[1]) for r in rows] == pos[4:10].tolist()
    got = np.array([r[5:] for r in rows], dtype=float)
    np.testing.assert_allclose(got, want[4:10], rtol=1e-5, atol=1e-6 * np.abs(want).max())
