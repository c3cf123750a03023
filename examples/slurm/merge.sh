#!/usr/bin/env bash
# Merges the finished shards into OUT/merged. Started by submit.sh once every array task
# succeeded; it refuses (and says why) if a shard is missing, unfinished or from another run.
#SBATCH --job-name=enformer-merge
#SBATCH --cpus-per-task=1
#SBATCH --mem=8G
#SBATCH --time=4:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail

: "${OUT:?set OUT}" "${SHARDS:?set SHARDS}"
shards=()
for k in $(seq 1 "$SHARDS"); do shards+=("$OUT/shard-$k"); done
enformer-score merge "${shards[@]}" -o "$OUT/merged"
