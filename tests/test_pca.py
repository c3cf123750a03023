"""`enformer-score pca`: principal components of SAD equal an SVD of the centred score matrix, by
either method (streaming covariance for many variants, Gram matrix for few), and the tabix-indexed
tables return each variant's coordinates by region."""
import gzip
import json
import logging

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


WIDE = 300  # tracks of the few-variants shape, where the Gram matrix is the smaller one
WIDE_IDS = [f"ENCFF{i:03d}" for i in range(WIDE)]
FEW = {"chr1": 25, "chr2": 15}
LOADINGS, OFFSET = np.random.default_rng(42).normal(size=(3, WIDE)), 4 * np.random.default_rng(43).normal(size=WIDE)


def low_rank_sad(rng, n, tracks=TRACKS):
    """[n, tracks] float16: three latent factors of decreasing scale shared by every file, noise, and a
    non-zero mean."""
    latent = rng.normal(size=(n, 3)) * [6.0, 3.0, 1.5]
    return (latent @ LOADINGS[:, :tracks] + 0.3 * rng.normal(size=(n, tracks)) + OFFSET[:tracks]).astype(np.float16)


def write_h5(path, chrom, pos, sad, ids=IDS, chroms=None, snps=None):
    """A chromosome file in the layout enformer-score writes; returns its rows."""
    n = len(pos)
    rows = {"snp": snps or [f"rs_{chrom}_{i}" for i in range(n)], "chr": chroms or [chrom] * n, "pos": np.asarray(pos),
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


def fake_run(directory, seed=0, sizes=SIZES, ids=IDS, done=True, run_json=True):
    """A finished run's directory: ``run.json``, ``p.CHROM.h5`` per chromosome (sorted positions, with
    multi-allelic repeats). Returns {chrom: rows}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    if run_json:
        (directory / "run.json").write_text(json.dumps({"vcf": "in.vcf", "options": {}}))
    runs = {}
    for chrom, n in sizes.items():
        pos = np.sort(rng.choice(np.arange(10_000, 5_000_000, 7), size=n))
        pos[40:43] = pos[40:41]  # three ALT alleles of one record (when there are 43 rows)
        runs[chrom] = write_h5(directory / f"p.{chrom}.h5", chrom, pos, low_rank_sad(rng, n, len(ids)), ids)
    if done:
        write_done(directory, sizes)
    return runs


# Expected rounding: float64 (2^-53 = 1.1e-16 a rounding, eps below) on float16 scores; an eigendecomposition
# of the covariance (or Gram matrix) against an SVD agree on each eigenvalue to ~eps x lambda_1 and on each
# component to ~eps x lambda_1 / (its eigenvalue gap). On fake_run's data lambda_1 is 647 (480 x 30) or 8,090
# (40 x 300): ~1e-12 relative for the fifth eigenvalue, 5e-11 for the first five components and 6e-10 for all.
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
    """Table lines equal the rows ``index`` of a file, values to the printed precision ('%.6g': <= 5e-6 of the
    value; measured 5e-6)."""
    assert [line[:5] for line in lines] == [[rows["chr"][i], str(rows["pos"][i]), rows["snp"][i], rows["ref"][i],
                                             rows["alt"][i]] for i in index]
    np.testing.assert_allclose(np.array([line[5:] for line in lines], dtype=float).reshape(len(index), -1),
                               coords[index], rtol=1e-5, atol=1e-9)


def test_components_equal_the_svd_of_the_centred_matrix(tmp_path, blocks):
    runs = fake_run(tmp_path)
    X = np.concatenate([r["SAD"] for r in runs.values()])
    mean, components, variance, ratio, _ = reference_pca(X, 5)
    transform = fit_pca(scored_files(tmp_path), components=5)
    # float64 (see reference_pca): means of values < 30 to ~1e-14 (measured 4e-15); components 5e-11 (measured
    # 2.3e-12); eigenvalues and ratios 1e-12 relative (measured 2.1e-13)
    np.testing.assert_allclose(transform.mean, mean, rtol=0, atol=1e-13)
    np.testing.assert_allclose(transform.components, components, rtol=0, atol=5e-10)
    np.testing.assert_allclose(transform.explained_variance, variance, rtol=1e-11)
    np.testing.assert_allclose(transform.explained_variance_ratio, ratio, rtol=1e-11)
    assert transform.explained_variance_ratio[:3].sum() > 0.95  # the three latent factors
    assert transform.target_ids == IDS and transform.rows == len(X) and transform.stat == "SAD"
    # the components' error (5e-11 an entry) times centred rows of norm up to ~100: ~1e-8 (measured 4e-12)
    np.testing.assert_allclose(transform.apply(X), (X - mean) @ components.T, rtol=0, atol=1e-8)


def test_max_rows_fits_on_evenly_spaced_rows_of_all_files(tmp_path, blocks):
    runs = fake_run(tmp_path)
    X = np.concatenate([r["SAD"] for r in runs.values()])
    chosen = np.arange(100) * len(X) // 100
    mean, components, variance, _, _ = reference_pca(X[chosen], 4)
    transform = fit_pca(scored_files(tmp_path), components=4, max_rows=100)
    assert transform.rows == 100
    # float64 as above: measured 9e-16, 3e-13 and 4e-14
    np.testing.assert_allclose(transform.mean, mean, rtol=0, atol=1e-13)
    np.testing.assert_allclose(transform.components, components, rtol=0, atol=5e-10)
    np.testing.assert_allclose(transform.explained_variance, variance, rtol=1e-11)


SHAPES = {"many variants (480 x 30)": (SIZES, IDS), "few variants (40 x 300)": (FEW, WIDE_IDS)}


@pytest.mark.parametrize("method", ["auto", "covariance", "gram"])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_methods_equal_the_svd_of_the_centred_matrix_on_both_shapes(tmp_path, blocks, shape, method):
    """The streaming covariance and the Gram matrix give numpy's SVD of the centred matrix, on many
    variants over few tracks and few variants over many, with every component and with max_rows."""
    sizes, ids = SHAPES[shape]
    runs = fake_run(tmp_path, sizes=sizes, ids=ids)
    X = np.concatenate([r["SAD"] for r in runs.values()])
    for k, max_rows in ((5, None), (min(len(X) - 1, len(ids)), None), (4, 31)):
        chosen = X if max_rows is None else X[np.arange(max_rows) * len(X) // max_rows]
        mean, components, variance, ratio, _ = reference_pca(chosen, k)
        transform = fit_pca(scored_files(tmp_path), components=k, max_rows=max_rows, method=method)
        scale = variance[0]
        assert transform.rows == len(chosen) and transform.target_ids == ids
        # float64 (see reference_pca), every component included: components to 6e-10 (measured 8.5e-12),
        # eigenvalues to ~eps x lambda_1 (measured 1e-15 of it), ratios likewise (measured 7e-16),
        # orthonormality to a few eps (measured 1.8e-15)
        np.testing.assert_allclose(transform.mean, mean, rtol=0, atol=1e-13)
        np.testing.assert_allclose(transform.components, components, rtol=0, atol=5e-9)
        np.testing.assert_allclose(transform.explained_variance, variance, rtol=5e-11, atol=1e-14 * scale)
        np.testing.assert_allclose(transform.explained_variance_ratio, ratio, rtol=5e-11, atol=1e-15)
        np.testing.assert_allclose(transform.components @ transform.components.T, np.eye(k), atol=2e-14)


@pytest.mark.parametrize("shape, method", [("many variants (480 x 30)", "covariance"),
                                           ("few variants (40 x 300)", "gram")])
def test_the_method_fits_the_shape(tmp_path, monkeypatch, caplog, shape, method):
    """Few variants over many tracks: the eigendecomposition is of the n x n Gram matrix, not the T x T
    covariance; many variants: of the T x T covariance, accumulated without holding the rows."""
    sizes, ids = SHAPES[shape]
    fake_run(tmp_path, sizes=sizes, ids=ids)
    rows = sum(sizes.values())
    assert pca.choose_method(rows, len(ids)) == method
    decomposed, eigh = [], np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: decomposed.append(a.shape) or eigh(a))
    with caplog.at_level(logging.INFO, logger="enformer_vep"):
        fit_pca(scored_files(tmp_path), components=3)
    side = rows if method == "gram" else len(ids)
    assert decomposed == [(side, side)]
    assert f"from the {side} x {side} {'Gram matrix' if method == 'gram' else 'covariance'}" in caplog.text
    assert pca.choose_method(len(ids), len(ids)) == "gram" and pca.choose_method(len(ids) + 1, len(ids)) == "covariance"
    with pytest.raises(InputError, match=r"unknown PCA method 'svd': choose one of auto, covariance, gram"):
        fit_pca(scored_files(tmp_path), components=3, method="svd")


@pytest.mark.parametrize("method", ["covariance", "gram"])
def test_fewer_distinct_variants_than_components(tmp_path, method):
    """Ten variants that are five rows twice: four components carry the variance, and the others are
    still orthonormal (with zero variance) by either method."""
    rng = np.random.default_rng(7)
    sad = np.repeat(low_rank_sad(rng, 5, WIDE), 2, axis=0)
    write_h5(tmp_path / "p.chr1.h5", "chr1", np.arange(1, 11), sad, ids=WIDE_IDS)
    mean, components, variance, _, _ = reference_pca(sad, 4)
    transform = fit_pca([tmp_path / "p.chr1.h5"], components=9, method=method)
    # float64 (see reference_pca; lambda_1 2,197, lambda_4 5.4): means measured 4e-16, components 2.7e-14,
    # eigenvalues 5e-15 relative (~eps x lambda_1 / lambda_4 = 9e-14) and 2e-16 of lambda_1 where zero,
    # orthonormality 9e-16
    np.testing.assert_allclose(transform.mean, mean, rtol=0, atol=1e-13)
    np.testing.assert_allclose(transform.components[:4], components, rtol=0, atol=3e-13)
    np.testing.assert_allclose(transform.explained_variance[:4], variance, rtol=1e-12)
    np.testing.assert_allclose(transform.explained_variance[4:], 0, atol=1e-14 * variance[0])
    np.testing.assert_allclose(transform.components @ transform.components.T, np.eye(9), atol=2e-14)


@pytest.mark.parametrize("method", ["covariance", "gram"])
def test_undefined_components_are_refused_by_either_method(tmp_path, method):
    sad = np.ones((6, WIDE), dtype=np.float16)
    write_h5(tmp_path / "p.same.h5", "chr1", np.arange(1, 7), sad, ids=WIDE_IDS)
    with pytest.raises(InputError, match=r"SAD is the same for every variant: there are no principal components"):
        fit_pca([tmp_path / "p.same.h5"], components=2, method=method)
    sad[3, 7] = np.nan
    write_h5(tmp_path / "p.nan.h5", "chr1", np.arange(1, 7), sad, ids=WIDE_IDS)
    with pytest.raises(InputError, match=r"the SAD values hold NaN or infinity: principal components are undefined"):
        fit_pca([tmp_path / "p.nan.h5"], components=2, method=method)


def test_progress_bars_and_log_lines(tmp_path, monkeypatch, capsys, caplog):
    """A bar on stderr for the pass over the files and for the tables (progress=True, or a terminal);
    without a bar, log lines: the method, the eigendecomposition, the time, periodic counts."""
    fake_run(tmp_path / "run", sizes=FEW, ids=WIDE_IDS)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="enformer_vep"):
        run_pca(tmp_path / "run", tmp_path / "bar", components=3, progress=True)
    err = capsys.readouterr().err
    assert "pca: reading SAD: 100%" in err and "pca: writing tables: 100%" in err and "40/40" in err
    assert "pca: fitting 3 components of SAD on 40 variants x 300 tracks (2 files) from the 40 x 40 Gram" in caplog.text
    assert "pca: eigendecomposition of the 40 x 40 Gram matrix" in caplog.text
    assert "pca: fitted in " in caplog.text and "pca: writing 2 tables of PC0..PC2 for 40 variants" in caplog.text

    caplog.clear()
    monkeypatch.setattr(pca, "LOG_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="enformer_vep"):
        run_pca(tmp_path / "run", tmp_path / "logs", components=3)  # stderr is no terminal here
    assert "pca: reading SAD: 25 of 40 variants" in caplog.text and "pca: writing tables: 40 of 40" in caplog.text
    assert "100%" not in capsys.readouterr().err

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="enformer_vep"):
        run_pca(tmp_path / "run", tmp_path / "quiet", components=3, progress=False)
    assert " of 40 variants" not in caplog.text and "100%" not in capsys.readouterr().err


def test_tables_return_each_variant_by_region(tmp_path, blocks):
    runs = fake_run(tmp_path / "scores")
    X = np.concatenate([r["SAD"] for r in runs.values()])
    *_, ratio, coords = reference_pca(X, 20)
    summary = run_pca(tmp_path / "scores", tmp_path / "pcs")
    out = tmp_path / "pcs"
    assert summary["rows"] == len(X) and summary["components"] == 20 and summary["fitted"]
    # float64: ~eps x lambda_1 / lambda_20 = 2e-12 relative; measured 4.7e-13
    np.testing.assert_allclose(summary["explained_variance_ratio"], ratio, rtol=1e-11)
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
        # float64: the components' error times the rows' norm, ~1e-8 (measured 3e-12)
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
            vid = "." if i == 4 else f"v{c}{i}"  # a record without an ID
            records.append(f"{c}\t{p}\t{vid}\t{ref}\t{alt}\t.\tPASS\t.\n")
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
    # eigenvalues are unique even where a toy's symmetric scores leave the eigenvectors free; float64: a few
    # eps x lambda_1 / lambda_3 = 1.6e-15 relative (measured 7e-16), orthonormality a few eps (measured 9e-16)
    np.testing.assert_allclose(transform.explained_variance, variance, rtol=3e-14)
    np.testing.assert_allclose(transform.components @ transform.components.T, np.eye(3), atol=2e-14)
    for c, f in files.items():
        rows = {k: [v.decode() for v in f[k][:]] for k in ("snp", "chr", "ref", "alt")} | {"pos": f["pos"][:]}
        missing = f"{c}:{250_000 + 900 * 4}"  # what the run stores for the ID '.'
        assert rows["snp"] == [missing if i == 4 else f"v{c}{i}" for i in range(9)]
        lines = table(tmp_path / "pcs" / f"in.{c}.pc.tsv.gz", c, 249_999, 254_500)
        assert lines[4][2] == "." and [line[2] for line in lines[:4]] == rows["snp"][:4]
        rows["snp"][4] = "."
        assert_rows(lines, rows, np.arange(6), transform.apply(f["SAD"][:]))
        f.close()


# --- refusals -----------------------------------------------------------------------------------

def test_a_folder_that_is_no_run_is_not_called_unfinished(tmp_path):
    """A folder without run.json (an empty one, the VCF's, a run's parent) is no enformer-score output;
    "unfinished" is said only of a run that has its run.json and no done.json."""
    (tmp_path / "empty").mkdir()
    fake_run(tmp_path / "runs" / "a")
    fake_run(tmp_path / "copied", run_json=False)  # score files with a done.json, but no run record
    for directory in ("empty", "runs", "copied"):
        with pytest.raises(InputError, match=rf"{directory} is not an enformer-score output directory \(no run.json\): "
                                             rf"give the -o directory of an enformer-score run, shard or merge"):
            run_pca(tmp_path / directory, tmp_path / "out")
        with pytest.raises(InputError, match=r"is not an enformer-score output directory"):
            write_pc_tables(tmp_path / directory, PcaTransform(np.zeros(30), np.eye(1, 30), np.ones(1), np.ones(1),
                                                               IDS), tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
    assert not (tmp_path / "out").exists()


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


def test_a_failed_call_leaves_no_output_folder_behind(tmp_path, monkeypatch):
    """OUT (and parents) are created only to write into: refusals leave none, a failure after creating
    them removes the still-empty folders made, and a folder that existed, or holds a file, is kept."""
    fake_run(tmp_path / "run")
    fake_run(tmp_path / "other", ids=IDS[:29])
    run_pca(tmp_path / "run", tmp_path / "fitted", components=3)
    nested = tmp_path / "a" / "b" / "out"
    failures = [dict(components=40), dict(stat="SAR"), dict(transform_path=tmp_path / "absent.npz"),
                dict(transform_path=tmp_path / "fitted" / "pca.npz", components=4)]
    for kwargs in failures:
        with pytest.raises(InputError):
            run_pca(tmp_path / "run", nested, **kwargs)
        assert not (tmp_path / "a").exists()
    with pytest.raises(InputError, match=r"other tracks than the PCA transform"):
        run_pca(tmp_path / "other", nested, transform_path=tmp_path / "fitted" / "pca.npz")
    with pytest.raises(InputError, match=r"other tracks than the PCA transform"):
        write_pc_tables(tmp_path / "other", PcaTransform.load(tmp_path / "fitted" / "pca.npz"), nested)
    assert not (tmp_path / "a").exists()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PcaTransform, "save", full_disk)  # fails after creating OUT, before writing into it
    with pytest.raises(OSError, match="No space left"):
        run_pca(tmp_path / "run", nested, components=3)
    assert not (tmp_path / "a").exists()
    (tmp_path / "a").mkdir()  # existed before: kept, the folders made inside it are removed
    with pytest.raises(OSError, match="No space left"):
        run_pca(tmp_path / "run", nested, components=3)
    assert list((tmp_path / "a").iterdir()) == []
    nested.mkdir(parents=True)  # an empty OUT that existed before is kept too
    with pytest.raises(OSError, match="No space left"):
        run_pca(tmp_path / "run", nested, components=3)
    assert nested.is_dir() and list(nested.iterdir()) == []
    monkeypatch.undo()

    monkeypatch.setattr(pca, "_write_table", full_disk)
    nested.rmdir()
    with pytest.raises(OSError, match="No space left"):  # pca.npz written: OUT holds it and stays
        run_pca(tmp_path / "run", nested, components=3)
    assert [p.name for p in nested.iterdir()] == ["pca.npz"]
    with pytest.raises(OSError, match="No space left"):
        write_pc_tables(tmp_path / "run", PcaTransform.load(nested / "pca.npz"), tmp_path / "c" / "tables")
    assert not (tmp_path / "c").exists()

    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "out"):
        with pytest.raises(InputError, match=r"(exists and is not a directory|cannot create output directory)"):
            run_pca(tmp_path / "run", out, components=3)
    assert (tmp_path / "file").read_text() == "x"


def test_existing_results_are_kept_unless_overwrite(tmp_path, monkeypatch):
    """A second fit into the same OUT is refused before any work (pca.npz and the tables kept as they
    were) unless overwrite=True; so are tables already there when a transform is applied."""
    fake_run(tmp_path / "run")
    fake_run(tmp_path / "other", seed=9)
    out = tmp_path / "out"
    run_pca(tmp_path / "run", out, components=3)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fits = []
    monkeypatch.setattr(pca, "fit_pca", lambda *a, **k: fits.append(a) or fit_pca(*a, **k))
    with pytest.raises(InputError, match=rf"{out} already holds pca.npz, p.chr1.pc.tsv.gz, p.chr1.pc.tsv.gz.tbi "
                                         rf"and 4 more: add --overwrite to replace them, or choose another"):
        run_pca(tmp_path / "other", out, components=5)
    assert fits == [] and {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "pca.npz").rename(tmp_path / "moved.npz")  # tables alone are protected too
    with pytest.raises(InputError, match=r"already holds p.chr1.pc.tsv.gz, "):
        run_pca(tmp_path / "other", out, transform_path=tmp_path / "moved.npz")
    with pytest.raises(InputError, match=r"already holds p.chr1.pc.tsv.gz, "):
        write_pc_tables(tmp_path / "other", PcaTransform.load(tmp_path / "moved.npz"), out)
    (out / "p.chr1.pc.tsv.gz").unlink()
    (out / "p.chr1.pc.tsv.gz.tbi").unlink()
    with pytest.raises(InputError, match=r"already holds p.chr2.pc.tsv.gz, "):  # any one of them
        run_pca(tmp_path / "run", out, components=3)
    (tmp_path / "moved.npz").rename(out / "pca.npz")

    summary = run_pca(tmp_path / "other", out, components=5, overwrite=True)
    assert len(fits) == 1 and summary["components"] == 5
    assert PcaTransform.load(out / "pca.npz").components.shape == (5, TRACKS)
    assert table(out / "p.chr1.pc.tsv.gz")[0][2] == "rs_chr1_0" and len(table(out / "p.chr1.pc.tsv.gz")[0]) == 10
    # a transform applied to the directory it came from, over its own tables
    run_pca(tmp_path / "other", out, transform_path=out / "pca.npz", components=2, overwrite=True)
    assert len(table(out / "p.chr2.pc.tsv.gz")[0]) == 7


def test_a_missing_vcf_id_is_written_as_a_dot(tmp_path):
    """The scoring run stores CHROM:POS where the VCF ID is '.': the tables write '.' back, for exactly
    that form (the row's own contig and position); every other ID is written as it is."""
    pos = np.array([100, 200, 300, 400, 500, 600])
    snps = ["chr1:100", "rs2", "chr1:301", "chr2:400", "chr1:500:A:G", "chr1:600"]
    rows = write_h5(tmp_path / "p.chr1.h5", "chr1", pos, low_rank_sad(np.random.default_rng(0), 6), snps=snps)
    transform = fit_pca([tmp_path / "p.chr1.h5"], components=2)
    [path] = write_pc_tables([tmp_path / "p.chr1.h5"], transform, tmp_path / "out")
    assert [line[2] for line in table(path)] == [".", "rs2", "chr1:301", "chr2:400", "chr1:500:A:G", "."]
    assert [line[2] for line in table(path, "chr1", 99, 100)] == ["."]
    assert_rows(table(path)[1:2], rows, [1], transform.apply(rows["SAD"]))


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
    assert "wrote 1 table, 20 variants, PC0..PC2 of SAD" in result.output
    with h5py.File(tmp_path / "s" / "twenty.chr1.h5", "r") as f:
        X, pos = f["SAD"][:].astype(np.float64), f["pos"][:]
        ids = [s.decode() for s in f["snp"][:]]
    want = reference_pca(X, 3)[4]
    rows = table(tmp_path / "pc" / "twenty.chr1.pc.tsv.gz", "chr1", int(pos[4]) - 1, int(pos[9]))
    assert [int(r[1]) for r in rows] == pos[4:10].tolist()
    # these GIAB records have no ID: the run stores chr1:POS, the table writes '.' as the VCF does
    assert ids[4:10] == [f"chr1:{p}" for p in pos[4:10]] and [r[2] for r in rows] == ["."] * 6
    got = np.array([r[5:] for r in rows], dtype=float)
    # written with '%.6g': <= 5e-6 of the value; measured 3.6e-6
    np.testing.assert_allclose(got, want[4:10], rtol=1e-5, atol=1e-6 * np.abs(want).max())
