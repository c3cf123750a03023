"""Helpers shared by the benchmarks: synthetic genomes, memory readings, device names, RESULTS.md rows."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
if str(ROOT) not in sys.path:  # benchmark the working tree, whatever is installed
    sys.path.insert(0, str(ROOT))

BASES = np.frombuffer(b"ACGT", dtype=np.uint8)


def random_sequence(length: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform random ACGT as ASCII codes ``uint8 [length]``."""
    return BASES[rng.integers(0, 4, size=length)]


def write_fasta(path: str | os.PathLike, contigs: dict[str, np.ndarray], line: int = 60) -> None:
    """A plain FASTA of ``{name: uint8 ASCII codes}`` with ``line``-wide lines (``Genome`` builds the .fai)."""
    with open(path, "wb") as f:
        for name, codes in contigs.items():
            f.write(b">" + name.encode() + b"\n")
            data = codes.tobytes()
            for start in range(0, len(data), line * 4096):  # a block of lines at a time
                block = data[start:start + line * 4096]
                f.write(b"\n".join(block[i:i + line] for i in range(0, len(block), line)) + b"\n")


def spaced_variants(codes: np.ndarray, chrom: str, n: int, spacing: int, indel_fraction: float,
                    rng: np.random.Generator, start: int = 200_000) -> list[tuple]:
    """``n`` variants ``(chrom, pos, ref, alt)`` on the sequence ``codes`` (uint8 ACGT), about ``spacing`` bp
    apart (uniform gaps of 1 .. 2 x spacing - 1) from ``start`` on: SNVs and, a share ``indel_fraction``,
    indels of 1-20 bp (half insertions, half deletions). ``codes`` must reach ``start + 2 n spacing + 21``."""
    positions = start + np.cumsum(rng.integers(1, 2 * spacing, n))
    variants = []
    for pos in positions.tolist():
        size = int(rng.integers(1, 21))
        ref = codes[pos - 1:pos + size].tobytes().decode()
        if rng.random() >= indel_fraction:
            variants.append((chrom, pos, ref[0], "ACGT"[("ACGT".index(ref[0]) + int(rng.integers(1, 4))) % 4]))
        elif rng.random() < 0.5:
            variants.append((chrom, pos, ref[0], ref[0] + random_sequence(size, rng).tobytes().decode()))
        else:
            variants.append((chrom, pos, ref, ref[0]))
    return variants


# --- memory --------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for row in f:
                if row.startswith(field + ":"):
                    return int(row.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0: ``5`` into ``/proc/self/clear_refs``). False when
    impossible: then :func:`peak_rss_kib` is the peak since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> int:
    """Peak resident set size of this process in KiB (since the last successful reset)."""
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int | None:
    return _status_kib("VmRSS")


def mib(kib: float) -> float:
    return kib / 1024


# --- provenance ----------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for row in f:
                if row.startswith("model name"):
                    return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads"


def git_revision() -> str:
    """Short commit of the working tree, ``+dirty`` when it has uncommitted changes; ``$BENCH_COMMIT``
    when set (a copy of the tree on another machine may carry a stale .git)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "enformer_vep"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def today() -> str:
    return datetime.date.today().isoformat()


# --- RESULTS.md ----------------------------------------------------------------------------------------

def add_results_options(parser, what: str = "rows") -> None:
    """``--append-results/--no-append-results`` (off) and ``--results PATH`` (benchmarks/RESULTS.md)."""
    import argparse

    parser.add_argument("--append-results", action=argparse.BooleanOptionalAction, default=False,
                        help=f"append the {what} to benchmarks/RESULTS.md (default: off)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file for --append-results")


def append_rows(section: str, header: list[str], rows: list[list[str]], path: Path = RESULTS) -> None:
    """Append ``rows`` to the table of ``section`` in RESULTS.md: before its ``<!-- end SECTION -->``
    marker, or as a new table at the end of the file when the marker is missing."""
    marker = f"<!-- end {section} -->"
    lines = [("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |") for row in rows]
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if marker in text:
        head, tail = text.split(marker, 1)
        text = head + "".join(line + "\n" for line in lines) + marker + tail
    else:
        table = ["| " + " | ".join(cell.replace("|", "\\|") for cell in header) + " |",
                 "|" + "---|" * len(header)] + lines
        text = text.rstrip("\n") + f"\n\n## {section}\n\n" + "\n".join(table) + f"\n{marker}\n"
    path.write_text(text)


def print_table(header: list[str], rows: list[list[str]], out=None) -> None:
    """A plain-text table: columns left-aligned, two spaces apart."""
    out = out or sys.stdout
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
