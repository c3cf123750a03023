#!/usr/bin/env bash
# One task of a SLURM array: scores shard K of N of the VCF into its own directory.
# Submit through submit.sh (it sets N and chains the merge job), or alone:
#   sbatch --array=1-50 --export=ALL,VCF=in.vcf.gz,FASTA=hg38.fa,OUT=scores,SHARDS=50 score_array.sh
# A preempted or requeued task resumes where it stopped: rerunning the same command is safe.
#SBATCH --job-name=enformer-score
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.log
set -euo pipefail

: "${VCF:?set VCF}" "${FASTA:?set FASTA}" "${OUT:?set OUT}" "${SHARDS:?set SHARDS (the array size)}"
K=${SLURM_ARRAY_TASK_ID:?run as an array job: sbatch --array=1-$SHARDS}

# EXTRA: further options, the same for every task (e.g. "--model enformer.safetensors --rc").
# Shards merge only when every option (--checkpoint-every included) is the same.
enformer-score "$VCF" --fasta "$FASTA" -o "$OUT/shard-$K" --shard "$K/$SHARDS" ${EXTRA:-}
