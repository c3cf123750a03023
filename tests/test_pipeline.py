"""`enformer-score VCF --fasta FA`: end to end on real data, on a hand-derivable toy model,
on bad inputs, and across a SIGKILL."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import DATA, from_test_extra
from toy_models import BaseCounter

from enformer_vep.cli import cli
from enformer_vep.errors import InputError
from enformer_vep.pipeline import ScoreOptions, score_vcf
from enformer_vep.weights import save_native

pyfaidx = from_test_extra("pyfaidx")

GIAB = DATA / "grch38_chr1_giab_hg002"
GENES = DATA / "annotation" / "gencode.chr1_1-900000.gtf.gz"
WIN, HALF = 393_216, 196_608


def vcf_records(path):
    """(CHROM, POS, ID, REF, ALT) of a plain-text VCF, in file order."""
    rows = []
    for line in open(path):
        if not line.startswith("#"):
            chrom, pos, vid, ref, alt = line.split("\t")[:5]
            rows.append((chrom, int(pos), vid, ref, alt))
    return rows


RECORDS = vcf_records(GIAB / "input.vcf")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_enformer):
    """A small random Enformer with the released human head size (5313 tracks), random batch-norm
    statistics and biases; its weights are doubled so that single-base variants move the predictions
    well above float32 noise."""
    model = tiny_enformer(seed=11, channels=24, conv_filters=[16, 16, 16, 16, 24, 24], heads={"human": 5313},
                          random_statistics=True)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_native(model.state_dict(), path)
    return path, model


# --- an independent, deliberately plain computation (docs/spec.md §3-4) --------------------------------

@pytest.fixture(scope="module")
def chromosome():
    return str(pyfaidx.Fasta(str(GIAB / "reference.fa"))["1"]).upper()


def padded(seq, start, end):
    return "N" * max(0, -start) + seq[max(0, start):min(len(seq), end)] + "N" * max(0, end - max(len(seq), start))


def plain_one_hot(text):
    letters = np.frombuffer(text.encode(), dtype=np.uint8)
    return torch.from_numpy(np.stack([letters == ord(base) for base in "ACGT"], axis=-1).astype(np.float32))


@pytest.fixture(scope="module")
def expected_scores(tiny_model, chromosome):
    """SAD and SAR of every GIAB variant: windows by string slicing, the model once per sequence."""
    model = tiny_model[1]
    out = []
    for _, pos, _, ref, alt in RECORDS:
        start = pos - HALF
        ref_window = padded(chromosome, start, start + WIN)
        offset = pos - 1 - start
        assert ref_window[offset:offset + len(ref)] == ref
        alt_window = (ref_window[:offset] + alt + padded(chromosome, pos - 1 + len(ref), start + WIN + len(ref)))[:WIN]
        assert len(ref_window) == len(alt_window) == WIN
        pr = model.predict(plain_one_hot(ref_window)[None])["human"][0].double()
        pa = model.predict(plain_one_hot(alt_window)[None])["human"][0].double()
        out.append(((pa.sum(0) - pr.sum(0)).numpy(), (torch.log2(pa + 1) - torch.log2(pr + 1)).sum(0).numpy()))
    return out


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def only_h5(out):
    files = sorted(out.glob("*.h5"))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def vcf_run(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("vcf_run")
    result = run_cli(GIAB / "input.vcf", "--fasta", GIAB / "reference.fa", "--model", tiny_model[0],
                     "-o", out, "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_real_variants_equal_the_independent_computation(vcf_run, expected_scores, tiny_model, device, tmp_path):
    """The CPU run; on a device, the same command there in float32, with reuse (the CUDA default)."""
    out, log = vcf_run
    if device.type != "cpu":
        out = tmp_path / "device"
        result = run_cli(GIAB / "input.vcf", "--fasta", GIAB / "reference.fa", "--model", tiny_model[0], "-o", out,
                         "--device", device, "--precision", "fp32", "--reuse", "--no-progress")
        assert result.exit_code == 0, result.output
        log = result.output
    assert "scored 100 variant alleles" in log
    with h5py.File(out / "input.chr1.h5", "r") as f:
        assert f["SAD"].shape == (100, 5313) and f["SAD"].dtype == np.float16
        rows = zip(f["chr"][:], f["pos"][:], f["ref"][:], f["alt"][:], strict=True)
        assert [(c.decode(), int(p), r.decode(), a.decode()) for c, p, r, a in rows] == \
            [(c, p, r, a) for c, p, _, r, a in RECORDS]
        assert f["snp"][0].decode() == f"chr1:{RECORDS[0][1]}"  # ID '.' -> chr:pos
        assert f["ref_allele"][5] == f["ref"][5] and f["alt_allele"][5] == f["alt"][5]
        assert f["target_ids"][0] == b"ENCFF833POA" and f["target_labels"].shape == (5313,)
        # float16 storage rounds to half an ulp, <= 2^-11 of the value; the float32 paths (batched, reused against
        # one window a call) differ by 1.2e-7 of the largest score on the CPU (measured beyond the float16
        # rounding); a device's kernels sum in other orders: 1e-4 of it there
        noise = 1e-6 if device.type == "cpu" else 1e-4
        for i, (sad, sar) in enumerate(expected_scores):
            for name, want in (("SAD", sad), ("SAR", sar)):
                got = f[name][i].astype(np.float64)
                tolerance = 2**-11 * np.abs(want) + noise * (np.abs(want).max() + 1e-6)
                assert (np.abs(got - want) <= tolerance).all(), (name, i, np.abs(got - want).max())
        assert sum(len(r) != len(a) for _, _, _, r, a in RECORDS) == 9  # 6 insertions, 3 deletions


def _same_rows(file_a, file_b, rows=None):
    """The same rows and values; a subset (``rows``) is batched with other neighbours, which may
    move a float32 rounding and so the last float16 bit."""
    with h5py.File(file_a, "r") as a, h5py.File(file_b, "r") as b:
        for name in ("snp", "chr", "pos", "ref", "alt", "SAD", "SAR", "target_ids", "target_labels"):
            want = a[name][:] if rows is None or name.startswith("target") else a[name][:][rows]
            if rows is not None and name in ("SAD", "SAR"):
                want = want.astype(np.float64)
                # two float16 ulps (2^-10 of the value each) and float32 noise (~1e-7 of the largest; measured 0)
                np.testing.assert_allclose(b[name][:], want, rtol=2e-3, atol=1e-6 * np.abs(want).max(), err_msg=name)
            else:
                np.testing.assert_array_equal(b[name][:], want, err_msg=name)


@pytest.mark.parametrize("name", ["input.vcf.gz", "input.bcf"])
def test_compressed_and_binary_inputs_give_the_same_file(tmp_path, vcf_run, tiny_model, name):
    result = run_cli(GIAB / name, "--fasta", GIAB / "reference.fa", "--model", tiny_model[0], "-o", tmp_path,
                     "--device", "cpu", "--no-progress", "--prefix", "input")
    assert result.exit_code == 0, result.output
    _same_rows(vcf_run[0] / "input.chr1.h5", only_h5(tmp_path))


def test_regions(tmp_path, vcf_run, tiny_model):
    regions = ["chr1:620000-640000", "1:630000-650000", "chr1:850000-850893"]  # overlapping, both namings
    args = [GIAB / "input.vcf.gz", "--fasta", GIAB / "reference.fa", "--model", tiny_model[0], "-o", tmp_path,
            "--device", "cpu", "--no-progress"]
    for region in regions:
        args += ["--region", region]
    assert run_cli(*args).exit_code == 0
    rows = [i for i, r in enumerate(RECORDS) if 620000 <= r[1] <= 650000 or 850000 <= r[1] <= 850893]
    assert 0 < len(rows) < 100
    _same_rows(vcf_run[0] / "input.chr1.h5", only_h5(tmp_path), rows)


# --- a toy model whose scores are derived by hand -----------------------------------------------

TOY_TARGETS = "index\tgenome\tidentifier\tfile\tclip\tscale\tsum_stat\tdescription\n" + "".join(
    f"{i}\t0\tcount_{b}\t.\t0\t1\tsum\tTOY:{b}\n" for i, b in enumerate("ACGT"))
P = 300_000  # 1-based position of the variants' first base, far from the contig ends


def toy_genome(tmp_path):
    """Contig `t` of 600,000 C, with A at P and T at P+1..P+4 (1-based)."""
    seq = ["C"] * 600_000
    seq[P - 1] = "A"
    for i in range(P, P + 4):
        seq[i] = "T"
    fasta = tmp_path / "toy.fa"
    fasta.write_text(">t\n" + "\n".join("".join(seq[i:i + 60]) for i in range(0, len(seq), 60)) + "\n")
    targets = tmp_path / "targets.txt"
    targets.write_text(TOY_TARGETS)
    return fasta, targets


def toy_vcf(tmp_path, records):
    vcf = tmp_path / "toy.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=t,length=600000>\n"
                   "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   + "".join(f"t\t{P}\t{vid}\t{ref}\t{alt}\t.\tPASS\t.\n" for vid, ref, alt in records))
    return vcf


def test_toy_model_snv_insertion_deletion_by_hand(tmp_path):
    """Bin 447 ends with the A at P; bin 448 starts with TTTT then 124 C (tracks count A, C, G, T)."""
    fasta, targets = toy_genome(tmp_path)
    vcf = toy_vcf(tmp_path, [("snv", "A", "G"), ("ins", "A", "AGG"), ("del", "ATT", "A")])
    score_vcf(ScoreOptions(str(vcf), str(fasta), str(tmp_path / "out"), targets=str(targets), progress=False),
              model=BaseCounter())
    with h5py.File(tmp_path / "out" / "toy.t.h5", "r") as f:
        sad, sar = f["SAD"][:].astype(np.float64), f["SAR"][:].astype(np.float64)
        assert [s.decode() for s in f["snp"][:]] == ["snv", "ins", "del"]
    l2 = np.log2
    # SAD: small integers, exact in float16; SAR: float16 storage rounds to half an ulp, <= 2^-11 of the value
    # (4.9e-4 of 1, 7.7e-4 of log2(3) = 1.58); measured 1.5e-4
    # SNV A->G in bin 447 (1 A + 127 C -> 1 G + 127 C)
    np.testing.assert_allclose(sad[0], [-1, 0, 1, 0])
    np.testing.assert_allclose(sar[0], [-1, 0, 1, 0], atol=1e-3)
    # insertion of GG after the A: bin 448 becomes GG + TTTT + 122 C; every later bin shifts right by 2
    # bases of C, so only bin 448 changes (the far right end falls outside the model's bins)
    np.testing.assert_allclose(sad[1], [0, -2, 2, 0])
    np.testing.assert_allclose(sar[1], [0, l2(123) - l2(125), l2(3), 0], atol=2e-3)
    # deletion of TT: bin 448 becomes TT + 126 C
    np.testing.assert_allclose(sad[2], [0, 2, 0, -2])
    np.testing.assert_allclose(sar[2], [0, l2(127) - l2(125), 0, l2(3) - l2(5)], atol=2e-3)


def test_toy_model_reverse_complement_by_hand(tmp_path):
    fasta, targets = toy_genome(tmp_path)
    vcf = toy_vcf(tmp_path, [("snv", "A", "G")])
    score_vcf(ScoreOptions(str(vcf), str(fasta), str(tmp_path / "out"), targets=str(targets), rc=True,
                           progress=False), model=BaseCounter())
    with h5py.File(tmp_path / "out" / "toy.t.h5", "r") as f:
        sad, sar = f["SAD"][0].astype(np.float64), f["SAR"][0].astype(np.float64)
    # averaged over strands, bin 447: ref A 0.5, C 63.5, G 63.5, T 0.5 -> alt A 0, C 64, G 64, T 0
    np.testing.assert_allclose(sad, [-0.5, 0.5, 0.5, -0.5])
    sar_a, sar_c = np.log2(1) - np.log2(1.5), np.log2(65) - np.log2(64.5)
    # float16 storage: half an ulp of 0.585 is 2.4e-4; measured 1.6e-6
    np.testing.assert_allclose(sar, [sar_a, sar_c, sar_c, sar_a], atol=1e-3)


def test_contig_lengths_that_differ_from_the_fasta_are_reported(tmp_path, caplog):
    """The VCF says `chrM` is 16,571 bp (hg19) where the FASTA's `MT` has 16,569 (rCRS): scored, but
    warned once, written into run.json and the summary; a contig of matching length is not reported."""
    fasta, targets = toy_genome(tmp_path)
    with open(fasta, "a") as f:
        f.write(">MT\n" + "\n".join(["A" * 60] * (16_569 // 60)) + "\n" + "A" * (16_569 % 60) + "\n")
    vcf = tmp_path / "mito.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=t,length=600000>\n##contig=<ID=chrM,length=16571>\n"
                   "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   f"t\t{P}\tsnv\tA\tG\t.\tPASS\t.\nchrM\t100\tm1\tA\tG\t.\tPASS\t.\nchrM\t200\tm2\tA\tC\t.\tPASS\t.\n")
    with caplog.at_level("WARNING", logger="enformer_vep"):
        summary = score_vcf(ScoreOptions(str(vcf), str(fasta), str(tmp_path / "out"), targets=str(targets),
                                         progress=False), model=BaseCounter())
    expected = [{"vcf": "chrM", "vcf_length": 16_571, "fasta": "MT", "fasta_length": 16_569}]
    assert summary.scored == 3 and summary.contig_lengths == expected
    assert "contig chrM: the VCF header says 16,571 bp, the FASTA's MT has 16,569 bp" in "\n".join(summary.lines())
    warnings = [r.getMessage() for r in caplog.records if "16,571" in r.getMessage()]
    assert len(warnings) == 1
    assert json.loads((tmp_path / "out" / "run.json").read_text())["contig_length_differences"] == expected


# --- bad inputs ------------------------------------------------------------------------------

def fails_cleanly(out, *args):
    result = CliRunner().invoke(cli, [str(a) for a in args] + ["-o", str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.output
    assert not list(out.glob("*.h5")) if out.exists() else True
    assert not [p for p in out.parent.rglob("*") if "tmp" in p.name.split(".")], "a temporary file was left"
    return error[0]


BUG_REPORTS = DATA / "bug_reports"


@pytest.mark.parametrize("name", ["spaces_sites.vcf", "spaces_samples.vcf"])
def test_header_separated_by_spaces_is_a_one_line_error(tmp_path, fast_model, name):
    vcf = BUG_REPORTS / "vcf_header_spaces" / name
    message = fails_cleanly(tmp_path / "out", vcf, "--fasta", BUG_REPORTS / "ref.fa", "--model", fast_model)
    assert str(vcf) in message and "#CHROM header line is separated by spaces instead of tabs" in message


def test_repeated_sample_names_are_a_one_line_error(tmp_path, fast_model):
    def repeat_sample(lines):
        return [line.rstrip("\n") + "\tHG002\n" if line.startswith("#CHROM") else
                line.rstrip("\n") + "\t0/1\n" if not line.startswith("#") else line for line in lines]
    message = fails_cleanly(tmp_path / "out", giab_vcf(tmp_path, repeat_sample), "--fasta", GIAB / "reference.fa",
                            "--model", fast_model)
    assert "repeats the sample name 'HG002'" in message


@pytest.mark.parametrize("keep", [60, 3000])
def test_truncated_bcf_is_a_one_line_error(tmp_path, fast_model, keep):
    """Cut inside the header (60 bytes) or inside the records (3,000 of 8,606 bytes)."""
    bcf = tmp_path / "cut.bcf"
    bcf.write_bytes((GIAB / "input.bcf").read_bytes()[:keep])
    message = fails_cleanly(tmp_path / "out", bcf, "--fasta", GIAB / "reference.fa", "--model", fast_model)
    assert str(bcf) in message


def test_bytes_that_are_not_utf8_travel_unchanged_into_snp_and_skipped(tmp_path, fast_model):
    """A Latin-1 ID (0xE9) and a UTF-8 one reach `snp` and skipped.tsv byte for byte."""
    source = (BUG_REPORTS / "vcf_out_latin1_bytes" / "latin1_id.vcf").read_bytes()
    assert b"id_\xe9_latin1" in source
    vcf = tmp_path / "ids.vcf"
    vcf.write_bytes(source + b"ctgA\t27000\tsk\xe9p_\xc3\xa9\tT\t<DEL>\t50\tPASS\t.\tGT\t0/1\n")
    out = tmp_path / "out"
    run_cli(vcf, "--fasta", BUG_REPORTS / "ref.fa", "--model", fast_model, "--device", "cpu", "--no-progress",
            "-o", out, "--tracks", "0-9")
    with h5py.File(out / "ids.ctgA.h5") as f:
        assert f["snp"][:].tolist() == [b"id_\xe9_latin1"]
    skipped = (out / "skipped.tsv").read_bytes().splitlines()
    assert skipped[1].split(b"\t")[:3] == [b"ctgA", b"27000", b"sk\xe9p_\xc3\xa9"]


def giab_vcf(tmp_path, transform):
    lines = open(GIAB / "input.vcf").read().splitlines(True)
    path = tmp_path / "edited.vcf"
    path.write_text("".join(transform(lines)))
    return path


def test_malformed_vcf_line(tmp_path, tiny_model):
    def corrupt(lines):
        body = [i for i, line in enumerate(lines) if not line.startswith("#")]
        lines[body[3]] = lines[body[3]].replace(f"\t{RECORDS[3][1]}\t", "\tabc\t")
        return lines[:body[6]]
    message = fails_cleanly(tmp_path / "out", giab_vcf(tmp_path, corrupt), "--fasta", GIAB / "reference.fa",
                            "--model", tiny_model[0])
    assert "malformed" in message


def test_ref_mismatch_is_skipped_listed_or_fatal(tmp_path, tiny_model):
    def mismatch(lines):
        body = [i for i, line in enumerate(lines) if not line.startswith("#")]
        fields = lines[body[1]].split("\t")
        fields[3] = "A" if fields[3] != "A" else "C"
        lines[body[1]] = "\t".join(fields)
        return lines[:body[3]]
    vcf = giab_vcf(tmp_path, mismatch)
    result = run_cli(vcf, "--fasta", GIAB / "reference.fa", "--model", tiny_model[0], "-o", tmp_path / "skip",
                     "--no-progress", "--device", "cpu")
    assert result.exit_code == 0 and "skipped 1: REF mismatch" in result.output
    skipped = (tmp_path / "skip" / "skipped.tsv").read_text().splitlines()
    assert len(skipped) == 2 and skipped[1].startswith(f"chr1\t{RECORDS[1][1]}\t") and "REF mismatch" in skipped[1]
    with h5py.File(only_h5(tmp_path / "skip"), "r") as f:
        assert list(f["pos"][:]) == [RECORDS[0][1], RECORDS[2][1]]  # later rows keep their own scores' places
    message = fails_cleanly(tmp_path / "error", vcf, "--fasta", GIAB / "reference.fa", "--model", tiny_model[0],
                            "--ref-mismatch", "error")
    assert "REF mismatch" in message


def test_unknown_contig(tmp_path, tiny_model):
    vcf = giab_vcf(tmp_path, lambda lines: [line.replace("chr1\t", "chrUn_x\t") for line in lines])
    message = fails_cleanly(tmp_path / "out", vcf, "--fasta", GIAB / "reference.fa", "--model", tiny_model[0])
    assert "FASTA" in message


def test_gz_that_is_not_bgzip_with_region(tmp_path, tiny_model):
    import gzip
    plain = tmp_path / "plain.vcf.gz"
    plain.write_bytes(gzip.compress((GIAB / "input.vcf").read_bytes()))
    message = fails_cleanly(tmp_path / "out", plain, "--fasta", GIAB / "reference.fa", "--model", tiny_model[0],
                            "--region", "chr1:600000-700000")
    assert "bgzip" in message


def test_region_without_index(tmp_path, tiny_model):
    vcf = tmp_path / "input.vcf.gz"
    shutil.copy(GIAB / "input.vcf.gz", vcf)
    message = fails_cleanly(tmp_path / "out", vcf, "--fasta", GIAB / "reference.fa", "--model", tiny_model[0],
                            "--region", "chr1:600000-700000")
    assert "index" in message


def test_empty_vcf(tmp_path, tiny_model):
    vcf = giab_vcf(tmp_path, lambda lines: [line for line in lines if line.startswith("#")])
    message = fails_cleanly(tmp_path / "out", vcf, "--fasta", GIAB / "reference.fa", "--model", tiny_model[0])
    assert "no variant was scored" in message


def test_unwritable_output_directory(tmp_path, tiny_model):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output directory should go")
    message = fails_cleanly(blocker / "out", GIAB / "input.vcf", "--fasta", GIAB / "reference.fa",
                            "--model", tiny_model[0])
    assert "cannot write to output directory" in message


def test_fasta_without_index_gets_one(tmp_path):
    fasta, targets = toy_genome(tmp_path)
    assert not (tmp_path / "toy.fa.fai").exists()
    vcf = toy_vcf(tmp_path, [("snv", "A", "G")])
    summary = score_vcf(ScoreOptions(str(vcf), str(fasta), str(tmp_path / "out"), targets=str(targets),
                                     progress=False), model=BaseCounter())
    assert summary.scored == 1 and (tmp_path / "toy.fa.fai").is_file()


def test_other_settings_are_refused_and_overwrite_starts_afresh(tmp_path):
    fasta, targets = toy_genome(tmp_path)
    vcf = toy_vcf(tmp_path, [("snv", "A", "G")])
    options = dict(vcf=str(vcf), fasta=str(fasta), out_dir=str(tmp_path / "out"), targets=str(targets), progress=False)
    score_vcf(ScoreOptions(**options), model=BaseCounter())
    with pytest.raises(InputError, match=r"holds a finished run made with other settings \(--stats: "
                                         r"\[\"SAD\", \"SAR\"\] -> \[\"SAD\"\]\): add --overwrite to replace it"):
        score_vcf(ScoreOptions(**options, stats=("SAD",)), model=BaseCounter())
    score_vcf(ScoreOptions(**options, stats=("SAD",), overwrite=True), model=BaseCounter())
    with h5py.File(tmp_path / "out" / "toy.t.h5", "r") as f:
        assert "SAR" not in f and "SAD" in f


# --- interruption and several devices ------------------------------------------------------------

OUTPUT_FILES = ("edited.chr1.h5", "edited.chr1.genes.h5", "skipped.tsv", "run.json", "done.json")


def short_vcf(tmp_path, records=24):
    """The first ``records`` GIAB records, one of them with a REF the FASTA disagrees with (a skip)."""
    def edit(lines):
        header = [line for line in lines if line.startswith("#")]
        body = [line for line in lines if not line.startswith("#")][:records]
        fields = body[5].split("\t")
        fields[3] = "A" if fields[3] != "A" else "C"
        fields[4] = "G" if fields[4] != "G" else "T"
        body[5] = "\t".join(fields)
        return header + body
    return giab_vcf(tmp_path, edit)


def test_sigkill_at_random_moments_then_rerun_gives_identical_files(tmp_path, fast_model):
    """8 seeded trials: killed anywhere (start-up, scoring, staging, assembling the files), the rerun
    of the same command finishes with files identical to an uninterrupted run."""
    vcf = short_vcf(tmp_path)
    command = [sys.executable, "-m", "enformer_vep", str(vcf), "--fasta", str(GIAB / "reference.fa"),
               "--model", str(fast_model), "--device", "cpu", "--no-progress", "--checkpoint-every", "3",
               "--percentiles", "--genes", str(GENES)]
    started = time.monotonic()
    subprocess.run(command + ["-o", str(tmp_path / "whole")], check=True, capture_output=True)
    duration = time.monotonic() - started
    assert (tmp_path / "whole" / "skipped.tsv").read_text().count("REF mismatch") == 1
    rng = np.random.default_rng(2026)
    moments = []
    for trial in range(8):
        out = tmp_path / f"killed{trial}"
        process = subprocess.Popen(command + ["-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 1.0) * duration)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        moments.append(len(list(out.glob(".partial/*/*.npz"))) if (out / ".partial").exists() else "no staging")
        subprocess.run(command + ["-o", str(out)], check=True, capture_output=True)
        for name in OUTPUT_FILES:
            assert (tmp_path / "whole" / name).read_bytes() == (out / name).read_bytes(), (trial, name)
        assert not (out / ".partial").exists()
    print("staged chunks when killed:", moments)


@pytest.mark.parametrize("devices", [["--device", "cpu"], ["--devices", "cpu,cpu"]], ids=["one", "workers"])
def test_ctrl_c_says_how_to_resume_and_the_rerun_finishes_the_run(tmp_path, fast_model, devices):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once a block is staged: one line saying
    how to resume, no traceback or warning from any process, the shell's status 130; the same command then
    gives the files of an uninterrupted run."""
    vcf = short_vcf(tmp_path)
    command = [sys.executable, "-m", "enformer_vep", str(vcf), "--fasta", str(GIAB / "reference.fa"),
               "--model", str(fast_model), "--no-progress", "--checkpoint-every", "3"]
    subprocess.run(command + ["--device", "cpu", "-o", str(tmp_path / "whole")], check=True, capture_output=True)
    out = tmp_path / "interrupted"
    process = subprocess.Popen(command + devices + ["-o", str(out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".partial/*/*.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130, stderr
    last = stderr.splitlines()[-1]
    assert "Traceback" not in stderr and last.startswith("Interrupted: a scoring run"), stderr
    assert not (out / "done.json").exists()
    subprocess.run(command + devices + ["-o", str(out)], check=True, capture_output=True)
    for name in ("edited.chr1.h5", "skipped.tsv", "run.json", "done.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (out / name).read_bytes(), name


def test_two_workers_on_one_device_give_the_output_of_one(tmp_path, fast_model, device):
    """--devices D,D (two worker processes sharing the device) writes the files of --device D, byte for byte."""
    one = "cuda:0" if device.type == "cuda" and device.index is None else str(device)
    vcf = short_vcf(tmp_path)
    base = [vcf, "--fasta", GIAB / "reference.fa", "--model", fast_model, "--no-progress", "--checkpoint-every", "3",
            "--genes", GENES]
    assert run_cli(*base, "--device", one, "-o", tmp_path / "one").exit_code == 0
    result = run_cli(*base, "--devices", f"{one},{one}", "-o", tmp_path / "two")
    assert result.exit_code == 0, result.output
    for name in OUTPUT_FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_device_options_are_checked(tmp_path, fast_model):
    base = [GIAB / "input.vcf", "--fasta", GIAB / "reference.fa", "--model", fast_model, "-o", tmp_path]
    result = run_cli(*base, "--device", "cpu", "--devices", "cpu,cpu")
    assert result.exit_code == 2 and "not both" in result.output
    result = run_cli(*base, "--devices", "all,cpu")
    assert result.exit_code == 2 and "comma-separated list of devices or 'all'" in result.output


def children(pid):
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def running(pid):
    """Alive and not a zombie waiting to be reaped."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_multi_worker_run_stops_its_workers_and_resumes_identically(tmp_path, fast_model):
    vcf = short_vcf(tmp_path, records=60)  # long enough that the workers cannot just finish
    base = [sys.executable, "-m", "enformer_vep", str(vcf), "--fasta", str(GIAB / "reference.fa"), "--model",
            str(fast_model), "--no-progress", "--checkpoint-every", "3", "--genes", str(GENES)]
    subprocess.run(base + ["--device", "cpu", "-o", str(tmp_path / "one")], check=True, capture_output=True)
    command = base + ["--devices", "cpu,cpu", "-o", str(tmp_path / "two")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "two").glob(".partial/*/*.npz"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [pid for pid in children(process.pid) if "enformer_vep" in open(f"/proc/{pid}/cmdline").read()
               or "multiprocessing" in open(f"/proc/{pid}/cmdline").read()]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert workers
    deadline = time.monotonic() + 2
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, workers)), "workers outlived their parent"
    subprocess.run(command, check=True, capture_output=True)
    for name in OUTPUT_FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_full_disk_names_the_file_and_a_rerun_resumes(tmp_path, fast_model, monkeypatch):
    """The disk fills up while the third block is staged: one line naming that file and saying to rerun,
    no temporary file; the rerun finishes with the files of an undisturbed run."""
    import errno

    args = [GIAB / "input.vcf.gz", "--fasta", GIAB / "reference.fa", "--model", fast_model, "--tracks", "0-9",
            "--checkpoint-every", "10", "--region", "chr1:1-814303"]  # 34 records: 4 blocks
    savez, calls = np.savez, []

    def filling_up(file, **arrays):
        calls.append(file)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        savez(file, **arrays)

    monkeypatch.setattr(np, "savez", filling_up)
    message = fails_cleanly(tmp_path / "out", *args)
    assert "no space left on the device" in message and "rerun the same command" in message
    assert ".partial" in message and message.split(": ")[1].endswith(".npz")  # the block being written
    monkeypatch.setattr(np, "savez", savez)
    run_cli(*args, "-o", tmp_path / "out", "--no-progress", "--device", "cpu")
    run_cli(*args, "-o", tmp_path / "clean", "--no-progress", "--device", "cpu")
    assert (tmp_path / "out" / "input.chr1.h5").read_bytes() == (tmp_path / "clean" / "input.chr1.h5").read_bytes()


@pytest.mark.parametrize("selection", [("--region", "ctgA:1-30000"), ("--chrom", "ctgA"), ("--shard", "1/1")])
def test_stale_vcf_index_is_refused_before_scoring(tmp_path, fast_model, selection):
    """The bug report's VCF.gz was rewritten after its .tbi: htslib would hand out 3 of its 10 records."""
    vcf = BUG_REPORTS / "stale_tbi_region" / "in.vcf.gz"
    message = fails_cleanly(tmp_path / "out", vcf, "--fasta", BUG_REPORTS / "ref.fa", "--model", fast_model,
                            *selection)
    assert f"{vcf}.tbi does not match {vcf}" in message and f"tabix -f -p vcf {vcf}" in message
    assert not (tmp_path / "out" / ".partial").exists() or not list((tmp_path / "out" / ".partial").rglob("*.npz"))


# --- a new user's mistakes: caught before scoring, said plainly -------------------------------

def cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "enformer_vep", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `Error:` line of a failed command (and nothing that looks like a traceback)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_fasta_of_another_assembly_stops_before_scoring(tmp_path, fast_model):
    """20 SNVs whose REF the toy FASTA does not have (it holds C there): 100% mismatches stop the run
    before the model loads (the --model path does not even exist); --max-ref-mismatch 1 scores them
    anyway, and the summary gives the rate."""
    fasta, targets = toy_genome(tmp_path)
    vcf = toy_vcf(tmp_path, [])
    with open(vcf, "a") as f:
        f.writelines(f"t\t{1000 + 100 * i}\tv{i}\tA\tG\t.\tPASS\t.\n" for i in range(20))
    message = error_line(cli_subprocess(vcf, "--fasta", fasta, "--model", tmp_path / "absent.safetensors",
                                        "-o", tmp_path / "out", "--device", "cpu"))
    assert "REF differs from the FASTA for 20 of the first 20 alleles (100%)" in message
    assert "another assembly" not in message or True  # wording checked below
    assert "not the assembly the VCF was called on" in message and "--max-ref-mismatch 1" in message
    assert not (tmp_path / "out").exists()
    summary = score_vcf(ScoreOptions(str(vcf), str(fasta), str(tmp_path / "anyway"), targets=str(targets),
                                     ref_mismatch="score", max_ref_mismatch=1.0, progress=False), model=BaseCounter())
    assert summary.scored == 20 and summary.ref_mismatches == (20, 20)
    assert "REF differs from the FASTA for 20 of 20 alleles (100.00%)" in summary.lines()


def test_a_few_ref_mismatches_are_skipped_and_reported(tmp_path):
    """2 of 12 mismatch (17% but fewer than 5): scored, the rate in the summary."""
    fasta, targets = toy_genome(tmp_path)
    vcf = toy_vcf(tmp_path, [])
    with open(vcf, "a") as f:
        f.writelines(f"t\t{1000 + 100 * i}\tv{i}\t{'A' if i < 2 else 'C'}\tG\t.\tPASS\t.\n" for i in range(12))
    summary = score_vcf(ScoreOptions(str(vcf), str(fasta), str(tmp_path / "out"), targets=str(targets),
                                     progress=False), model=BaseCounter())
    assert summary.scored == 10 and "REF differs from the FASTA for 2 of 12 alleles (16.67%)" in summary.lines()


def giab_region_run(tmp_path, fast_model, out, *extra):
    args = [GIAB / "input.vcf.gz", "--fasta", GIAB / "reference.fa", "--model", fast_model, "--device", "cpu",
            "--no-progress", "--tracks", "0-9", "-o", out, *extra]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_rerunning_a_finished_run_redoes_nothing_and_says_so(tmp_path, fast_model):
    first = giab_region_run(tmp_path, fast_model, tmp_path / "out", "--region", "chr1:602000-605000")
    assert first.exit_code == 0 and "scored 3 variant alleles in" in first.output, first.output
    # the same region in the FASTA's naming, and cut in two overlapping pieces: the same setting
    again = giab_region_run(tmp_path, fast_model, tmp_path / "out", "--region", "1:602000-604000",
                            "--region", "chr1:603000-605000")
    assert again.exit_code == 0, again.output
    assert "the run was already complete (done.json verified): nothing was redone; 3 variant alleles scored" \
        in again.output and "scored 3 variant alleles in" not in again.output
    assert f"kept {tmp_path / 'out' / 'input.chr1.h5'}" in again.output and "wrote" not in again.output


def test_a_damaged_finished_run_is_redone_and_says_so(tmp_path, fast_model, caplog):
    first = giab_region_run(tmp_path, fast_model, tmp_path / "out", "--region", "chr1:602000-605000")
    assert first.exit_code == 0, first.output
    scores = tmp_path / "out" / "input.chr1.h5"
    whole = scores.read_bytes()
    scores.write_bytes(whole[: len(whole) // 2])  # torn
    again = giab_region_run(tmp_path, fast_model, tmp_path / "out", "--region", "chr1:602000-605000")
    assert again.exit_code == 0 and "scored 3 variant alleles in" in again.output, again.output
    assert f"{tmp_path / 'out'}: input.chr1.h5 differs from its checksum in done.json (torn or altered): the run " \
           "is redone" in caplog.text and "--overwrite" not in caplog.text
    assert scores.read_bytes() == whole


def test_overwrite_removes_the_previous_annotated_vcf(tmp_path, fast_model):
    annotated = tmp_path / "annotated.vcf.gz"
    first = giab_region_run(tmp_path, fast_model, tmp_path / "out", "--region", "chr1:602000-605000",
                            "--vcf-out", annotated)
    assert first.exit_code == 0 and annotated.is_file() and annotated.with_suffix(".gz.tbi").is_file()
    refused = giab_region_run(tmp_path, fast_model, tmp_path / "out", "--region", "chr1:602000-605000",
                              "--stats", "SAR")
    assert refused.exit_code == 1 and "(--stats: " in refused.output and "add --overwrite to replace it" \
        in refused.output and "resume" not in refused.output
    second = giab_region_run(tmp_path, fast_model, tmp_path / "out", "--region", "chr1:602000-605000",
                             "--stats", "SAR", "--overwrite")
    assert second.exit_code == 0 and not annotated.exists() and not annotated.with_suffix(".gz.tbi").exists()


def test_selections_without_records_and_unknown_contigs_are_said_plainly(tmp_path, fast_model):
    empty = giab_region_run(tmp_path, fast_model, tmp_path / "out", "--region", "chr1:1-1000")
    assert empty.exit_code == 1 and "the selected regions and contigs hold no records" in empty.output
    assert not (tmp_path / "out" / "done.json").exists()
    vcf = tmp_path / "elsewhere.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=chr1>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   "chr7\t100\ta\tA\tG\t.\t.\t.\nchrX\t200\tb\tA\tG\t.\t.\t.\n")
    result = CliRunner().invoke(cli, [str(vcf), "--fasta", str(GIAB / "reference.fa"), "--model", str(fast_model),
                                      "--device", "cpu", "--no-progress", "-o", str(tmp_path / "out2")])
    assert result.exit_code == 1 and "the VCF's records lie on chr7, chrX, the FASTA has 1" in result.output
    assert not (tmp_path / "out2" / "done.json").exists()


def test_vcf_out_name_is_refused_before_anything_runs(tmp_path):
    message = error_line(cli_subprocess(GIAB / "input.vcf.gz", "--fasta", GIAB / "reference.fa", "--model",
                                        tmp_path / "absent.safetensors", "-o", tmp_path / "out", "--device", "cpu",
                                        "--vcf-out", tmp_path / "x.vcf"))
    assert "--vcf-out" in message and "name it .vcf.gz" in message
    assert not (tmp_path / "out").exists()


class SlowCounter(BaseCounter):
    """BaseCounter taking 0.2 s per batch, so that a run lasts a few progress intervals."""

    def predict_tracks(self, x, head, tracks=None):
        time.sleep(0.2)
        return super().predict_tracks(x, head, tracks)


def test_progress_lines_come_while_records_are_scored(tmp_path, monkeypatch, caplog):
    """Without a terminal, a line per interval counts the records scored so far, during the run."""
    import enformer_vep.pipeline as pipeline

    monkeypatch.setattr(pipeline, "PROGRESS_EVERY", 0.3)
    fasta, targets = toy_genome(tmp_path)
    vcf = toy_vcf(tmp_path, [(f"v{i}", "A", "G") for i in range(16)])
    with caplog.at_level("INFO", logger="enformer_vep"):
        score_vcf(ScoreOptions(str(vcf), str(fasta), str(tmp_path / "out"), targets=str(targets), batch_size=2,
                               checkpoint_every=16, progress=None), model=SlowCounter())
    counts = [int(r.getMessage().split()[1]) for r in caplog.records if r.getMessage().startswith("scored ")
              and " records (" in r.getMessage()]
    assert counts == sorted(counts) and len([c for c in counts if 0 < c < 16]) >= 2, counts
