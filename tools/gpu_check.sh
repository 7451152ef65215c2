#!/usr/bin/env bash
# The GPU measurements of issue 10 and the CUDA tests, as one script for a lent GPU machine
# (docs/benchmarks.md, "Measuring on a GPU", gives the device call that runs it).
#
#   bash tools/gpu_check.sh OUT_DIR [BUDGET_S]
#
# Parts run in priority order, each under its own timeout; a part whose timeout does not fit in what
# is left of BUDGET_S (default 540) is skipped, and the log says so. Each benchmark part writes
# OUT_DIR/<part>.json; everything printed also goes to OUT_DIR/log.txt.
#
# BENCH_ARGS (default "--device cuda --amp bf16") is appended to every benchmark command, so it can
# override any option; e.g. a CPU smoke test of this script:
#   BENCH_ARGS="--device cpu --depth 18 --size 128 160 --component-size 128 160 --iters 1 --warmup 0
#   --component-iters 1 --e2e-size 128 160 --data-images 8 --e2e-iters 4" GPU_CHECK_TESTS=none \
#   bash tools/gpu_check.sh /tmp/gpu_check 300
set -u -o pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR [BUDGET_S]}
budget=${2:-540}
python=${PYTHON:-python3}
bench_args=${BENCH_ARGS:---device cuda --amp bf16}
tests=${GPU_CHECK_TESTS:-tests/test_cuda.py tests/test_compile.py}
cd "$(dirname "$0")/.."
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)

part() {  # part NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 left
    shift 2
    left=$((budget - ($(date +%s) - start)))
    if ((left < limit)); then
        echo "== $name: skipped ($left s of the budget left, it may take $limit s)"
        return
    fi
    echo "== $name (at most $limit s): $*"
    local began=$(date +%s)
    timeout -k 10 "$limit" "$@"
    echo "== $name: exit $? after $(($(date +%s) - began)) s"
}

bench() {  # bench NAME TIMEOUT_S BENCHMARK_OPTIONS...
    local name=$1 limit=$2
    shift 2
    # shellcheck disable=SC2086  # bench_args is a list of options
    part "$name" "$limit" "$python" tools/benchmark.py "$@" --json "$out/$name.json" $bench_args
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$python" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
git log -1 --format='commit %h %s' 2>/dev/null || true

if [ "$tests" != none ]; then
    # shellcheck disable=SC2086  # tests is a list of paths
    part tests 150 "$python" -m pytest -q -p no:cacheprovider $tests
fi
# Issue 10's targets, most important first: batch-8 inference <= 0.6x torchvision in both regimes,
# batch-1 eager <= 0.85x; the compiled path's batch-1 latency (<= 10 ms) and compile time; loss +
# backward <= 0.3x and training peak memory <= 0.5x; then end-to-end images/second.
bench inference_trained 120 --only inference --inference-batches 1 8 --iters 20
bench inference_dense 120 --only inference --inference-batches 1 8 --candidates dense --iters 20
bench inference_compiled 240 --only inference --inference-batches 1 --compile --iters 50
bench train_loss 120 --only train loss postprocess --batch 8 --iters 10
bench postprocess_dense 60 --only postprocess --candidates dense --batch 8 --component-iters 10
bench e2e 150 --e2e --depth 50 --batch 16 --data-images 320 --data-workers 8 --e2e-iters 60
echo "== done after $(($(date +%s) - start)) s"
