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
    # the baseline holds our weights: the two implementations agree on every variant's SAD
    # (not exactly: enformer-pytorch computes its own gamma positional features)
    assert results["enformer-pytorch", "fp32"]["agreement"]["r_worst"] > 0.99


def test_bench_memory_small(tmp_path):
    results = tmp_path / "RESULTS.md"
    shutil.copyfile(BENCHMARKS / "RESULTS.md", results)
    out = run("bench_memory.py", "--records", "2000", "--append-results", "--results", str(results))
    assert re.search(r"^2,000\s+2,000\s+[\d.]+\s+[\d.]+\s+\d+ MiB", out, re.M), out
    text = results.read_text()
    memory_table = text.split("## bench_memory", 1)[1].split("<!-- end bench_memory -->", 1)[0]
    assert re.search(r"^\| [\d-]+ \| .+ \| 2,000 \| 64 \| 4096 \|", memory_table, re.M), memory_table
    assert text.split("## bench_memory", 1)[0] == (BENCHMARKS / "RESULTS.md").read_text().split("## bench_memory", 1)[0]
