"""examples/slurm/: submit.sh, score_array.sh and merge.sh run end to end under a stand-in for
`sbatch` that runs each job at once (array tasks one after another) and honours `--dependency=afterok`:
the merge runs only after every array task succeeded."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DATA

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "slurm"

# An sbatch stand-in that keeps SLURM's semantics for what submit.sh relies on: submission succeeds and prints the
# job id; every array task runs (one failing does not stop the others) and the job is COMPLETED only if all exit 0;
# a job submitted with --dependency=afterok:ID runs only if job ID COMPLETED (else it stays pending for ever:
# DependencyNeverSatisfied); an unknown ID is refused at submission, as sbatch does.
AFTEROK_SBATCH = '''#!{python}
import os, subprocess, sys
from pathlib import Path

import pytest
state = Path(os.environ["SBATCH_STATE"])
state.mkdir(exist_ok=True)
env, array, script, after, parsable = dict(os.environ), [None], None, [], False
for arg in sys.argv[1:]:
    if arg.startswith("--export="):
        for item in arg[len("--export="):].split(",")[1:]:
            key, _, value = item.partition("=")
            env[key] = value
    elif arg.startswith("--array="):
        first, last = arg[len("--array="):].split("-")
        array = list(range(int(first), int(last) + 1))
    elif arg.startswith("--dependency="):
        kind, *ids = arg[len("--dependency="):].split(":")
        assert kind == "afterok", kind
        after += ids
    elif arg == "--parsable":
        parsable = True
    elif not arg.startswith("--") and script is None:
        script = arg
job = str(1000 + len(list(state.glob("*.state"))))
if any(not (state / f"{{d}}.state").is_file() for d in after):
    sys.exit("sbatch: error: Batch job submission failed: Job dependency problem")
if all((state / f"{{d}}.state").read_text() == "COMPLETED" for d in after):
    codes = []
    for k in array:
        if k is not None:
            env["SLURM_ARRAY_TASK_ID"] = str(k)
        codes.append(subprocess.run(["bash", script], env=env).returncode)
    (state / f"{{job}}.state").write_text("COMPLETED" if not any(codes) else "FAILED")
else:
    (state / f"{{job}}.state").write_text("PENDING (DependencyNeverSatisfied)")
print(job if parsable else f"Submitted batch job {{job}}")
'''
# enformer-score stand-in: records its arguments; the scoring of shard $FAIL_SHARD fails.
FAKE_SCORER = '''#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case " $* " in *" --shard $FAIL_SHARD/"*) exit 3;; esac
'''




def test_submit_scores_the_shards_and_merges_them(tmp_path, fast_model, two_contig_vcf):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(AFTEROK_SBATCH.format(python=sys.executable))
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "enformer-score").write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -m enformer_vep \"$@\"\n")
    (bin_dir / "enformer-score").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_STATE=str(tmp_path / "jobs"))
    fasta = DATA / "grch38_chr1_giab_hg002" / "reference.fa"
    vcf = str(two_contig_vcf) + ".gz"
    out = tmp_path / "scores"
    options = ["--model", str(fast_model), "--device", "cpu", "--checkpoint-every", "8", "--prefix", "p"]
    result = subprocess.run(["bash", str(EXAMPLES / "submit.sh"), vcf, str(fasta), str(out), "3", *options],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "submitted array job 1000 (3 tasks)" in result.stdout
    assert all((out / f"shard-{k}" / "done.json").is_file() for k in (1, 2, 3))
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "enformer_vep", vcf, "--fasta", str(fasta), "-o", str(single), *options],
                   check=True, capture_output=True)
    for name in ("p.chr1.h5", "skipped.tsv", "run.json"):
        assert (out / "merged" / name).read_bytes() == (single / name).read_bytes(), name


@pytest.mark.parametrize("failing", [None, 2], ids=["all succeed", "task 2 fails"])
def test_slurm_merge_starts_only_after_every_array_task_succeeded(tmp_path, failing):
    """examples/slurm/submit.sh under an sbatch that honours --dependency=afterok: all three array tasks score their
    shard with the options given; the merge of shard-1..3 into OUT/merged runs after them when all succeed, and never
    when one failed (its job then waits for ever on the failed array)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", AFTEROK_SBATCH.format(python=sys.executable)), ("enformer-score", FAKE_SCORER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    calls, out, jobs_dir = tmp_path / "calls.txt", tmp_path / "scores", tmp_path / "jobs"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_STATE=str(jobs_dir), CALLS=str(calls),
               FAIL_SHARD=str(failing or ""))
    result = subprocess.run(["bash", str(EXAMPLES / "submit.sh"), "in.vcf.gz", "ref.fa", str(out), "3", "--model",
                             "m.safetensors", "--rc"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "submitted array job 1000 (3 tasks)" in result.stdout
    lines = calls.read_text().splitlines()
    scored = [f"in.vcf.gz --fasta ref.fa -o {out}/shard-{k} --shard {k}/3 --model m.safetensors --rc"
              for k in (1, 2, 3)]
    merge = f"merge {out}/shard-1 {out}/shard-2 {out}/shard-3 -o {out}/merged"
    states = {p.stem: p.read_text() for p in jobs_dir.glob("*.state")}
    if failing is None:
        assert lines == scored + [merge]
        assert states == {"1000": "COMPLETED", "1001": "COMPLETED"}
    else:
        assert lines == scored  # every task ran; the merge did not
        assert states == {"1000": "FAILED", "1001": "PENDING (DependencyNeverSatisfied)"}
