#!/usr/bin/env python
"""Reading a full-size gene annotation for ``--genes``: time and peak memory of ``genes.read_annotation`` on a
GENCODE-sized GTF (gzip), made by repeating the bundled GENCODE slice along 24 contigs with new gene and
transcript identifiers.

    python benchmarks/bench_genes.py                      # 4,900 copies: 3.4 M lines, as GENCODE v44
    python benchmarks/bench_genes.py --copies 50          # a smoke run

Every option and column is explained in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repository root on sys.path first)

SLICE = _common.ROOT / "tests" / "data" / "annotation" / "gencode.chr1_1-900000.gtf.gz"
CONTIGS = [f"chr{i}" for i in range(1, 23)] + ["chrX", "chrY"]
SPAN = 1_000_000  # bp between copies on one contig (the slice spans 900 kb)
HEADER = ["date", "machine", "commit", "lines", "transcripts", "genes", "file (gzip)", "seconds", "lines/s",
          "peak RSS", "RSS before reading"]

CHILD = """
import json, resource, sys, time
from enformer_vep.genes import read_annotation
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
annotation = read_annotation(sys.argv[1], set(sys.argv[2].split(",")))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "genes": len(annotation.genes),
                  "tss": sum(len(p) for p, _ in annotation.tss.values()),
                  "before_kib": before, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=4_900, help="copies of the slice (default 4,900: 3.4 M lines)")
    p.add_argument("--keep", type=Path, help="write the GTF here and keep it (default: a temporary folder)")
    _common.add_results_options(p, "row")
    args = p.parse_args(argv)
    if args.copies < 1:
        p.error("--copies must be >= 1")
    return args


def write_gtf(path: Path, copies: int) -> tuple[int, int]:
    """The slice ``copies`` times, copy c on contig ``CONTIGS[c % 24]`` moved by ``(c // 24) * SPAN`` bp, its
    identifiers suffixed ``_c``. Returns (lines, transcripts)."""
    lines = [line.split("\t") for line in gzip.decompress(SLICE.read_bytes()).decode().splitlines()]
    written = transcripts = 0
    with gzip.open(path, "wt", compresslevel=1) as out:
        for c in range(copies):
            contig, shift, suffix = CONTIGS[c % len(CONTIGS)], (c // len(CONTIGS)) * SPAN, f"_{c}"
            block = []
            for fields in lines:
                attributes = fields[8].replace('";', f'{suffix}";') if c else fields[8]
                block.append("\t".join([contig, *fields[1:3], str(int(fields[3]) + shift),
                                        str(int(fields[4]) + shift), *fields[5:8], attributes]))
                transcripts += fields[2] == "transcript"
            out.write("\n".join(block) + "\n")
            written += len(block)
    return written, transcripts


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_genes_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "gencode_sized.gtf.gz"
        start = time.perf_counter()
        lines, transcripts = write_gtf(path, args.copies)
        print(f"wrote {path.name}: {lines:,} lines, {transcripts:,} transcripts, {path.stat().st_size / 2**20:.0f} MiB "
              f"gzip, in {time.perf_counter() - start:.0f} s", flush=True)
        env = dict(os.environ, PYTHONPATH=str(_common.ROOT))
        result = subprocess.run([sys.executable, "-c", CHILD, str(path), ",".join(CONTIGS)], env=env,
                                capture_output=True, text=True, check=True)
        import json
        numbers = json.loads(result.stdout.strip().splitlines()[-1])
        size = path.stat().st_size
    row = [_common.today(), f"cpu, {_common.cpu_name()}", _common.git_revision(), f"{lines:,}", f"{transcripts:,}",
           f"{numbers['genes']:,}", f"{size / 2**20:.0f} MiB", f"{numbers['seconds']:.1f}",
           f"{lines / numbers['seconds']:,.0f}", f"{numbers['peak_kib'] / 1024:.0f} MiB",
           f"{numbers['before_kib'] / 1024:.0f} MiB"]
    _common.print_table(HEADER[3:], [row[3:]])
    print(f"TSSs kept: {numbers['tss']:,}")
    if args.append_results:
        _common.append_rows("bench_genes", HEADER, [row], args.results)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
