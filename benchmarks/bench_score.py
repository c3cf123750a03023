#!/usr/bin/env python
"""Variant-scoring throughput, peak memory and precision agreement: the enformer-pytorch baseline
(float32, batch 1, two full passes per variant, one-hot built on the host) against our
``VariantScorer`` at each precision, on SNVs and indels placed on a synthetic (or given) genome.

    python benchmarks/bench_score.py --quick                 # tiny model on CPU, well under a minute
    python benchmarks/bench_score.py --device cuda           # full-size model, random weights
    python benchmarks/bench_score.py --device cuda --model enformer.safetensors --append-results

Every option and every column is explained in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repository root on sys.path first)
import torch  # noqa: E402

from enformer_vep.genome import Genome  # noqa: E402
from enformer_vep.model import HUB_SEQUENCE_LENGTH, SEQUENCE_LENGTH, Enformer, EnformerConfig  # noqa: E402
from enformer_vep.scoring import PRECISIONS, VariantScorer  # noqa: E402
from enformer_vep.windows import allele_windows  # noqa: E402

CROP = slice((HUB_SEQUENCE_LENGTH - SEQUENCE_LENGTH) // 2, (HUB_SEQUENCE_LENGTH + SEQUENCE_LENGTH) // 2)
H100_BF16_DENSE_TFLOPS = 989.0
# The quick model: channels 48, 8 heads, 1 layer (0.64 M parameters + heads); its conv filters are
# what enformer-pytorch derives for dim 48 with dim_divisible_by 8, so the baseline can match it.
QUICK_CONFIG = dict(channels=48, num_heads=8, num_transformer_layers=1, conv_filters=[24, 24, 32, 40, 40, 48],
                    heads={"human": 5313, "mouse": 1643})
QUICK = dict(device="cpu", variants=4, indel_fraction=0.25, batch_size="4", genome_size=1_000_000, warmup=1)
# Host-side one-hot of the baseline: A, C, G, T rows; every other byte (N) all zeros.
HOST_ONE_HOT = np.zeros((256, 4), dtype=np.float32)
HOST_ONE_HOT[np.frombuffer(b"ACGT", dtype=np.uint8), np.arange(4)] = 1

SCORE_HEADER = ["date", "device", "commit", "model", "variants", "scorer", "precision", "batch", "variants/s",
                "speedup", "peak memory", "useful TFLOP/s", "% of peak", "r median", "r worst", "max|dSAD|/range",
                "executed TFLOP/variant"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu; --quick: cpu)")
    p.add_argument("--model", help="weights in any form load_model takes (default: the full-size architecture "
                                   "with seeded random weights)")
    p.add_argument("--variants", type=int, help="variants to score (default: 64 on CUDA, 4 on CPU and with --quick)")
    p.add_argument("--indel-fraction", type=float, help="share of indels among the variants (default 0.2; "
                                                        "--quick 0.25)")
    p.add_argument("--batch-size", default=None, help="our scorer's sequences per forward pass, or 'auto' "
                                                       "(default: auto = the scorer's own default; --quick 4)")
    p.add_argument("--precisions", help="comma-separated, from fp32,tf32,bf16 (default: fp32,tf32,bf16 on CUDA, "
                                        "fp32,bf16 on CPU); agreement needs fp32 among them")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the enformer-pytorch baseline (default: on)")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="our scorer's reference-trunk reuse for SNV/MNP (default: on)")
    p.add_argument("--run", dest="runs", action="append", metavar="SPEC",
                   help="one configuration of our scorer, repeatable; replaces --precisions/--reuse/--batch-size: "
                        "PRECISION[:reuse|:noreuse][:bN][:cudnn-benchmark][:compile], e.g. bf16/tf32:b32:compile")
    p.add_argument("--quick", action="store_true", help="tiny model, few variants, CPU: a smoke run in CI time")
    p.add_argument("--flop-account", action="store_true",
                   help="instead of timing: TFLOP per variant of each scoring mode (two full passes, per-window "
                        "reuse, conv-tower tiles, and what the cost model executes) on a dense and a sparse "
                        "synthetic VCF, counted from the scorer's plan (tiling.plan_flops) without running the model")
    p.add_argument("--channels", type=int, help="random-weight model of this width instead of the released 1536 "
                                                "(e.g. 384: the conv tower keeps its share of the arithmetic)")
    p.add_argument("--layers", type=int, help="transformer layers of the random-weight model (released: 11)")
    p.add_argument("--fasta", help="place the variants on this FASTA instead of a synthetic genome")
    p.add_argument("--genome-size", type=int, default=None, help="synthetic genome length in bp (default 3 Mb, "
                                                                  "--quick 1 Mb)")
    p.add_argument("--seed", type=int, default=0, help="seed of the genome, the variants and the random weights")
    p.add_argument("--peak-tflops", type=float, help=f"arithmetic ceiling for the '%% of peak' column (default: "
                                                     f"{H100_BF16_DENSE_TFLOPS:g}, H100 SXM dense bf16, on CUDA; "
                                                     f"none on CPU)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, help="variants scored untimed before each timed run (default: one batch "
                                              "on CUDA, 1 on CPU)")
    _common.add_results_options(p, "rows")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        if args.model:
            p.error("--quick uses its own tiny model; drop --model")
        for name, value in QUICK.items():  # explicit options win
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    args.variants = args.variants or (64 if cuda else 4)
    args.indel_fraction = 0.2 if args.indel_fraction is None else args.indel_fraction
    args.genome_size = args.genome_size or 3_000_000
    args.precisions = [s.strip() for s in (args.precisions or ("fp32,tf32,bf16" if cuda else "fp32,bf16")).split(",")
                       if s.strip()]
    if args.peak_tflops is None and cuda:
        args.peak_tflops = H100_BF16_DENSE_TFLOPS
    if args.batch_size in (None, "auto"):
        args.batch_size = None
    else:
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            p.error(f"--batch-size must be a number or 'auto', not {args.batch_size!r}")
    if args.variants < 1 or not 0 <= args.indel_fraction <= 1:
        p.error("--variants must be >= 1 and --indel-fraction within [0, 1]")
    try:
        args.runs = ([parse_run(text) for text in args.runs] if args.runs else
                     [RunSpec(precision, args.reuse, args.batch_size) for precision in args.precisions])
    except ValueError as error:
        p.error(str(error))
    return args


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One configuration of our scorer (a row of the table)."""

    precision: str
    reuse: bool = True
    batch: int | None = None  # sequences per pass; None = the scorer's auto
    cudnn_benchmark: bool = False
    compile: bool = False

    @property
    def scorer(self) -> str:
        flags = ["reuse" if self.reuse else "no reuse"] + ["cudnn-benchmark"] * self.cudnn_benchmark \
            + ["compile"] * self.compile
        return f"ours ({', '.join(flags)})"


def parse_run(text: str) -> RunSpec:
    """``PRECISION[:reuse|:noreuse][:bN][:cudnn-benchmark][:compile]`` -> RunSpec."""
    precision, *flags = text.strip().split(":")
    if precision not in PRECISIONS:
        raise ValueError(f"--run {text!r}: precision must be one of {', '.join(PRECISIONS)}")
    spec = dict(precision=precision)
    for flag in flags:
        if flag in ("reuse", "noreuse"):
            spec["reuse"] = flag == "reuse"
        elif flag in ("cudnn-benchmark", "compile"):
            spec[flag.replace("-", "_")] = True
        elif flag[:1] == "b" and flag[1:].isdigit() and int(flag[1:]) >= 2:
            spec["batch"] = int(flag[1:])
        else:
            raise ValueError(f"--run {text!r}: unknown part {flag!r} (reuse, noreuse, bN with N >= 2, "
                             f"cudnn-benchmark, compile)")
    return RunSpec(**spec)


# --- model size and arithmetic -------------------------------------------------------------------------

def pass_flops(cfg: EnformerConfig, length: int = SEQUENCE_LENGTH) -> dict[str, float]:
    """FLOPs (2 x multiply-accumulates) of every conv, linear and attention matmul of one forward pass
    of ``length`` bp, all heads, counted as the official model computes them (the softmax pooling's full
    ``[C, C]`` logits; ours needs half of those). ~3.29e12 for the released model, 77% in the stem and
    conv tower. Element-wise work (norms, GELU, softmax) is left out."""
    half = cfg.channels // 2
    conv = length * 4 * 15 * half + 2 * length * half * half  # stem conv; pointwise block + pool logits
    size, c_in = length // 2, half
    for f in cfg.conv_filters:
        conv += size * c_in * f * 5 + 2 * size * f * f
        size, c_in = size // 2, f
    t, c, h = size, cfg.channels, cfg.num_heads
    k, v, r = cfg.key_size, cfg.value_size, cfg.num_relative_position_features
    attention = (2 * t * c * h * k + t * c * h * v + t * h * v * c + (2 * t - 1) * r * h * k
                 + h * t * t * k + h * t * (2 * t - 1) * k + h * t * t * v)
    transformer = cfg.num_transformer_layers * (attention + 2 * t * c * 2 * c)
    n = cfg.target_length
    heads = n * c * 2 * c + n * 2 * c * sum(cfg.heads.values())
    macs = {"conv": conv, "transformer": transformer, "final+heads": heads}
    out = {name: 2.0 * value for name, value in macs.items()}
    out["total"] = sum(out.values())
    return out


def describe_model(cfg: EnformerConfig, params: int, source: str) -> str:
    return (f"{source}: channels {cfg.channels}, transformer layers {cfg.num_transformer_layers}, attention heads "
            f"{cfg.num_heads}, output heads {', '.join(f'{k} {v}' for k, v in cfg.heads.items())}; "
            f"{params:,} parameters")


def calibrated_random_weights(model: Enformer, seed: int, device: torch.device) -> Enformer:
    """Random weights under which a single base visibly moves the output, as in a trained model.

    PyTorch's default initialisation shrinks activations ~3-fold per conv layer, so the conv tower's output
    hardly depends on the sequence: a SNV moves SAD by ~1e-6 (float32 rounding) and every agreement number
    would measure noise. Here every convolution is He-normal (std sqrt(2 / fan_in); the softmax pooling keeps
    its official 2 x identity), and each batch norm's moving statistics are set, layer by layer, to the mean
    and variance of its input on one random 131,072-bp sequence: every layer then sees unit-scale
    activations, as a trained network's do (SNV SAD ~1e-3 of the summed prediction).
    """
    pools = {id(m.logits.weight) for m in model.modules() if hasattr(m, "logits")}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv1d) and id(m.weight) not in pools:
                fan_in = m.weight.shape[1] * m.weight.shape[2]
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * math.sqrt(2 / fan_in))

    def calibrate(norm, inputs):
        x = inputs[0].float()
        norm.running_mean.copy_(x.mean(dim=(0, 2)))
        norm.running_var.copy_(x.var(dim=(0, 2)))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    bases = torch.randint(0, 4, (1, 131_072), generator=generator)
    try:
        with torch.inference_mode():
            model.trunk(torch.nn.functional.one_hot(bases, 4).float().to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return model


# --- genome, variants, windows --------------------------------------------------------------------------

def synthetic_genome(directory: Path, size: int, rng: np.random.Generator) -> Path:
    path = directory / "synthetic.fa"
    _common.write_fasta(path, {"chrB": _common.random_sequence(size, rng)})
    return path


def make_variants(genome: Genome, n: int, indel_fraction: float, rng: np.random.Generator) -> list[tuple]:
    """``n`` variants ``(chrom, pos, ref, alt)`` sorted like a VCF: SNVs, and indels of 1-20 bp (half
    insertions, half deletions), on ACGT bases. Positions keep a half window from the contig ends where the
    contig is long enough, so windows hold no padding."""
    names = list(genome.contigs)
    lengths = np.array([genome.contigs[c] for c in names], dtype=np.float64)
    n_indel = int(round(n * indel_fraction))
    kinds = ["snv"] * (n - n_indel) + ["indel"] * n_indel
    rng.shuffle(kinds)
    margin = HUB_SEQUENCE_LENGTH // 2
    variants = []
    for kind in kinds:
        for _attempt in range(10_000):
            chrom = names[rng.choice(len(names), p=lengths / lengths.sum())]
            length = genome.contigs[chrom]
            lo, hi = (margin, length - margin) if length > 2 * margin + 64 else (0, max(1, length - 32))
            pos = int(rng.integers(lo, hi)) + 1
            size = min(20, int(rng.geometric(0.35))) if kind == "indel" else 1  # indel length 1-20
            span = genome.fetch(chrom, pos - 1, pos + size).tobytes().decode()
            if set(span) - set("ACGT"):
                continue
            base = span[0]
            if kind == "snv":
                alt = "ACGT"[("ACGT".index(base) + int(rng.integers(1, 4))) % 4]
                variants.append((chrom, pos, base, alt))
            elif rng.random() < 0.5:  # insertion
                inserted = _common.random_sequence(size, rng).tobytes().decode()
                variants.append((chrom, pos, base, base + inserted))
            else:  # deletion
                variants.append((chrom, pos, span, base))
            break
        else:
            raise SystemExit("could not place a variant on ACGT bases of the genome")
    return sorted(variants, key=lambda v: (names.index(v[0]), v[1]))


def build_windows(genome: Genome, variants: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    ref = np.empty((len(variants), HUB_SEQUENCE_LENGTH), dtype=np.uint8)
    alt = np.empty_like(ref)
    for i, (chrom, pos, r, a) in enumerate(variants):
        ref[i], alt[i] = allele_windows(genome, chrom, pos, r, a)
    return ref, alt


# --- models --------------------------------------------------------------------------------------------

def build_baseline(model: Enformer, device: torch.device):
    """enformer-pytorch with the same hyper-parameters, holding ``model``'s weights (so both compute the same
    function, up to the gamma positional features: see README). Returns (module, note)."""
    from enformer_pytorch import Enformer as BaselineEnformer
    from enformer_pytorch.modeling_enformer import exponential_linspace_int

    from enformer_vep.weights import convert_enformer_pytorch

    cfg = model.config
    c = cfg.channels
    if cfg.pooling_type != "attention" or cfg.value_size != c // cfg.num_heads or \
            cfg.num_relative_position_features != c // cfg.num_heads:
        raise ValueError("enformer-pytorch cannot express this architecture")
    divisible = next((d for d in (128, 64, 32, 16, 8, 4, 2, 1)
                      if exponential_linspace_int(c // 2, c, num=6, divisible_by=d) == cfg.conv_filters), None)
    if divisible is None:
        raise ValueError(f"enformer-pytorch cannot express the conv filters {cfg.conv_filters}")
    # the released feature size has the official float32 gamma table in enformer-pytorch too
    tf_gamma = cfg.num_relative_position_features == 192
    baseline = BaselineEnformer.from_hparams(
        dim=c, depth=cfg.num_transformer_layers, heads=cfg.num_heads, attn_dim_key=cfg.key_size,
        output_heads=dict(cfg.heads), target_length=cfg.target_length, dim_divisible_by=divisible,
        use_tf_gamma=tf_gamma)
    ours = model.state_dict()
    state = {}
    for key, value in baseline.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
            continue
        (name, _), = convert_enformer_pytorch({key: value}).items()
        state[key] = ours[name].detach().reshape(value.shape).to(value.dtype)
    baseline.load_state_dict(state)
    note = "official float32 gamma table (use_tf_gamma)" if tf_gamma else "its own gamma features (use_tf_gamma " \
                                                                           "only exists for 192 features)"
    return baseline.to(device).eval(), note


# --- timing --------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def strict_float32():
    """No TF32 anywhere (cuDNN convolutions allow it by default): the baseline is plain float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class PeakMemory:
    """Peak device memory of a timed run: CUDA's allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_reset = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss_reset = _common.reset_peak_rss()

    def read(self) -> tuple[float, str]:
        """(MiB, description)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "allocated"
        return _common.mib(_common.peak_rss_kib()), "RSS" if self.rss_reset else "RSS since start"


def run_baseline(model, head: str, ref: np.ndarray, alt: np.ndarray, device: torch.device, warmup: int,
                 memory: PeakMemory) -> dict:
    """Per variant: host one-hot of the central 196,608 bp, two batch-1 full passes, SAD of ``head``."""
    def score(i: int) -> np.ndarray:
        x_ref = torch.from_numpy(HOST_ONE_HOT[ref[i, CROP]])[None].to(device)
        x_alt = torch.from_numpy(HOST_ONE_HOT[alt[i, CROP]])[None].to(device)
        with torch.no_grad():
            p_ref = model(x_ref)[head]
            p_alt = model(x_alt)[head]
        return (p_alt.sum(1) - p_ref.sum(1))[0].float().cpu().numpy()

    with strict_float32():
        for i in range(min(warmup, len(ref))):
            score(i)
        synchronize(device)
        memory.reset()
        start = time.perf_counter()
        sad = np.stack([score(i) for i in range(len(ref))])
        synchronize(device)
        seconds = time.perf_counter() - start
    peak, kind = memory.read()
    return {"sad": sad, "seconds": seconds, "peak_mib": peak, "peak_kind": kind, "batch": 1}


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN's benchmark mode: each new convolution shape times the candidate algorithms once."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def run_ours(model, head: str, spec: RunSpec, args, ref: np.ndarray, alt: np.ndarray, memory: PeakMemory) -> dict:
    scorer = VariantScorer(model, head=head, tracks=None, stats=("SAD",), device=args.device, batch_size=spec.batch,
                           reuse=spec.reuse, precision=spec.precision, compile=spec.compile)
    per_call = scorer.batch_size  # variants per score() call, as the pipeline groups them
    warmup = args.warmup if args.warmup is not None else (per_call if args.device.type == "cuda" else 1)
    # fp32 means fp32; the scorer switches TF32 on itself for "tf32"
    with strict_float32(), cudnn_benchmark(spec.cudnn_benchmark):
        start = time.perf_counter()
        if warmup:  # compilation and cuDNN's algorithm search happen here (and on each new shape later)
            scorer.score(ref[:warmup], alt[:warmup])
        synchronize(args.device)
        warmup_seconds = time.perf_counter() - start
        memory.reset()
        start = time.perf_counter()
        parts = []
        for s in range(0, len(ref), per_call):
            parts.append(scorer.score(ref[s:s + per_call], alt[s:s + per_call])["SAD"])
            per_call = scorer.batch_size  # auto batch sizes may shrink after an out-of-memory error
        synchronize(args.device)
        seconds = time.perf_counter() - start
    peak, kind = memory.read()
    return {"sad": np.concatenate(parts), "seconds": seconds, "peak_mib": peak, "peak_kind": kind,
            "batch": scorer.batch_size, "warmup_seconds": warmup_seconds, "warmup_variants": warmup,
            "tflop_per_variant": executed_tflop_per_variant(scorer, ref[:per_call], alt[:per_call], spec)}


def executed_tflop_per_variant(scorer: VariantScorer, ref: np.ndarray, alt: np.ndarray, spec: RunSpec) -> float:
    """TFLOP the scorer executes per variant on these windows, counted by torch's FlopCounterMode on the
    code path actually run (matmuls and convolutions; element-wise work is not counted).

    Counted in float32 without compilation: the operations, hence the FLOPs, are the same in every
    precision, and FlopCounterMode decomposes einsum below autocast, so an autocast run would mix dtypes."""
    from torch.utils.flop_counter import FlopCounterMode

    counting = VariantScorer(scorer.model, head=scorer.head, tracks=None, stats=("SAD",), device=scorer.device,
                             batch_size=len(ref), reuse=scorer.reuse, precision="fp32")
    with strict_float32(), FlopCounterMode(display=False) as counter:
        counting.score(ref, alt)
    return counter.get_total_flops() / len(ref) / 1e12


# --- agreement -----------------------------------------------------------------------------------------

def agreement(sad: np.ndarray, reference: np.ndarray) -> dict:
    """Per-variant Pearson r over tracks (median, worst) and max|dSAD| / (max - min of the reference)."""
    a, b = sad.astype(np.float64), reference.astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denominator > 0, (a * b).sum(1) / denominator, np.nan)
    span = float(reference.max() - reference.min())
    return {"r_median": float(np.nanmedian(r)) if np.isfinite(r).any() else float("nan"),
            "r_worst": float(np.nanmin(r)) if np.isfinite(r).any() else float("nan"),
            "max_rel_diff": (float(np.abs(sad.astype(np.float64) - reference).max() / span) if span > 0
                             else float("nan")),
            "r_per_variant": [float(x) for x in r]}


def effect_quartiles(reference: np.ndarray) -> np.ndarray:
    """Quartile (0 = smallest effects .. 3) of each variant by its largest |SAD| over tracks in ``reference``."""
    size = np.abs(reference.astype(np.float64)).max(axis=1)
    ranks = np.argsort(np.argsort(size, kind="stable"), kind="stable")
    return (4 * ranks) // len(size)


def stratified(r_per_variant: list[float], quartile: np.ndarray, is_snv: np.ndarray) -> dict:
    """Median and worst r per effect-size quartile and per variant kind."""
    r = np.asarray(r_per_variant, dtype=np.float64)
    groups = {f"Q{q + 1}": quartile == q for q in range(4)} | {"SNV": is_snv, "indel": ~is_snv}
    out = {}
    for name, mask in groups.items():
        values = r[mask & np.isfinite(r)]
        out[name] = ([float(np.median(values)), float(values.min())] if len(values) else None)
    return out


# --- main ----------------------------------------------------------------------------------------------

def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# --- FLOP account of the tiled conv tower --------------------------------------------------------------

# (name, variants, mean spacing in bp): the density of common variants over 2 Mb, and a sparse VCF
ACCOUNT_SETS = [("dense", 7_700, 260), ("sparse", 1_024, 50_000)]
ACCOUNT_HEADER = ["date", "commit", "model", "set", "variants", "indels", "blocks", "tiled blocks",
                  "two full passes", "per-window reuse", "tiles everywhere", "executed", "executed vs reuse"]


def flop_account(args, config: EnformerConfig, model_text: str) -> list[list[str]]:
    """TFLOP per variant of each mode on :data:`ACCOUNT_SETS` (10% indels, blocks of 1,024 records, the
    scorer's CPU and CUDA default batch of 32 sequences): ``tiling.plan_flops``, which counts what
    ``VariantScorer.score_block`` executes (tests/test_tiling.py checks it against FlopCounterMode)."""
    from enformer_vep import tiling

    rows = []
    for name, n, spacing in ACCOUNT_SETS:
        rng = np.random.default_rng(args.seed)
        codes = _common.random_sequence(200_000 + 2 * n * spacing + 100, rng)
        variants = _common.spaced_variants(codes, "chrB", n, spacing, 0.1, rng)
        flops = tiling.plan_flops(config, variants, batch_size=32)
        indels = sum(len(r) != len(a) for _, _, r, a in variants)
        rows.append([_common.today(), _common.git_revision(), model_text, f"{name}, 1 per {spacing:,} bp",
                     f"{n:,}", f"{indels:,}", str(flops["blocks"]), str(flops["tiled_blocks"])]
                    + [f"{flops[k] / 1e12:.3f}" for k in ("full", "reuse", "tiled", "executed")]
                    + [f"{flops['reuse'] / flops['executed']:.2f}x fewer"])
    return rows


def main(argv=None) -> int:
    from enformer_vep.allocator import configure_cpu_memory

    configure_cpu_memory()  # as the command line does (ENFORMER_VEP_MALLOC=system keeps glibc's defaults)
    args = parse_args(argv)
    if args.flop_account:
        sizes = {k: v for k, v in (("channels", args.channels), ("num_transformer_layers", args.layers)) if v}
        config = EnformerConfig(**QUICK_CONFIG) if args.quick else EnformerConfig(**sizes)
        model_text = ("quick tiny model" if args.quick else "released architecture" if not sizes else
                      f"{config.channels}-channel {config.num_transformer_layers}-layer model")
        rows = flop_account(args, config, model_text)
        print(f"TFLOP per variant, counted from the scorer's plan ({model_text}, human head, all tracks)")
        _common.print_table(ACCOUNT_HEADER[3:], [row[3:] for row in rows])
        if args.append_results:
            _common.append_rows("bench_score FLOP account", ACCOUNT_HEADER, rows, args.results)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)

    # model
    if args.model:
        from enformer_vep import load_model
        model, source = load_model(args.model, device=device), Path(args.model).name
    else:
        sizes = {k: v for k, v in (("channels", args.channels), ("num_transformer_layers", args.layers)) if v}
        cfg = EnformerConfig(**QUICK_CONFIG) if args.quick else EnformerConfig(**sizes)
        model = calibrated_random_weights(Enformer(cfg).to(device).eval(), args.seed, device)
        source = ("quick tiny model" if args.quick else "full-size model" if not sizes else
                  f"{cfg.channels}-channel {cfg.num_transformer_layers}-layer model") + ", calibrated random weights"
    model = model.to(device).eval()
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    head = "human" if "human" in cfg.heads else next(iter(cfg.heads))
    flops = pass_flops(cfg)

    # genome, variants, windows
    import tempfile
    with tempfile.TemporaryDirectory(prefix="bench_score_") as tmp:
        fasta = args.fasta or synthetic_genome(Path(tmp), args.genome_size, rng)
        genome = Genome(fasta)
        variants = make_variants(genome, args.variants, args.indel_fraction, rng)
        start = time.perf_counter()
        ref, alt = build_windows(genome, variants)
        window_seconds = time.perf_counter() - start
    n_snv = sum(len(r) == len(a) == 1 for _, _, r, a in variants)
    n_indel = len(variants) - n_snv
    genome_text = Path(args.fasta).name if args.fasta else f"a synthetic {args.genome_size / 1e6:g} Mb genome"

    device_text = _common.device_name(device)
    revision = _common.git_revision()
    load = f"  load average {os.getloadavg()[0]:.2f}" if device.type == "cpu" and hasattr(os, "getloadavg") else ""
    print(f"bench_score {_common.today()}  device: {device}, {device_text}  commit {revision}  "
          f"torch {torch.__version__}{load}")
    print(f"model: {describe_model(cfg, params, source)}")
    print(f"variants: {len(variants)} ({n_snv} SNV, {n_indel} indel) on {genome_text}; windows built on the host "
          f"in {window_seconds:.3f} s ({len(variants) / window_seconds:.1f} variants/s, not in the timings below)")
    print(f"arithmetic: {flops['total'] / 1e12:.4g} TFLOP per 196,608-bp pass ({flops['conv'] / flops['total']:.0%} "
          f"stem + conv tower); useful work = 2 full passes per variant"
          + (f"; peak {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ""))
    sys.stdout.flush()

    memory = PeakMemory(device)
    results = []  # dicts: scorer, precision, run or error
    if args.baseline:
        baseline = None
        try:  # our model leaves the GPU meanwhile, so that the baseline's peak memory is its own
            model.to("cpu")
            baseline, gamma_note = build_baseline(model, device)
            run = run_baseline(baseline, head, ref, alt, device, 1 if args.warmup is None else args.warmup, memory)
            results.append({"scorer": "enformer-pytorch", "precision": "fp32", **run, "note": gamma_note})
        except Exception as error:  # noqa: BLE001 - reported in the table, the other rows still run
            results.append({"scorer": "enformer-pytorch", "precision": "fp32",
                            "error": f"{type(error).__name__}: {error}"})
        finally:
            del baseline
            with contextlib.suppress(Exception):  # after a CUDA fault every call fails; the rows say so
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                model.to(device)
    for spec in args.runs:
        try:
            run = run_ours(model, head, spec, args, ref, alt, memory)
            results.append({"scorer": spec.scorer, "precision": spec.precision, **run})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as error:  # noqa: BLE001 - a CUDA fault poisons the context: the later rows fail too
            results.append({"scorer": spec.scorer, "precision": spec.precision,
                            "error": f"{type(error).__name__}: {error}"})

    # derived numbers; the reference is fp32 without reuse (two plain passes) when run, else the first fp32
    ours_fp32 = [r for r in results if r["scorer"].startswith("ours") and r["precision"] == "fp32" and "sad" in r]
    reference_run = next((r for r in ours_fp32 if "no reuse" in r["scorer"]), ours_fp32[0] if ours_fp32 else None)
    reference = None if reference_run is None else reference_run["sad"]
    quartile = None if reference is None else effect_quartiles(reference)
    is_snv = np.array([len(r) == len(a) for _, _, r, a in variants])
    base_rate = next((len(variants) / r["seconds"] for r in results if r["scorer"] == "enformer-pytorch"
                      and "seconds" in r), None)
    for r in results:
        if "error" in r:
            continue
        r["variants_per_s"] = len(variants) / r["seconds"]
        r["speedup"] = r["variants_per_s"] / base_rate if base_rate else None
        r["useful_tflops"] = 2 * flops["total"] * r["variants_per_s"] / 1e12
        r["fraction_of_peak"] = r["useful_tflops"] / args.peak_tflops if args.peak_tflops else None
        r["agreement"] = agreement(r["sad"], reference) if reference is not None else None
        if r["agreement"] is not None:
            r["agreement"]["by_group"] = stratified(r["agreement"]["r_per_variant"], quartile, is_snv)
        r["sad_range"] = [float(r["sad"].min()), float(r["sad"].max())]
        r["is_reference"] = r is reference_run

    header = ["scorer", "precision", "batch", "variants/s", "speedup", "peak memory", "useful TFLOP/s", "% of peak",
              "r median", "r worst", "max|dSAD|/range", "TFLOP/variant"]
    rows, md_rows, group_rows = [], [], []
    model_md = f"{source}; {params / 1e6:.3g} M params"
    for r in results:
        if "error" in r:
            rows.append([r["scorer"], r["precision"], "-", "failed"] + [""] * 8)
            md_rows.append([_common.today(), device_text, revision, model_md, f"{n_snv} SNV + {n_indel} indel",
                            r["scorer"], r["precision"], "-", "failed: " + r["error"][:200]] + [""] * 8)
            continue
        ag = r["agreement"] or {}
        cells = [r["scorer"], r["precision"], str(r["batch"]), f"{r['variants_per_s']:.3g}",
                 fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else ""),
                 f"{r['peak_mib']:.0f} MiB {r['peak_kind']}", f"{r['useful_tflops']:.3g}",
                 fmt(None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"], ".2f"),
                 "(reference)" if r["is_reference"] else fmt(ag.get("r_median"), ".6f"),
                 "" if r["is_reference"] else fmt(ag.get("r_worst"), ".6f"),
                 "" if r["is_reference"] else fmt(ag.get("max_rel_diff"), ".2e"),
                 fmt(r.get("tflop_per_variant"), ".3g")]
        rows.append(cells)
        md_rows.append([_common.today(), device_text, revision, model_md, f"{n_snv} SNV + {n_indel} indel"] + cells)
        if ag and not r["is_reference"]:
            group_rows.append([r["scorer"], r["precision"], str(r["batch"])] + [
                "n/a" if v is None else f"{v[0]:.4f} / {v[1]:.4f}" for v in ag["by_group"].values()])
    print()
    _common.print_table(header, rows)
    if group_rows:
        print()
        print("agreement by effect size (variants in quartiles of their largest |SAD| in the reference, Q1 = "
              "smallest) and by kind: r median / r worst")
        _common.print_table(["scorer", "precision", "batch", "Q1", "Q2", "Q3", "Q4", "SNV", "indel"], group_rows)
    print()
    print("notes: variants/s over the whole timed loop (baseline: host one-hot + 2 batch-1 passes per variant; ours: "
          "score() per batch of windows).")
    if reference_run is not None:
        print(f"       agreement = Pearson r of SAD over tracks per variant, and max|dSAD| over the fp32 SAD range, "
              f"both against {reference_run['scorer']} fp32; the baseline row compares enformer-pytorch with the "
              f"same weights.")
    for r in results:
        if r.get("warmup_seconds") is not None and ("compile" in r["scorer"] or "cudnn" in r["scorer"]):
            print(f"       {r['scorer']} {r['precision']}: warm-up ({r['warmup_variants']} variants, compilation or "
                  f"algorithm search included) {r['warmup_seconds']:.1f} s")
        if r.get("note"):
            print(f"       {r['scorer']}: {r['note']}.")
        if r.get("error"):
            print(f"       {r['scorer']} {r['precision']} failed: {r['error']}")
    if device.type == "cpu":
        print("       peak memory on CPU is the whole process's peak RSS during the timed run (model, windows and "
              "Python included).")

    if args.json:
        payload = {"date": _common.today(), "device": str(device), "device_name": device_text, "commit": revision,
                   "torch": torch.__version__, "model": source, "params": params, "config": cfg.to_dict(),
                   "variants": [list(v) for v in variants], "window_seconds": window_seconds, "flops_per_pass": flops,
                   "peak_tflops": args.peak_tflops,
                   "results": [{k: v for k, v in r.items() if k != "sad"} for r in results]}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    if args.append_results and md_rows:
        _common.append_rows("bench_score", SCORE_HEADER, md_rows, args.results)
        print(f"appended {len(md_rows)} rows to {args.results}")
    return 1 if all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
