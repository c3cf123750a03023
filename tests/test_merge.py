"""`--shard K/N` runs as parallel processes, then `enformer-score merge`: identical to one run;
every kind of bad shard set refused; a merge killed at random moments resumes to the same files."""
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
from click.testing import CliRunner
from helpers import DATA

from enformer_vep.cli import cli

FASTA = DATA / "grch38_chr1_giab_hg002" / "reference.fa"
GENES = DATA / "annotation" / "gencode.chr1_1-900000.gtf.gz"
OUTPUTS = ("two_contigs.chr1.h5", "two_contigs.chr1.genes.h5", "skipped.tsv", "run.json")


def command(vcf, model, out, *extra):
    return [sys.executable, "-m", "enformer_vep", str(vcf), "--fasta", str(FASTA), "--model", str(model),
            "--device", "cpu", "--no-progress", "--checkpoint-every", "4", "--percentiles", "-o", str(out),
            "--prefix", "two_contigs", "--genes", str(GENES), *map(str, extra)]


def run_parallel(commands):
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    for process in processes:
        output = process.communicate()[0]
        assert process.returncode == 0, output


def merge(*args):
    return CliRunner().invoke(cli, ["merge", *map(str, args)], catch_exceptions=False)


def same_datasets(file_a, file_b):
    with h5py.File(file_a, "r") as a, h5py.File(file_b, "r") as b:
        assert set(a) == set(b)
        for name in a:
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
            assert dict(a[name].attrs) == dict(b[name].attrs), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fast_model, two_contig_vcf):
    """One whole run of the indexed VCF, and its shards: 3 of the .vcf.gz (tabix), 2 of the .bcf (CSI)
    and 2 of the plain .vcf (counting pass), all as parallel processes."""
    root = tmp_path_factory.mktemp("runs")
    gz, bcf = str(two_contig_vcf) + ".gz", two_contig_vcf.with_suffix(".bcf")
    commands = [command(gz, fast_model, root / "whole")]
    commands += [command(gz, fast_model, root / f"gz{k}", "--shard", f"{k}/3") for k in (1, 2, 3)]
    commands += [command(bcf, fast_model, root / f"bcf{k}", "--shard", f"{k}/2") for k in (1, 2)]
    commands += [command(two_contig_vcf, fast_model, root / f"vcf{k}", "--shard", f"{k}/2") for k in (1, 2)]
    run_parallel(commands)
    return root


def test_three_parallel_shards_merge_into_the_single_run_byte_for_byte(runs, tmp_path):
    sizes = [json.loads((runs / f"gz{k}" / "done.json").read_text())["summary"]["scored"] for k in (1, 2, 3)]
    # 37 records in blocks of 4 (chr1: 0-3 ... 28-29; chr2: 30-33, 34-36); a block goes to the shard whose
    # third of the stream holds its first record: 0-12 | 13-24 | 25-36
    assert sizes == [16, 12, 2]
    result = merge(runs / "gz3", runs / "gz1", runs / "gz2", "-o", tmp_path / "merged")  # any order
    assert result.exit_code == 0, result.output
    assert "merged 3 shards: 30 rows into 1 file in" in result.output
    for name in OUTPUTS:
        assert (runs / "whole" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes(), name
    skipped = (tmp_path / "merged" / "skipped.tsv").read_text().splitlines()
    assert [line.split("\t")[2] for line in skipped[1:]] == [f"c2_{i}" for i in range(7)]
    assert [line.split("\t")[6] for line in skipped[1:]] == [str(31 + i) for i in range(7)]


@pytest.mark.parametrize("kind", ["bcf", "vcf"])
def test_shards_of_a_bcf_and_of_a_plain_vcf_merge_into_the_same_datasets(runs, tmp_path, kind):
    result = merge(runs / f"{kind}1", runs / f"{kind}2", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    same_datasets(runs / "whole" / "two_contigs.chr1.h5", tmp_path / "two_contigs.chr1.h5")
    assert (runs / "whole" / "skipped.tsv").read_bytes() == (tmp_path / "skipped.tsv").read_bytes()


def copy(runs, name, tmp_path):
    return shutil.copytree(runs / name, tmp_path / name)


def test_missing_duplicated_and_foreign_shards_are_refused(runs, tmp_path):
    gz = [runs / f"gz{k}" for k in (1, 2, 3)]
    cases = [
        ((gz[0], gz[2]), "missing shard 2/3 of 3"),
        ((*gz, copy(runs, "gz2", tmp_path)), "shard 2/3 is given twice"),
        ((gz[0], gz[1], runs / "bcf2"), "come from different runs (they differ in vcf, vcf_mtime_ns, vcf_size)"),
        ((runs / "whole", gz[0]), "was not run with --shard"),
        ((gz[0], gz[1], tmp_path / "nothing"), "is not an enformer-score output directory"),
    ]
    (tmp_path / "nothing").mkdir()
    for dirs, message in cases:
        result = merge(*dirs, "-o", tmp_path / "out")
        assert result.exit_code == 1 and message in result.output, (message, result.output)
        assert not list((tmp_path / "out").glob("*.h5"))


def test_a_split_into_another_number_of_shards_is_refused(runs, tmp_path):
    other = copy(runs, "gz3", tmp_path)
    fingerprint = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps(fingerprint | {"shard": "3/4"}))
    result = merge(runs / "gz1", runs / "gz2", other, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "split the VCF differently (4 vs 3 shards)" in result.output


def test_a_shard_run_with_other_options_is_refused(runs, tmp_path, fast_model, two_contig_vcf):
    run_parallel([command(str(two_contig_vcf) + ".gz", fast_model, tmp_path / "sad2", "--shard", "2/3",
                          "--stats", "SAD")])
    result = merge(runs / "gz1", tmp_path / "sad2", runs / "gz3", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "differ in options" in result.output


def test_unfinished_and_damaged_shards_are_refused(runs, tmp_path):
    unfinished = copy(runs, "gz2", tmp_path)
    (unfinished / "done.json").unlink()
    result = merge(runs / "gz1", unfinished, runs / "gz3", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "shard 2/3" in result.output and "is an unfinished run" in result.output
    shutil.rmtree(unfinished)
    torn = copy(runs, "gz2", tmp_path)
    h5 = torn / "two_contigs.chr1.h5"
    h5.write_bytes(h5.read_bytes()[:-1000])
    result = merge(runs / "gz1", torn, runs / "gz3", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "two_contigs.chr1.h5 differs from its checksum" in result.output


def test_merge_killed_at_random_moments_resumes_to_identical_files(runs, tmp_path):
    merge_command = [sys.executable, "-m", "enformer_vep", "merge", *(str(runs / f"gz{k}") for k in (1, 2, 3))]
    started = time.monotonic()
    subprocess.run(merge_command + ["-o", str(tmp_path / "whole")], check=True, capture_output=True)
    duration = time.monotonic() - started
    rng = np.random.default_rng(7)
    for trial in range(5):
        out = tmp_path / f"killed{trial}"
        process = subprocess.Popen(merge_command + ["-o", str(out)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, duration))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        subprocess.run(merge_command + ["-o", str(out)], check=True, capture_output=True)
        for name in (*OUTPUTS, "done.json"):
            assert (tmp_path / "whole" / name).read_bytes() == (out / name).read_bytes(), (trial, name)
        assert not (out / ".partial").exists()


def test_a_shard_without_blocks_finishes_empty(tmp_path, fast_model, two_contig_vcf):
    """37 records in 10 blocks of 4 over 20 shards: shard 2 owns none (block starts 0, 4 fall in
    shares 1 and 3)."""
    args = command(str(two_contig_vcf) + ".gz", fast_model, tmp_path, "--shard", "2/20")[3:]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "scored 0 variant alleles" in result.output
    done = json.loads((tmp_path / "done.json").read_text())
    assert done["blocks"] == [] and done["summary"]["scored"] == 0 and not list(tmp_path.glob("*.h5"))


def test_merge_writes_the_annotated_vcf_of_the_whole_run(runs, tmp_path, two_contig_vcf):
    import gzip

    from enformer_vep.vcf_out import write_annotated_vcf

    result = merge(*(runs / f"gz{k}" for k in (1, 2, 3)), "-o", tmp_path / "m", "--vcf-out", tmp_path / "m.vcf.gz")
    assert result.exit_code == 0, result.output
    write_annotated_vcf(str(two_contig_vcf) + ".gz", {"chr1": runs / "whole" / "two_contigs.chr1.h5"},
                        tmp_path / "whole.vcf.gz")
    merged = gzip.decompress((tmp_path / "m.vcf.gz").read_bytes())
    assert merged == gzip.decompress((tmp_path / "whole.vcf.gz").read_bytes())
    assert merged.count(b"ENFORMER_CAGE_SAD=") == 30 and (tmp_path / "m.vcf.gz.tbi").is_file()
