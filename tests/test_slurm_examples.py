"""examples/slurm/: submit.sh, score_array.sh and merge.sh run end to end under a stand-in for
`sbatch` that runs each job at once (array tasks one after another, then the dependent merge)."""
import os
import stat
import subprocess
import sys
from pathlib import Path

from helpers import DATA

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "slurm"
FAKE_SBATCH = '''#!{python}
"""sbatch stand-in: run the job script now with its --export variables, once per --array index."""
import os, subprocess, sys
args, env, array, script = sys.argv[1:], dict(os.environ), None, None
for arg in args:
    if arg.startswith("--export="):
        for item in arg[len("--export="):].split(",")[1:]:
            key, _, value = item.partition("=")
            env[key] = value
    elif arg.startswith("--array="):
        first, last = arg[len("--array="):].split("-")
        array = range(int(first), int(last) + 1)
    elif not arg.startswith("--"):
        script = arg
for k in array or [None]:
    if k is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(k)
    subprocess.run(["bash", script], env=env, check=True)
print("4242")
'''


def test_submit_scores_the_shards_and_merges_them(tmp_path, fast_model, two_contig_vcf):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH.format(python=sys.executable))
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "enformer-score").write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -m enformer_vep \"$@\"\n")
    (bin_dir / "enformer-score").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    fasta = DATA / "grch38_chr1_giab_hg002" / "reference.fa"
    vcf = str(two_contig_vcf) + ".gz"
    out = tmp_path / "scores"
    options = ["--model", str(fast_model), "--device", "cpu", "--checkpoint-every", "8", "--prefix", "p"]
    result = subprocess.run(["bash", str(EXAMPLES / "submit.sh"), vcf, str(fasta), str(out), "3", *options],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "submitted array job 4242 (3 tasks)" in result.stdout
    assert all((out / f"shard-{k}" / "done.json").is_file() for k in (1, 2, 3))
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "enformer_vep", vcf, "--fasta", str(fasta), "-o", str(single), *options],
                   check=True, capture_output=True)
    for name in ("p.chr1.h5", "skipped.tsv", "run.json"):
        assert (out / "merged" / name).read_bytes() == (single / name).read_bytes(), name
