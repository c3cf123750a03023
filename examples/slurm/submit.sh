#!/usr/bin/env bash
# Submit the array of N scoring tasks and a merge job that runs after all of them succeeded.
#   examples/slurm/submit.sh in.vcf.gz hg38.fa scores 50 [--model enformer.safetensors ...]
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 VCF FASTA OUT N [enformer-score options...]" >&2
    exit 2
fi
VCF=$1 FASTA=$2 OUT=$3 SHARDS=$4
shift 4
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
array=$(sbatch --parsable --array="1-$SHARDS" \
    --export=ALL,VCF="$VCF",FASTA="$FASTA",OUT="$OUT",SHARDS="$SHARDS",EXTRA="$*" "$here/score_array.sh")
sbatch --dependency="afterok:${array}" --export=ALL,OUT="$OUT",SHARDS="$SHARDS" "$here/merge.sh"
echo "submitted array job $array ($SHARDS tasks) and its merge job"
