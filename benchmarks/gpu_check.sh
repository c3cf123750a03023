#!/usr/bin/env bash
# The CUDA check, in one call of at most ~8 minutes on a GPU machine (benchmarks/README.md).
# The acceptance steps first: the CUDA tests, bench_score's baseline-vs-ours table at every
# precision, the README's main job end to end with --devices D,D against one device; then the
# tiles' whole-job bench, a profile of scoring batches and torch.compile. Each step has a time
# limit and the whole script ends within $GPU_CHECK_SECONDS (480; the dry run doubles the budget
# and each limit, as 2 CPU cores are slower than one GPU); $GPU_CHECK_STEPS (names,
# space-separated) runs only those steps.
# Everything lands under $OUT (default: a new temporary directory):
#   gpu_check.log        every step's output, then a summary of the steps (status, seconds)
#   bench.json           bench_score's numbers (bench_compile.json: the compile rows)
#   RESULTS.md           benchmarks/RESULTS.md with this run's rows appended (copy it back)
#   profile/             profile_score.py's profile.txt, profile.json, profile_table.txt
# A failing step is logged and the next one runs; the exit status counts failed and skipped steps.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, wheels carried in .whl/
#   bash benchmarks/gpu_check.sh --dry-run    # CPU, tiny model, same steps: run before any GPU time
set -uo pipefail
OUT=$(realpath -m "${OUT:-$(mktemp -d)}")  # before the cd: a relative OUT is the caller's
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
SCALE=$(( DRY + 1 ))  # the dry run's time limits: every step must finish, or it proved nothing
BUDGET=$(( ${GPU_CHECK_SECONDS:-480} * SCALE ))
mkdir -p "$OUT/profile"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export DRY PY
SUMMARY=()
FAILED=0
E2E=$(mktemp -d)  # the end-to-end runs' model and outputs (~100 MB), removed at the end
trap 'rm -rf "$E2E"' EXIT

DEADLINE=$(( $(date +%s) + BUDGET ))  # the whole script ends by then

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, never stop the script
    local name=$1 limit=$2 start rc left
    shift 2
    # the end-to-end steps run on the model that e2e_fixture_model converts
    if [[ -n "${GPU_CHECK_STEPS:-}" && " $GPU_CHECK_STEPS " != *" $name "* ]] \
        && ! [[ $name == e2e_fixture_model && " $GPU_CHECK_STEPS " == *" e2e_"* ]]; then
        return 0
    fi
    limit=$(( limit * SCALE ))
    start=$(date +%s)
    left=$(( DEADLINE - start ))
    if (( left < 20 )); then
        SUMMARY+=("$(printf '%-22s skipped: the %s-s budget was spent' "$name" "$BUDGET")")
        FAILED=$((FAILED + 1))
        return 0
    fi
    (( limit > left )) && limit=$left
    echo "===== $name (limit ${limit} s) $(date -u +%H:%M:%S)" >> "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    SUMMARY+=("$(printf '%-22s rc=%-4s %4d s' "$name" "$rc" $(( $(date +%s) - start )))")
    [[ $rc == 0 ]] || FAILED=$((FAILED + 1))
    echo "----- $name: rc=$rc" >> "$LOG"
    return 0
}

wheels() {  # the packages the GPU image lacks, carried in .whl/, into a fresh /tmp/site
    rm -rf /tmp/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
}

environment() {  # versions; fails when an import fails or, on the device, no CUDA device is visible
    nvidia-smi 2>/dev/null | head -15
    "$PY" - <<'PYTHON'
import os, sys
import numpy, torch, cyvcf2, pysam, h5py, enformer_pytorch
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version(), "numpy", numpy.__version__)
print("cyvcf2", cyvcf2.__version__, "pysam", pysam.__version__, "h5py", h5py.__version__, "enformer-pytorch imported")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name())
elif os.environ["DRY"] == "0":
    sys.exit("no CUDA device is visible")
PYTHON
}

carry_size() {  # a device call carries the tree git does not ignore and .whl/: 64 MiB at most
    "$PY" - <<'PYTHON'
import pathlib, subprocess, sys
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        check=True, capture_output=True).stdout.split(b"\0")
tree = sum(path.stat().st_size for name in listed if name and (path := pathlib.Path(name.decode())).is_file())
wheels = sum(path.stat().st_size for path in pathlib.Path(".whl").glob("*") if path.is_file())
print(f"carried to the device: {(tree + wheels) // 1024} KiB (tree {tree // 1024}, .whl {wheels // 1024}) of 65536 KiB")
if not any(pathlib.Path(".whl").glob("*.whl")):
    sys.exit("no wheels in .whl/: the device needs them (benchmarks/README.md)")
if tree + wheels > 64 * 1024 * 1024:
    sys.exit("over the device's 64 MiB: slim tests/data or the wheels")
PYTHON
}

same_files() {  # same_files DIR DIR: the same file names, each byte for byte
    local differ=0 name
    compgen -G "$1/*.h5" > /dev/null || { echo "no scores in $1"; return 1; }
    diff <(ls "$1") <(ls "$2") || return 1
    for name in $(ls "$1"); do
        if cmp "$1/$name" "$2/$name"; then echo "identical: $name"; else differ=1; fi
    done
    return $differ
}
export -f wheels environment carry_size same_files

if [[ $DRY == 1 ]]; then
    DEVICE=cpu
    export ENFORMER_VEP_TEST_DEVICE=cpu
    BENCH=(--quick --device cpu --variants 8 --warmup 1)
    RUNS=(--run fp32:noreuse:b4 --run fp32:b4 --run bf16:b4 --run bf16/fp32:b4 --run bf16/tf32:b4
          --run bf16/tf32:b8 --run bf16/tf32:b4:cudnn-benchmark)
    COMPILE_RUNS=(--run bf16/tf32:b4 --run bf16/tf32:b4:compile)
    PROFILE=(--quick --device cpu --precision bf16/tf32 --batch-size 4 --batches 2 --pipeline-batches 2)
    E2E_REGION=(--region chr1:602000-605000)
    TWO="cpu,cpu"
    TILES=(--quick --records 24)
else
    DEVICE=cuda
    step wheels 120 bash -c wheels
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if ! $PY -c "import polars" 2>/dev/null; then
        # enformer-pytorch imports polars for its data loaders only; the baseline never uses them
        mkdir -p /tmp/shim/polars && echo '"""Stand-in: enformer-pytorch imports polars at import time only."""' \
            > /tmp/shim/polars/__init__.py
        export PYTHONPATH="/tmp/shim:$PYTHONPATH"
    fi
    BENCH=(--device cuda --variants 64 --peak-tflops 790)
    RUNS=(--run fp32:noreuse:b32 --run fp32:b32 --run tf32:b32 --run bf16:b32 --run bf16/fp32:b32
          --run bf16/tf32:noreuse:b32 --run bf16/tf32:b32 --run bf16/tf32:b16 --run bf16/tf32:b64
          --run bf16/tf32:b32:cudnn-benchmark)
    COMPILE_RUNS=(--run bf16/tf32:b32 --run bf16/tf32:b32:compile)
    PROFILE=(--device cuda --precision bf16/tf32 --batch-size 32 --batches 3 --pipeline-batches 8)
    E2E_REGION=()
    TWO="cuda:0,cuda:0"
    TILES=(--device cuda --records 1024)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"

step environment 60 bash -c environment
[[ $DRY == 1 ]] && step carry_size 30 bash -c carry_size

step cuda_tests 180 $PY -m pytest -q -m gpu -p no:cacheprovider tests/

step bench_score 220 $PY benchmarks/bench_score.py "${BENCH[@]}" "${RUNS[@]}" --json "$OUT/bench.json" \
    --append-results --results "$OUT/RESULTS.md"

GIAB=tests/data/grch38_chr1_giab_hg002
step e2e_fixture_model 60 bash -c "mkdir -p $E2E/fixture/variables && \
cp tests/data/official_small/variables.index $E2E/fixture/variables/ && \
$PY -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], \"wb\"))' \
tests/data/official_small/variables.data-00000-of-00001.xz $E2E/fixture/variables/variables.data-00000-of-00001 && \
$PY -m enformer_vep convert $E2E/fixture $E2E/fixture.safetensors"
step e2e_one_device 90 $PY -m enformer_vep $GIAB/input.vcf.gz --fasta $GIAB/reference.fa \
    --model "$E2E/fixture.safetensors" -o "$E2E/one" --device $DEVICE "${E2E_REGION[@]}" --no-progress
step e2e_two_workers 90 $PY -m enformer_vep $GIAB/input.vcf.gz --fasta $GIAB/reference.fa \
    --model "$E2E/fixture.safetensors" -o "$E2E/two" --devices $TWO "${E2E_REGION[@]}" --no-progress
step e2e_identical 30 bash -c 'same_files "$1" "$2"' _ "$E2E/one" "$E2E/two"

step bench_tiles 150 $PY benchmarks/bench_job.py "${TILES[@]}" --append-results --results "$OUT/RESULTS.md"

step profile 120 $PY benchmarks/profile_score.py "${PROFILE[@]}" --out "$OUT/profile"

step e2e_compile 120 $PY -m enformer_vep $GIAB/input.vcf.gz --fasta $GIAB/reference.fa \
    --model "$E2E/fixture.safetensors" -o "$E2E/compiled" --device $DEVICE --compile "${E2E_REGION[@]}" --no-progress

step bench_compile 150 $PY benchmarks/bench_score.py "${BENCH[@]}" --variants 32 --no-baseline "${COMPILE_RUNS[@]}" \
    --json "$OUT/bench_compile.json" --append-results --results "$OUT/RESULTS.md"

# gathered before it is appended: reading the log while appending to it would copy it into itself
summary=$({
    echo
    echo "===== summary ($( [[ $DRY == 1 ]] && echo dry run || echo device run ), $(date -u +%H:%M:%S))"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    sed -n '/^scorer /,/^notes:/p' "$LOG"
    echo
    cat "$OUT/profile/profile.txt" 2>/dev/null
    grep -E "^(identical|[0-9]+ passed|FAILED|ERROR)|passed|failed" "$LOG" | grep -v "^----" | tail -n 20
})
echo "$summary" | tee -a "$LOG"
echo "outputs in $OUT"
exit $FAILED
