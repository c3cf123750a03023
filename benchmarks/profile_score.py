#!/usr/bin/env python
"""Where a scoring batch's time goes: device time per scorer stage and per kind of kernel, how busy
the device is, two side-by-side measurements (convolution layout, relative shift) and the whole
``score_vcf`` job against the scorer alone.

    python benchmarks/profile_score.py --device cuda --precision bf16/tf32 --out profile/
    python benchmarks/profile_score.py --quick --out /tmp/profile      # tiny model on CPU: a dry run

Every option and every number is explained in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (puts the repository root on sys.path first)
import bench_score  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from enformer_vep.genome import Genome  # noqa: E402
from enformer_vep.model import Enformer, EnformerConfig, relative_shift  # noqa: E402
from enformer_vep.scoring import PRECISIONS, VariantScorer, precision_mode  # noqa: E402

# Kernel names -> kinds, first match wins (cuDNN, cuBLAS/CUTLASS and PyTorch's own kernel names).
KERNEL_KINDS = [
    ("attention (fused)", ("fmha", "flash_fwd", "efficient_attention")),
    ("layout transposes", ("nchwtonhwc", "nhwctonchw", "transpose", "permute")),
    ("convolution", ("conv", "fprop", "implicit", "winograd", "dgrad", "wgrad")),
    ("matmul", ("gemm", "xmma", "cutlass", "wgmma", "sm90", "sm80", "cublas", "ampere", "hopper")),
    ("normalisation", ("batch_norm", "batchnorm", "layer_norm", "layernorm", "bn_fw")),
    ("softmax / reductions", ("softmax", "reduce", "argmax", "sum")),
    ("copies / concatenation", ("copy", "cat", "memcpy", "memset", "fill", "index", "gather", "scatter",
                                "embedding")),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "sigmoid", "mul", "add", "silu")),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu; --quick: cpu)")
    p.add_argument("--quick", action="store_true", help="bench_score's tiny model, short windows of work: a dry run")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="the scorer's precision (default: bf16/tf32 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per pass (default 32 on CUDA, 4 on CPU)")
    p.add_argument("--batches", type=int, default=3, help="score() calls profiled (default 3)")
    p.add_argument("--indel-fraction", type=float, default=0.2, help="share of indels (default 0.2)")
    p.add_argument("--pipeline-batches", type=int, default=4,
                   help="batches of variants in the whole-job comparison (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="directory for profile.txt and profile.json")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    cuda = args.device.type == "cuda"
    args.precision = args.precision or ("bf16/tf32" if cuda else "fp32")
    args.batch_size = args.batch_size or (32 if cuda else 4)
    return args


def timed(fn, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` after one untimed call (device events on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_batches(scorer: VariantScorer, ref: np.ndarray, alt: np.ndarray, per_call: int, batches: int,
                    device: torch.device) -> dict:
    """torch.profiler over ``batches`` score() calls: device time per stage label and per kernel kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    scorer.score(ref[:per_call], alt[:per_call])  # warm-up outside the trace
    bench_score.synchronize(device)
    with profile(activities=activities) as trace:
        start = time.perf_counter()
        for b in range(batches):
            s = (b * per_call) % max(1, len(ref) - per_call + 1)
            scorer.score(ref[s:s + per_call], alt[s:s + per_call])
        bench_score.synchronize(device)
        wall = time.perf_counter() - start
    events = trace.key_averages()
    device_attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    self_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    stages, kernels = {}, []
    for e in events:
        if e.key.startswith("enformer_vep: "):
            stages[e.key.split(": ", 1)[1]] = {"device_s": getattr(e, device_attr) / 1e6,
                                               "host_s": e.cpu_time_total / 1e6, "calls": e.count}
        elif device.type == "cuda" and getattr(e, self_attr) > 0 and not e.key.startswith("aten::") \
                and not e.key.startswith("enformer_vep"):
            kernels.append({"name": e.key, "device_s": getattr(e, self_attr) / 1e6, "calls": e.count})
    kernels.sort(key=lambda k: -k["device_s"])
    busy = sum(k["device_s"] for k in kernels)
    kinds = {}
    for k in kernels:
        kinds[kind_of(k["name"])] = kinds.get(kind_of(k["name"]), 0.0) + k["device_s"]
    table = events.table(sort_by=device_attr if device.type == "cuda" else "cpu_time_total", row_limit=25)
    return {"wall_s": wall, "kernel_s": busy, "busy_fraction": busy / wall if device.type == "cuda" else None,
            "stages": stages, "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels": kernels[:20], "table": table}


def conv_layout(model: Enformer, device: torch.device, batch: int, length: int) -> dict:
    """The conv tower's first convolution, bf16 under autocast: [B, C, L] Conv1d (what the model does)
    against the same weights as a channels-last Conv2d on [B, C, 1, L] (memory order [B, L, C])."""
    conv = model.conv_tower[0].conv.conv
    x = torch.randn(batch, conv.in_channels, length, device=device)
    x_last = x[:, :, None, :].contiguous(memory_format=torch.channels_last)
    weight2d = conv.weight[:, :, None, :].contiguous(memory_format=torch.channels_last)
    padding = (0, conv.padding[0])
    with torch.inference_mode(), precision_mode("bf16", device):
        ncl = timed(lambda: conv(x), device)
        nlc = timed(lambda: F.conv2d(x_last, weight2d, conv.bias, padding=padding), device)
        same = torch.allclose(conv(x).float(), F.conv2d(x_last, weight2d, conv.bias, padding=padding)[:, :, 0].float(),
                              rtol=2e-2, atol=2e-2)
    flops = 2.0 * batch * length * conv.in_channels * conv.out_channels * conv.kernel_size[0]
    return {"shape": [batch, conv.in_channels, length], "out_channels": conv.out_channels, "ncl_s": ncl,
            "channels_last_s": nlc, "same_result": bool(same), "ncl_tflops": flops / ncl / 1e12,
            "channels_last_tflops": flops / nlc / 1e12}


def copying_relative_shift(x: torch.Tensor) -> torch.Tensor:
    """The official Transformer-XL shift (pad, reshape, slice: two copies of ``[B, H, T, 2T-1]``)."""
    b, h, t, _ = x.shape
    x = torch.cat([torch.zeros_like(x[..., :1]), x], dim=-1)
    x = x.view(b, h, 2 * t, t)[:, :, 1:]
    return x.reshape(b, h, t, 2 * t - 1)[..., :t]


def attention_shift(model: Enformer, device: torch.device, batch: int, precision: str) -> dict:
    """One transformer layer's attention as the model computes it (relative shift as a strided view)
    against the same with the official copying shift, on the same inputs."""
    import enformer_vep.model as model_module

    attention = model.transformer[0].attention
    t = 1536 if device.type == "cuda" else 256
    x = torch.randn(batch, t, model.config.channels, device=device)
    stage = precision.partition("/")[2] or precision
    with torch.inference_mode(), precision_mode(stage, device):
        strided_s = timed(lambda: attention(x), device)
        strided = attention(x).float()
        model_module.relative_shift = copying_relative_shift
        try:
            copying_s = timed(lambda: attention(x), device)
            difference = float((attention(x).float() - strided).abs().max())
        finally:
            model_module.relative_shift = relative_shift
    return {"batch": batch, "length": t, "precision": stage, "strided_s": strided_s, "copying_s": copying_s,
            "max_abs_difference": difference}


def pipeline_rate(model: Enformer, args, per_call: int, rng: np.random.Generator, tmp: Path) -> dict:
    """The whole ``score_vcf`` job (VCF reading, REF checks, windows on the pipeline's thread, staging,
    HDF5) against the scorer alone on the same variants: how much of the device's time the host costs."""
    from enformer_vep.pipeline import ScoreOptions, score_vcf

    n = per_call * args.pipeline_batches
    genome_path = bench_score.synthetic_genome(tmp, 3_000_000, rng)
    genome = Genome(genome_path)
    variants = bench_score.make_variants(genome, n, args.indel_fraction, rng)
    vcf = tmp / "variants.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=chrB,length=3000000>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\t"
                   "INFO\n" + "".join(f"{c}\t{p}\tv{i}\t{r}\t{a}\t.\tPASS\t.\n"
                                       for i, (c, p, r, a) in enumerate(variants)))
    options = ScoreOptions(vcf=str(vcf), fasta=str(genome_path), out_dir=str(tmp / "out"), device=str(args.device),
                           stats=("SAD",), precision=args.precision, reuse=True, batch_size=args.batch_size,
                           progress=False)
    score_vcf(dataclasses.replace(options, out_dir=str(tmp / "warm"), vcf=str(vcf)), model=model)  # warm-up
    bench_score.synchronize(args.device)
    start = time.perf_counter()
    summary = score_vcf(options, model=model)
    pipeline_s = time.perf_counter() - start
    ref, alt = bench_score.build_windows(genome, variants)
    scorer = VariantScorer(model, stats=("SAD",), device=args.device, batch_size=args.batch_size, reuse=True,
                           precision=args.precision)
    start = time.perf_counter()
    for s in range(0, n, per_call):
        scorer.score(ref[s:s + per_call], alt[s:s + per_call])
    bench_score.synchronize(args.device)
    scorer_s = time.perf_counter() - start
    return {"variants": n, "scored": summary.scored, "pipeline_s": pipeline_s, "scorer_s": scorer_s,
            "pipeline_rate": n / pipeline_s, "scorer_rate": n / scorer_s}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    cfg = EnformerConfig(**bench_score.QUICK_CONFIG) if args.quick else EnformerConfig()
    model = bench_score.calibrated_random_weights(Enformer(cfg).to(device).eval(), args.seed, device)
    per_call = args.batch_size  # variants per score() call, as the pipeline groups them
    with tempfile.TemporaryDirectory(prefix="profile_score_") as tmp:
        genome = Genome(bench_score.synthetic_genome(Path(tmp), 3_000_000, rng))
        variants = bench_score.make_variants(genome, per_call * 2, args.indel_fraction, rng)
        ref, alt = bench_score.build_windows(genome, variants)
    scorer = VariantScorer(model, stats=("SAD",), device=device, batch_size=args.batch_size, reuse=True,
                           precision=args.precision)
    report = {"device": _common.device_name(device), "torch": torch.__version__, "commit": _common.git_revision(),
              "precision": args.precision, "batch_size": args.batch_size, "variants_per_call": per_call}
    lines = [f"profile_score {_common.today()}  {report['device']}  torch {torch.__version__}  commit "
             f"{report['commit']}",
             f"model: {'quick tiny model' if args.quick else 'full-size model'}, calibrated random weights; "
             f"precision {args.precision}, reuse on, {args.batch_size} sequences per pass, {per_call} variants "
             f"per score() call ({args.indel_fraction:.0%} indels)"]

    def section(name, fn):
        try:
            report[name] = fn()
        except Exception as error:  # noqa: BLE001 - one failed measurement must not lose the others
            report[name] = {"error": f"{type(error).__name__}: {error}"}
            lines.append(f"{name}: failed: {report[name]['error']}")
        return report[name]

    prof = section("profile", lambda: profile_batches(scorer, ref, alt, per_call, args.batches, device))
    if "error" not in prof:
        n = args.batches * per_call
        lines.append(f"\n{args.batches} score() calls, {n} variants: wall {prof['wall_s']:.3f} s "
                     f"({n / prof['wall_s']:.1f} variants/s under the profiler); device kernels "
                     f"{prof['kernel_s']:.3f} s" + ("" if prof["busy_fraction"] is None else
                                                     f"; device busy {prof['busy_fraction']:.1%} of the wall time"))
        lines.append("\ndevice time per stage (s; host time beside it):")
        for name, st in sorted(prof["stages"].items(), key=lambda kv: -kv[1]["device_s"]):
            lines.append(f"  {name:<24} {st['device_s']:9.4f}   host {st['host_s']:8.4f}   calls {st['calls']}")
        if prof["kinds"]:
            lines.append("\ndevice time per kind of kernel:")
            for kind, seconds in prof["kinds"].items():
                lines.append(f"  {kind:<24} {seconds:9.4f}  {seconds / prof['kernel_s']:6.1%}")
            lines.append("\ntop kernels (device s, calls):")
            for k in prof["top_kernels"][:12]:
                lines.append(f"  {k['device_s']:9.4f} {k['calls']:5d}  [{kind_of(k['name'])}] {k['name'][:110]}")
        (args.out / "profile_table.txt").write_text(prof.pop("table"))
    batch = max(1, args.batch_size // 2)
    layout = section("conv_layout", lambda: conv_layout(model, device, batch, 98_304 if device.type == "cuda"
                                                        else 8_192))
    if "error" not in layout:
        lines.append(f"\nconv layout, first conv-tower convolution {layout['shape']} -> {layout['out_channels']} "
                     f"channels, bf16: Conv1d [B, C, L] {layout['ncl_s'] * 1e3:.2f} ms "
                     f"({layout['ncl_tflops']:.0f} TFLOP/s), channels-last Conv2d "
                     f"{layout['channels_last_s'] * 1e3:.2f} ms ({layout['channels_last_tflops']:.0f} TFLOP/s); "
                     f"same result: {layout['same_result']}")
    att = section("attention", lambda: attention_shift(model, device, args.batch_size, args.precision))
    if "error" not in att:
        lines.append(f"attention, one layer, [{att['batch']}, {att['length']}, C] at {att['precision']}: strided "
                     f"relative shift {att['strided_s'] * 1e3:.2f} ms, official copying shift "
                     f"{att['copying_s'] * 1e3:.2f} ms (max |difference| {att['max_abs_difference']:.2e})")
    with tempfile.TemporaryDirectory(prefix="profile_pipeline_") as tmp:
        pipe = section("pipeline", lambda: pipeline_rate(model, args, per_call, rng, Path(tmp)))
    if "error" not in pipe:
        lines.append(f"whole score_vcf job, {pipe['variants']} variants ({pipe['scored']} scored): "
                     f"{pipe['pipeline_rate']:.1f} variants/s; the scorer alone on the same variants "
                     f"{pipe['scorer_rate']:.1f} variants/s (the job reaches "
                     f"{pipe['pipeline_rate'] / pipe['scorer_rate']:.0%})")
    text = "\n".join(lines) + "\n"
    (args.out / "profile.txt").write_text(text)
    (args.out / "profile.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
