"""Staged chunks assemble into the Basenji-layout file, byte for byte the same every time."""
import json

import h5py
import numpy as np
import pytest

from enformer_vep.errors import InputError
from enformer_vep.output import PERCENTILES, RunDirectory
from enformer_vep.targets import Targets
from enformer_vep.variants import Allele

TARGETS = Targets(["t0", "t1", "t2"], ["CAGE:a", "DNASE:b", "CHIP:c"])
ATTRS = {"model_sha256": "abc", "options": json.dumps({"stats": ["SAD"]})}


def rows(chrom, start, n):
    return [Allele(chrom, chrom, 100 + i, f"{chrom}:{100 + i}" if i % 2 else f"rs{i}", "A", "G" * (1 + i % 3), i)
            for i in range(start, start + n)]


def staged_run(out, chrom="chr1", sizes=(4, 4, 2), seed=0):
    rng = np.random.default_rng(seed)
    run = RunDirectory(out, "p", {"options": {"stats": ["SAD"]}})
    all_rows, all_sad = [], []
    for index, size in enumerate(sizes):
        chunk_rows = rows(chrom, sum(sizes[:index]), size)
        sad = rng.normal(size=(size, 3)).astype(np.float16)
        run.write_chunk(chrom, index, chunk_rows, {"SAD": sad}, {"SAD": index})
        all_rows += chunk_rows
        all_sad.append(sad)
    run.open_skipped().close()
    return run, all_rows, np.concatenate(all_sad)


def test_assembled_file_layout(tmp_path):
    run, expected_rows, sad = staged_run(tmp_path / "out")
    paths = run.finish(["chr1"], TARGETS, ["SAD"], ATTRS, percentiles=True)
    with h5py.File(paths["chr1"], "r") as f:
        assert [s.decode() for s in f["snp"][:]] == [r.id for r in expected_rows]
        assert f["pos"].dtype == np.uint32 and list(f["pos"][:]) == [r.pos for r in expected_rows]
        assert [a.decode() for a in f["alt_allele"][:]] == [r.alt for r in expected_rows]
        assert f["ref_allele"][:].tolist() == f["ref"][:].tolist() and f["chr"][0] == b"chr1"
        assert f["SAD"].dtype == np.float16 and f["SAD"].compression == "gzip"
        np.testing.assert_array_equal(f["SAD"][:], sad)
        assert f["SAD"].attrs["clipped"] == 0 + 1 + 2
        assert f["SAD"].attrs["formula"] == "sum_bins(alt) - sum_bins(ref)"
        assert [t.decode() for t in f["target_labels"][:]] == TARGETS.labels
        assert f.attrs["model_sha256"] == "abc"
        assert len(PERCENTILES) == 279 and f["percentiles"].dtype == np.float64
        np.testing.assert_allclose(f["percentiles"][:][[0, 98, 99, 178, 179, 278]],
                                   [0.001, 0.099, 0.1, 0.89, 0.9, 0.999])
        want = np.percentile(sad.astype(np.float32), 100 * PERCENTILES, axis=0).T.astype(np.float16)
        assert f["SAD_pct"].shape == (3, 279)
        np.testing.assert_array_equal(f["SAD_pct"][:], want)
    assert not (tmp_path / "out" / ".partial").exists()
    assert (tmp_path / "out" / "skipped.tsv").read_text().startswith("chrom\tpos\tid\tref\talt\treason")


def test_files_are_byte_identical_across_runs(tmp_path):
    first, _, _ = staged_run(tmp_path / "a")
    second, _, _ = staged_run(tmp_path / "b")
    a = first.finish(["chr1"], TARGETS, ["SAD"], ATTRS)["chr1"].read_bytes()
    b = second.finish(["chr1"], TARGETS, ["SAD"], ATTRS)["chr1"].read_bytes()
    assert a == b


def test_odd_contig_names_get_distinct_safe_file_names(tmp_path):
    run = RunDirectory(tmp_path, "p", {})
    names = {run.final_path(c).name for c in ("HLA-A*01:01", "HLA-A_01_01", "chr1")}
    assert len(names) == 3 and "p.chr1.h5" in names and "p.HLA-A_01_01.h5" in names
    assert all("*" not in n and ":" not in n for n in names)


def test_resume_keeps_staged_chunks_and_refuses_other_settings(tmp_path):
    run, _, _ = staged_run(tmp_path)
    again = RunDirectory(tmp_path, "p", {"options": {"stats": ["SAD"]}})
    assert again.chunk_done("chr1", 2) and not again.chunk_done("chr1", 3)
    with pytest.raises(InputError, match=r"different settings \(options\)"):
        RunDirectory(tmp_path, "p", {"options": {"stats": ["SAR"]}})
    fresh = RunDirectory(tmp_path, "p", {"options": {"stats": ["SAR"]}}, overwrite=True)
    assert not fresh.chunk_done("chr1", 0)


def test_gaps_in_staged_chunks_are_never_assembled(tmp_path):
    run, _, _ = staged_run(tmp_path)
    (tmp_path / ".partial" / "chr1" / "0000001.npz").unlink()
    with pytest.raises(InputError, match="not contiguous"):
        run.finish(["chr1"], TARGETS, ["SAD"], ATTRS)
    assert not list(tmp_path.glob("*.h5"))
