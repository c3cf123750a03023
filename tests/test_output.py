"""Staged chunks assemble into the Basenji-layout file, byte for byte the same every time."""
import json

import h5py
import numpy as np
import pytest

from enformer_vep.errors import InputError
from enformer_vep.output import PERCENTILES
from enformer_vep.rundir import RunDirectory
from enformer_vep.targets import Targets
from enformer_vep.variants import Allele, Skip

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
    return run, all_rows, np.concatenate(all_sad)


BLOCKS = [("chr1", 0), ("chr1", 1), ("chr1", 2)]


def test_assembled_file_layout(tmp_path):
    run, expected_rows, sad = staged_run(tmp_path / "out")
    done = run.finish(BLOCKS, TARGETS, ["SAD"], ATTRS, percentiles=True)
    assert done["files"]["p.chr1.h5"]["rows"] == 10 and done["summary"]["scored"] == 10
    with h5py.File(tmp_path / "out" / "p.chr1.h5", "r") as f:
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
    assert (tmp_path / "out" / "skipped.tsv").read_text() == "chrom\tpos\tid\tref\talt\treason\trecord\n"


def test_files_are_byte_identical_across_runs(tmp_path):
    first, _, _ = staged_run(tmp_path / "a")
    second, _, _ = staged_run(tmp_path / "b")
    first.finish(BLOCKS, TARGETS, ["SAD"], ATTRS)
    second.finish(BLOCKS, TARGETS, ["SAD"], ATTRS)
    assert (tmp_path / "a" / "p.chr1.h5").read_bytes() == (tmp_path / "b" / "p.chr1.h5").read_bytes()


def test_odd_contig_names_get_distinct_safe_file_names(tmp_path):
    run = RunDirectory(tmp_path, "p", {})
    names = {run.final_path(c).name for c in ("HLA-A*01:01", "HLA-A_01_01", "chr1")}
    assert len(names) == 3 and "p.chr1.h5" in names and "p.HLA-A_01_01.h5" in names
    assert all("*" not in n and ":" not in n for n in names)


def test_resume_keeps_staged_chunks_and_refuses_other_settings(tmp_path):
    run, _, _ = staged_run(tmp_path)
    again = RunDirectory(tmp_path, "p", {"options": {"stats": ["SAD"]}})
    assert again.chunk_done("chr1", 2) and not again.chunk_done("chr1", 3)
    with pytest.raises(InputError, match=r"unfinished run made with other settings \(--stats: \[\"SAD\"\] -> "
                                         r"\[\"SAR\"\]\): rerun its own command to resume it"):
        RunDirectory(tmp_path, "p", {"options": {"stats": ["SAR"]}})
    fresh = RunDirectory(tmp_path, "p", {"options": {"stats": ["SAR"]}}, overwrite=True)
    assert not fresh.chunk_done("chr1", 0)


def test_gaps_in_staged_chunks_are_never_assembled(tmp_path):
    run, _, _ = staged_run(tmp_path)
    (tmp_path / ".partial" / "chr1" / "0000001.npz").unlink()
    with pytest.raises(InputError, match=r"lacks staged blocks \(chr1 block 1\)"):
        run.finish(BLOCKS, TARGETS, ["SAD"], ATTRS)
    assert not list(tmp_path.glob("*.h5"))


def test_file_bytes_do_not_depend_on_how_rows_are_staged(tmp_path):
    """Rows are written in fixed blocks of whole HDF5 chunks, so a resume or a merge that brings
    the same rows in other pieces gives the same bytes."""
    all_rows = rows("chr1", 0, 5100)
    sad = np.random.default_rng(0).normal(size=(5100, 3)).astype(np.float16)
    files = []
    for name, sizes in (("a", (3000, 2000, 100)), ("b", (5100,)), ("c", (1, 4098, 1001))):
        run = RunDirectory(tmp_path / name, "p", {})
        bounds = np.cumsum((0,) + sizes)
        for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            run.write_chunk("chr1", index, all_rows[start:stop], {"SAD": sad[start:stop]}, {"SAD": 0})
        run.finish([("chr1", i) for i in range(len(sizes))], TARGETS, ["SAD"], ATTRS, percentiles=True)
        files.append((tmp_path / name / "p.chr1.h5").read_bytes())
    assert files[0] == files[1] == files[2]


def test_skipped_rows_come_out_in_record_order_across_chromosomes(tmp_path):
    run = RunDirectory(tmp_path, "p", {})
    skips = {"chr1": [Skip("chr1", 10 * r, f"s{r}", "A", "<DEL>", "symbolic allele", r) for r in (0, 2, 5)],
             "chr2": [Skip("chr2", 10 * r, f"s{r}", "A", "*", "symbolic allele", r) for r in (1, 3, 4)]}
    run.write_chunk("chr1", 0, [], {}, {}, skips["chr1"][:2])
    run.write_chunk("chr1", 1, [], {}, {}, skips["chr1"][2:])
    run.write_chunk("chr2", 0, [], {}, {}, skips["chr2"])
    done = run.finish([("chr1", 0), ("chr2", 0), ("chr1", 1)], TARGETS, ["SAD"], ATTRS)
    lines = (tmp_path / "skipped.tsv").read_text().splitlines()
    assert [line.split("\t")[2] for line in lines[1:]] == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert lines[1] == "chr1\t0\ts0\tA\t<DEL>\tsymbolic allele\t1"
    assert done["summary"]["skipped"] == {"symbolic allele": 6} and done["files"].keys() == {"skipped.tsv"}


def test_a_finished_run_is_trusted_only_while_its_checksums_hold(tmp_path):
    run, _, _ = staged_run(tmp_path)
    run.finish(BLOCKS, TARGETS, ["SAD"], ATTRS)
    again = RunDirectory(tmp_path, "p", {"options": {"stats": ["SAD"]}})
    assert again.completed()["files"]["p.chr1.h5"]["rows"] == 10
    data = bytearray((tmp_path / "p.chr1.h5").read_bytes())
    data[-100] ^= 1  # a flipped bit
    (tmp_path / "p.chr1.h5").write_bytes(bytes(data))
    assert again.completed() is None
    assert not (tmp_path / "p.chr1.h5").exists() and not (tmp_path / "done.json").exists()
