#!/usr/bin/env python
"""Host memory and host throughput of a whole scoring run: ``enformer_vep.pipeline.score_vcf`` on a
synthetic VCF of N SNVs (default 1,000,000) with a model so cheap that the host side dominates.
Peak RSS must stay flat as N grows (the target: under 2 GB for 1,000,000 records).

    python benchmarks/bench_memory.py                         # 1,000,000 records (long on 2 cores)
    python benchmarks/bench_memory.py --records 100000
    python benchmarks/bench_memory.py --records 20000 --profile

Every option and every column is explained in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repository root on sys.path first)
import torch  # noqa: E402

from enformer_vep.pipeline import ScoreOptions, score_vcf  # noqa: E402

MEMORY_HEADER = ["date", "device", "commit", "records", "batch", "checkpoint every", "wall s", "variants/s",
                 "peak RSS", "RSS by quarter of the run (MiB)", "RSS before"]
CHROM = "chrS"


class TinyModel(torch.nn.Module):
    """A scorer model (``predict_tracks``) that costs almost nothing: per-bin base counts of the central 896
    bins of the model input, times a fixed random ``[4, tracks]`` matrix. No ``trunk`` and no
    ``convolve_changed``: the scorer takes its plain path (reference and alternative in one call)."""

    def __init__(self, n_tracks: int = 5313, seed: int = 0):
        super().__init__()
        self.config = SimpleNamespace(heads={"human": n_tracks})
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.rand(4, n_tracks, generator=generator))

    def predict_tracks(self, x: torch.Tensor, head: str, tracks: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] == 393_216:  # the central 196,608 bp, as Enformer
            x = x[:, 98_304:-98_304]
        crop = (x.shape[1] - 896 * 128) // 2
        counts = x[:, crop:crop + 896 * 128].reshape(len(x), 896, 128, 4).sum(2)  # [B, 896, 4]
        weight = self.weight if tracks is None else self.weight[:, tracks]
        return counts @ weight


def write_inputs(directory: Path, records: int, genome_size: int, seed: int) -> tuple[Path, Path]:
    """A one-contig random FASTA and a sorted plain VCF of ``records`` SNVs on it (REF from the FASTA)."""
    rng = np.random.default_rng(seed)
    seq = _common.random_sequence(genome_size, rng)
    fasta = directory / "synthetic.fa"
    _common.write_fasta(fasta, {CHROM: seq})
    vcf = directory / "synthetic.vcf"
    positions = np.sort(rng.integers(1, genome_size + 1, size=records))
    ref_index = np.searchsorted(_common.BASES, seq[positions - 1])  # ACGT sorted: index of the base
    alt = _common.BASES[(ref_index + rng.integers(1, 4, size=records)) % 4]
    refs, alts = seq[positions - 1].tobytes().decode(), alt.tobytes().decode()
    with open(vcf, "w") as f:
        f.write("##fileformat=VCFv4.2\n")
        f.write(f"##contig=<ID={CHROM},length={genome_size}>\n")
        f.write("#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n")
        block = 100_000
        for start in range(0, records, block):
            stop = min(records, start + block)
            f.write("".join(f"{CHROM}\t{p}\tv{i}\t{refs[i]}\t{alts[i]}\t.\tPASS\t.\n"
                            for i, p in zip(range(start, stop), positions[start:stop].tolist(), strict=True)))
    return fasta, vcf


class RssSampler(threading.Thread):
    """VmRSS every ``interval`` seconds while it runs: ``samples`` = [(seconds, KiB)]."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.samples, self._stop_event = interval, [], threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = _common.current_rss_kib()
            if rss is not None:
                self.samples.append((time.monotonic() - self.start_time, rss))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def quarters(self) -> list[float | None]:
        """Highest sampled RSS (MiB) in each quarter of the run."""
        if not self.samples:
            return [None] * 4
        end = self.samples[-1][0] or 1.0
        out: list[float | None] = []
        for q in range(4):
            values = [kib for t, kib in self.samples if q * end / 4 <= t <= (q + 1) * end / 4]
            out.append(_common.mib(max(values)) if values else None)
        return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000, help="SNV records in the VCF (default 1,000,000)")
    p.add_argument("--genome-size", type=int, default=8_000_000, help="synthetic contig length (default 8 Mb)")
    p.add_argument("--batch-size", type=int, default=64, help="ScoreOptions.batch_size (default 64)")
    p.add_argument("--checkpoint-every", type=int, default=4096, help="ScoreOptions.checkpoint_every (default 4096)")
    p.add_argument("--tracks", default="0", help="ScoreOptions.tracks (default '0': one track)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--workdir", type=Path, help="write the inputs and outputs here and keep them (default: a "
                                                "temporary directory, deleted)")
    p.add_argument("--profile", action="store_true", help="run under cProfile and print the top functions")
    p.add_argument("--profile-top", type=int, default=25, help="functions listed with --profile (default 25)")
    _common.add_results_options(p, "row")
    args = p.parse_args(argv)
    if args.records < 1:
        p.error("--records must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        fasta, vcf = write_inputs(workdir, args.records, args.genome_size, args.seed)
        write_seconds = time.perf_counter() - started
        out_dir = workdir / "out"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        options = ScoreOptions(str(vcf), str(fasta), str(out_dir), device="cpu", stats=("SAD",), tracks=args.tracks,
                               batch_size=args.batch_size, checkpoint_every=args.checkpoint_every, progress=False)
        model = TinyModel(seed=args.seed)
        device_text = _common.device_name("cpu")
        revision = _common.git_revision()
        load = f"  load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
        print(f"bench_memory {_common.today()}  {device_text}  commit {revision}  torch {torch.__version__}{load}")
        print(f"inputs: {args.records:,} SNV records ({vcf.stat().st_size / 2**20:.1f} MiB VCF) on a "
              f"{args.genome_size / 1e6:g} Mb contig, written in {write_seconds:.1f} s; batch {args.batch_size}, "
              f"checkpoint every {args.checkpoint_every}, tracks {args.tracks!r}, SAD only, tiny model on CPU")
        sys.stdout.flush()

        rss_before = _common.current_rss_kib() or 0
        reset = _common.reset_peak_rss()
        sampler = RssSampler()
        sampler.start()
        profiler = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        try:
            summary = score_vcf(options, model=model)
        finally:
            if profiler:
                profiler.disable()
            seconds = time.perf_counter() - start
            sampler.stop()
        peak_kib = _common.peak_rss_kib()
        maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        output_mib = sum(p.stat().st_size for p in out_dir.glob("*.h5")) / 2**20
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    rate = summary.scored / seconds
    quarters = sampler.quarters()
    quarter_text = " / ".join("-" if q is None else f"{q:.0f}" for q in quarters)
    peak_text = f"{_common.mib(peak_kib):.0f} MiB" + ("" if reset else " (since start)")
    print()
    header = ["records", "scored", "wall s", "variants/s", "peak RSS", "ru_maxrss", "RSS by quarter (MiB)",
              "RSS before", "output"]
    row = [f"{args.records:,}", f"{summary.scored:,}", f"{seconds:.1f}", f"{rate:.1f}", peak_text,
           f"{_common.mib(maxrss_kib):.0f} MiB", quarter_text, f"{_common.mib(rss_before):.0f} MiB",
           f"{output_mib:.1f} MiB"]
    _common.print_table(header, [row])
    print()
    print("notes: peak RSS = the process's VmHWM from the start of score_vcf (reset there); ru_maxrss is "
          "getrusage's view of the same peak. RSS by quarter = the highest VmRSS sampled (every 0.5 s) in each "
          "quarter of the run's wall time: flat quarters mean memory does not grow with the records read.")
    if args.profile:
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("tottime").print_stats(args.profile_top)
        print(f"\ncProfile, top {args.profile_top} functions by own time:")
        print(stream.getvalue())
    if args.append_results:
        _common.append_rows("bench_memory", MEMORY_HEADER, [[
            _common.today(), device_text, revision, f"{args.records:,}", str(args.batch_size),
            str(args.checkpoint_every), f"{seconds:.1f}", f"{rate:.1f}", peak_text, quarter_text,
            f"{_common.mib(rss_before):.0f} MiB"]], args.results)
        print(f"appended a row to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
