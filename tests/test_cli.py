"""The command line itself: words that are not commands, devices torch cannot use, result lines."""
import subprocess
import sys

import torch
from helpers import DATA

FASTA = str(DATA / "grch38_chr1_giab_hg002" / "reference.fa")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "enformer_vep", *args], capture_output=True, text=True, timeout=120)


def test_a_mistyped_command_is_not_taken_for_a_vcf(tmp_path):
    result = run("mrege", "a", "b", "-o", str(tmp_path / "x"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Error: no such command or VCF file: 'mrege'; did you mean merge?" in result.stderr
    other = run("frobnicate")
    assert other.returncode == 2 and "the commands are score, merge" in other.stderr


def test_a_path_that_does_not_exist_is_still_read_as_a_vcf(tmp_path):
    result = run(str(tmp_path / "missing.vcf"), "--fasta", str(tmp_path / "missing.fa"), "-o", str(tmp_path / "o"))
    assert result.returncode == 1 and "no such command" not in result.stderr and "missing.fa" in result.stderr


def test_a_device_torch_cannot_use_is_a_one_line_error(tmp_path):
    """cuda:99 exists nowhere: a CPU-only torch says so, a CUDA torch counts its devices."""
    result = run("predict", "chr1:600000-600100", "--fasta", FASTA, "-o", str(tmp_path / "p.h5"), "--device",
                 "cuda:99", "--tracks", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--device cuda:99" in errors[0]
    if torch.version.cuda is None:
        assert "CPU-only build" in errors[0]
    else:
        assert "CUDA device" in errors[0]
    bad = run("predict", "chr1:600000-600100", "--fasta", FASTA, "-o", str(tmp_path / "p.h5"), "--device", "gpu0")
    assert bad.returncode == 1 and "is not a torch device" in bad.stderr


def test_result_lines_are_timestamped_like_log_lines(tmp_path):
    """A command's result line and the run's log lines share one format on stderr."""
    import re
    import shutil

    shutil.copyfile(DATA / "grch38_chr1_giab_hg002" / "input.vcf", tmp_path / "in.vcf")
    result = run("index", str(tmp_path / "in.vcf"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert lines and all(re.match(stamp, line) for line in lines), lines
    assert re.match(stamp + r"wrote \S+in\.vcf\.gz, \S+in\.vcf\.gz\.tbi$", lines[-1])
