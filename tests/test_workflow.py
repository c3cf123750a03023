"""The Snakemake workflow (workflows/snakemake) run locally: its merged files equal one `enformer-score` run
byte for byte, and a workflow killed mid-way (shards staged half) and run again completes to the same files."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DATA, from_test_extra

yaml = from_test_extra("yaml")

ROOT = Path(__file__).resolve().parent.parent
SNAKEFILE = ROOT / "workflows" / "snakemake" / "Snakefile"
GIAB = DATA / "grch38_chr1_giab_hg002"
GENCODE = DATA / "annotation" / "gencode.chr1_1-900000.gtf.gz"
REGION = "chr1:780000-812000"
FILES = ("giab.chr1.h5", "giab.chr1.genes.h5", "skipped.tsv", "run.json")


def snakemake(folder: Path, *extra: str, background: bool = False) -> subprocess.Popen | subprocess.CompletedProcess:
    """Snakemake on the workflow in ``folder``: to completion (asserted), or ``background`` in a session of its own
    (so that a kill reaches its jobs too)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(folder), "--configfile",
               str(folder / "config.yaml"), "--cores", "2", *extra]
    if background:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, fast_model):
    """A configured workflow folder (3 shards on the CPU, genes, the annotated VCF, a 2-component PCA) and the
    single `enformer-score` run it must reproduce."""
    root = tmp_path_factory.mktemp("workflow")
    options = f"--stats SAD,SAR --genes {GENCODE} --region {REGION}"
    config = {"vcf": str(GIAB / "input.vcf.gz"), "fasta": str(GIAB / "reference.fa"), "out": "results", "shards": 3,
              "model": str(fast_model), "device": "cpu", "gpus_per_shard": 0, "threads_per_shard": 1,
              "checkpoint_every": 4,
              "prefix": "giab", "score_options": options, "vcf_out": True, "pca": True,
              "pca_options": "--components 2"}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    single = root / "single"
    subprocess.run([sys.executable, "-m", "enformer_vep", config["vcf"], "--fasta", config["fasta"], "--model",
                    str(fast_model), "--device", "cpu", "--no-progress", "--checkpoint-every", "4", "--prefix", "giab",
                    *options.split(), "-o", str(single)], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))  # as Snakemake runs a 1-thread job: CPU sums depend on it
    return root, single


def same_files(merged: Path, single: Path) -> None:
    for name in FILES:
        assert (merged / name).read_bytes() == (single / name).read_bytes(), name


def test_the_workflow_equals_one_run(workflow):
    root, single = workflow
    folder = root / "clean"
    folder.mkdir()
    shutil.copy(root / "config.yaml", folder)
    snakemake(folder)
    same_files(folder / "results" / "merged", single)
    assert (folder / "results" / "annotated.vcf.gz").is_file() and (folder / "results" / "pca" / "pca.npz").is_file()
    assert sorted(p.name for p in (folder / "results" / "shards").iterdir()) == ["1", "2", "3"]


def test_a_workflow_killed_mid_way_completes_to_the_same_files(workflow):
    """SIGKILL to the whole workflow (snakemake and its jobs) once a shard has staged a block; then
    `snakemake --unlock` and the same command with --rerun-incomplete, as after a preemption."""
    root, single = workflow
    folder = root / "killed"
    folder.mkdir()
    shutil.copy(root / "config.yaml", folder)
    process = snakemake(folder, background=True)
    deadline = time.monotonic() + 300
    while not list(folder.glob("results/shards/*/.partial/*/*.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    staged = list(folder.glob("results/shards/*/.partial/*/*.npz"))
    assert staged and not (folder / "results" / "merged" / "done.json").exists()
    snakemake(folder, "--unlock")
    snakemake(folder, "--rerun-incomplete")
    same_files(folder / "results" / "merged", single)
