"""The benchmarks run end to end and print their tables. Their numbers are read, never asserted:
speed and memory targets are checked by running the benchmarks (benchmarks/README.md)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_bench_score_quick(tmp_path):
    report = tmp_path / "score.json"
    out = run("bench_score.py", "--quick", "--no-append-results", "--json", str(report))
    number = r"\d[\d.e+-]*"
    assert re.search(rf"^enformer-pytorch\s+fp32\s+1\s+{number}\s", out, re.M), out
    assert re.search(rf"^ours \(reuse\)\s+fp32\s+4\s+{number}\s.*\(reference\)", out, re.M), out
    assert re.search(rf"^ours \(reuse\)\s+bf16\s+4\s+{number}\s", out, re.M), out
    results = {(r["scorer"], r["precision"]): r for r in json.loads(report.read_text())["results"]}
    assert not [r for r in results.values() if "error" in r]
    # the baseline holds our weights: the two implementations agree on every variant's SAD (not to float32
    # rounding: enformer-pytorch computes its own gamma positional features, not the official table); measured
    # 1 - r = 1.5e-5 (max|dSAD| 3e-3 of the SAD range)
    assert results["enformer-pytorch", "fp32"]["agreement"]["r_worst"] > 0.9999


def test_bench_memory_small(tmp_path):
    results = tmp_path / "RESULTS.md"
    shutil.copyfile(BENCHMARKS / "RESULTS.md", results)
    out = run("bench_memory.py", "--records", "2000", "--append-results", "--results", str(results))
    assert re.search(r"^2,000\s+2,000\s+[\d.]+\s+[\d.]+\s+\d+ MiB", out, re.M), out
    text = results.read_text()
    memory_table = text.split("## bench_memory", 1)[1].split("<!-- end bench_memory -->", 1)[0]
    assert re.search(r"^\| [\d-]+ \| .+ \| 2,000 \| 64 \| 4096 \|", memory_table, re.M), memory_table
    assert text.split("## bench_memory", 1)[0] == (BENCHMARKS / "RESULTS.md").read_text().split("## bench_memory", 1)[0]


def test_bench_score_flop_account():
    """The account's rows: the dense set is tiled in every block, the sparse one in none (its executed
    count is then the per-window one)."""
    out = run("bench_score.py", "--flop-account", "--quick")
    number = r"(\d+\.\d+)"
    dense = re.search(rf"^dense, 1 per 260 bp\s+7,700\s+\d+\s+8\s+8\s+{number}\s+{number}\s+{number}\s+{number}\s",
                      out, re.M)
    sparse = re.search(rf"^sparse, 1 per 50,000 bp\s+1,024\s+\d+\s+1\s+0\s+{number}\s+{number}\s+{number}\s+{number}",
                       out, re.M)
    assert dense and sparse, out
    assert dense[3] == dense[4] and sparse[2] == sparse[4], out


def test_bench_job_quick(tmp_path):
    out = run("bench_job.py", "--quick", "--records", "6", "--modes", "reuse,tiles", "--keep", str(tmp_path))
    assert re.search(r"^reuse\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+ MiB\s+[\d.]+\s+1\.00x\s+[\d.e+-]+\s+\(reference\)",
                     out, re.M), out
    assert re.search(r"^tiles\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+ MiB\s+[\d.]+\s+[\d.]+x\s+[\d.e+-]+\s+\d\.\d\de[+-]\d+",
                     out, re.M), out


def test_bench_genes_small():
    out = run("bench_genes.py", "--copies", "5")
    assert re.search(r"^3,455\s+750\s+275\s+\d+ MiB\s+[\d.]+\s+[\d,]+\s+\d+ MiB\s+\d+ MiB", out, re.M), out
