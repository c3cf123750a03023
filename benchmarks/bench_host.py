"""Host-side throughput of the scoring pipeline, model excluded, on one CPU core.

Measures what the host must sustain so that the device never waits: stream the VCF
(cyvcf2), check REF against the FASTA, build reference and alternative windows (slices of a
cached chromosome block), stack them into batches of uint8 codes and hand them to torch.
Target (issue 4): >= 2,000 variants/s on one core.

    python benchmarks/bench_host.py [--variants 20000] [--indel-fraction 0.1] [--batch 32]
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before numpy/torch start their pools

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from enformer_vep.genome import Genome, GenomeBlocks  # noqa: E402
from enformer_vep.variants import Allele, read_variants  # noqa: E402
from enformer_vep.windows import allele_windows, ref_matches  # noqa: E402


def synthetic_inputs(directory: Path, n: int, indel_fraction: float, length: int = 4_000_000, seed: int = 0):
    """A random contig and a sorted VCF of ``n`` SNVs and indels on it (REF always matching)."""
    rng = np.random.default_rng(seed)
    bases = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, length)].tobytes().decode()
    fasta = directory / "genome.fa"
    fasta.write_text(">chrS\n" + "\n".join(bases[i:i + 60] for i in range(0, length, 60)) + "\n")
    positions = np.sort(rng.choice(np.arange(1_000, length - 1_000), size=n, replace=False))
    lines = ["##fileformat=VCFv4.2", f"##contig=<ID=chrS,length={length}>",
             "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    for pos in positions:
        ref = bases[pos - 1]
        if rng.random() < indel_fraction:
            alt = ref + "T" if rng.random() < 0.5 else None
            if alt is None:
                ref, alt = bases[pos - 1:pos + 2], ref
        else:
            alt = "ACGT"[("ACGT".index(ref) + 1) % 4]
        lines.append(f"chrS\t{pos}\t.\t{ref}\t{alt}\t.\tPASS\t.")
    vcf = directory / "variants.vcf"
    vcf.write_text("\n".join(lines) + "\n")
    return vcf, fasta


def host_pipeline(vcf: Path, fasta: Path, batch: int) -> tuple[int, float]:
    """Everything the scorer's host side does per variant; returns (variants, seconds)."""
    genome = Genome(fasta)
    blocks = GenomeBlocks(Genome(fasta))
    group: list[Allele] = []
    done = 0
    start = time.perf_counter()

    def ship(rows):
        pairs = [allele_windows(blocks, r.fasta_chrom, r.pos, r.ref, r.alt) for r in rows]
        for codes in (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])):
            torch.from_numpy(codes)  # what travels to the device: uint8, not float one-hot

    for item in read_variants(str(vcf), genome.contigs):
        if isinstance(item, Allele) and ref_matches(genome, item.fasta_chrom, item.pos, item.ref)[0]:
            group.append(item)
            if len(group) == batch:
                ship(group)
                done += len(group)
                group = []
    if group:
        ship(group)
        done += len(group)
    return done, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=int, default=20_000, help="variants to stream (default 20,000)")
    parser.add_argument("--indel-fraction", type=float, default=0.1, help="share of indels (default 0.1)")
    parser.add_argument("--batch", type=int, default=32, help="variants per batch (default 32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        vcf, fasta = synthetic_inputs(Path(tmp), args.variants, args.indel_fraction)
        n, seconds = host_pipeline(vcf, fasta, args.batch)
    print(f"host pipeline: {n} variants in {seconds:.2f} s = {n / seconds:,.0f} variants/s on one core "
          f"(batch {args.batch}, indel fraction {args.indel_fraction}); target >= 2,000")


if __name__ == "__main__":
    main()
