#!/usr/bin/env python
"""Whole-process time of the main job, `enformer-score VCF --fasta FASTA -o OUT`, in several modes on one
dense synthetic VCF: by default the per-window reference-trunk reuse (``--reuse --no-tiles``) against the
conv-tower tiles shared by a block's windows (``--reuse --tiles``), with a calibrated random-weight model.

    python benchmarks/bench_job.py --quick                                   # tiny model, a smoke run
    python benchmarks/bench_job.py --channels 384 --layers 4 --append-results  # the tiles' CPU acceptance run

Every option and column is explained in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repository root on sys.path first)
import h5py  # noqa: E402
import torch  # noqa: E402
from bench_score import QUICK_CONFIG, calibrated_random_weights  # noqa: E402

from enformer_vep import tiling  # noqa: E402
from enformer_vep.model import Enformer, EnformerConfig  # noqa: E402
from enformer_vep.weights import save_native  # noqa: E402

MODES = {"reuse": ["--reuse", "--no-tiles"], "tiles": ["--reuse", "--tiles"], "full": ["--no-reuse"]}
HEADER = ["date", "device", "commit", "model", "records", "mode", "wall s", "user s", "system s", "peak RSS",
          "variants/s", "speedup", "executed TFLOP/variant", "max|dSAD|/range vs first mode"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1024, help="VCF records, one ALT each (default 1,024: one block)")
    p.add_argument("--spacing", type=int, default=260, help="mean bp between neighbouring records (default 260, "
                                                            "the density of common variants)")
    p.add_argument("--indel-fraction", type=float, default=0.1, help="share of indels, 1-20 bp (default 0.1)")
    p.add_argument("--modes", default="reuse,tiles", help="comma-separated, run in this order, from "
                                                          f"{','.join(MODES)} (default reuse,tiles)")
    p.add_argument("--channels", type=int, help="model width (default: the released 1,536)")
    p.add_argument("--layers", type=int, help="transformer layers (default: the released 11)")
    p.add_argument("--quick", action="store_true", help="the tiny model of bench_score --quick and 64 records")
    p.add_argument("--device", default="cpu", help="--device of the job (default cpu; e.g. cuda)")
    p.add_argument("--batch-size", default="auto", help="--batch-size of the job (default auto: 4 on CPU, 32 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the genome, the variants and the weights")
    p.add_argument("--keep", type=Path, help="keep the inputs and outputs in this folder (default: a temporary one)")
    _common.add_results_options(p, "rows")
    args = p.parse_args(argv)
    if args.quick:
        if args.channels or args.layers:
            p.error("--quick uses its own tiny model; drop --channels/--layers")
        args.records = min(args.records, 64)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes takes names from {', '.join(MODES)}")
    if args.records < 1 or args.spacing < 1 or not 0 <= args.indel_fraction <= 1:
        p.error("--records and --spacing must be >= 1 and --indel-fraction within [0, 1]")
    return args


def write_vcf(path: Path, variants: list[tuple], contig_length: int) -> None:
    chrom = variants[0][0]
    path.write_text("##fileformat=VCFv4.2\n"
                    f"##contig=<ID={chrom},length={contig_length}>\n"
                    "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                    + "".join(f"{c}\t{p}\tv{i}\t{r}\t{a}\t.\tPASS\t.\n" for i, (c, p, r, a) in enumerate(variants)))


def run_job(command: list[str]) -> dict:
    """Run ``command`` as a child process; its wall, user and system seconds and peak RSS (``wait4``)."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"the job failed (exit {child.returncode}): {shlex.join(command)}")
    return {"wall": wall, "user": usage.ru_utime, "system": usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    sizes = {k: v for k, v in (("channels", args.channels), ("num_transformer_layers", args.layers)) if v}
    config = EnformerConfig(**QUICK_CONFIG) if args.quick else EnformerConfig(**sizes)
    model_text = ("quick tiny model" if args.quick else f"{config.channels}-channel "
                  f"{config.num_transformer_layers}-layer model") + ", calibrated random weights"
    with tempfile.TemporaryDirectory(prefix="bench_job_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        span = 200_000 + 2 * args.spacing * args.records + 200_000
        codes = _common.random_sequence(span, rng)
        _common.write_fasta(folder / "genome.fa", {"chrB": codes})
        variants = _common.spaced_variants(codes, "chrB", args.records, args.spacing, args.indel_fraction, rng)
        write_vcf(folder / "dense.vcf", variants, len(codes))
        torch.manual_seed(args.seed)
        model = calibrated_random_weights(Enformer(config).eval(), args.seed, torch.device("cpu"))
        weights = save_native(model.state_dict(), folder / "model.safetensors", source=model_text)
        batch = (4 if args.device == "cpu" else 32) if args.batch_size == "auto" else int(args.batch_size)
        flops = tiling.plan_flops(config, variants, batch_size=batch)
        tflop = {"reuse": flops["reuse"], "tiles": flops["executed"], "full": flops["full"]}
        del model

        machine = _common.device_name(args.device)
        print(f"bench_job {_common.today()}  device: {args.device}, {machine}  "
              f"commit {_common.git_revision()}  torch {torch.__version__}  load average {os.getloadavg()[0]:.2f}")
        indels = sum(len(r) != len(a) for _, _, r, a in variants)
        print(f"model: {model_text}; VCF: {len(variants)} records ({indels} indels) over "
              f"{(variants[-1][1] - variants[0][1]) / 1e3:.0f} kb; tiled blocks: {flops['tiled_blocks']} of "
              f"{flops['blocks']}")
        sys.stdout.flush()
        rows, runs, first_sad = [], {}, None
        for mode in args.modes:
            out = folder / f"out_{mode}"
            command = [sys.executable, "-m", "enformer_vep", str(folder / "dense.vcf"), "--fasta",
                       str(folder / "genome.fa"), "--model", str(weights), "--device", args.device, "--no-progress",
                       "--stats", "SAD", "--batch-size", str(args.batch_size), "--overwrite", "-o", str(out),
                       *MODES[mode]]
            print(f"{mode}: {shlex.join(command)}", flush=True)
            runs[mode] = run = run_job(command)
            with h5py.File(out / "dense.chrB.h5", "r") as f:
                sad = f["SAD"][:].astype(np.float64)
            if first_sad is None:
                first_sad, difference = sad, "(reference)"
            else:
                difference = f"{np.abs(sad - first_sad).max() / (first_sad.max() - first_sad.min()):.2e}"
            base = runs[args.modes[0]]["wall"]
            rows.append([_common.today(), f"{args.device}, {machine}", _common.git_revision(), model_text,
                         str(len(variants)), mode, f"{run['wall']:.1f}", f"{run['user']:.1f}", f"{run['system']:.1f}",
                         f"{run['peak_mib']:.0f} MiB", f"{len(variants) / run['wall']:.3f}",
                         f"{base / run['wall']:.2f}x", f"{tflop[mode] / 1e12:.3g}", difference])
    print()
    _common.print_table(HEADER[5:], [row[5:] for row in rows])
    if args.append_results:
        _common.append_rows("bench_job", HEADER, rows, args.results)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
