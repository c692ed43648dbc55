#!/usr/bin/env bash
# Every GPU check and benchmark of gptjax in one run, each result written into $OUT: the GPU tests, the
# train-step profile, the benchmark's train rows (PyTorch torch.compile beside them) and decode rows, and the
# streaming costs. Sized for under 8 minutes on an H100/H200.
#
#   OUT=/some/dir bash experiments/gpu_session.sh            # on a machine with an NVIDIA GPU
#   OUT=/tmp/smoke SMOKE=1 bash experiments/gpu_session.sh   # the same commands on CPU, tiny shapes (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the directory for the results}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
    export JAX_PLATFORMS=cpu
    G="--preset gpt2-small --n-layers 1 --context-length 64 --batch-size 2 --dtype bfloat16 --drop-rate 0 --vocab-multiple 64"
    D="--n-layers 1 --decode-tokens 8 --nocache-tokens 4 --decode-rounds 1"
    S="--new-tokens 8 --rounds 1 --chunks 1 4"
    P="--n-layers 1 --context-length 64 --steps 2"
    TESTS="--co"
else
    export JAX_PLATFORMS=cuda
    G="--preset gpt2-small --context-length 1024 --batch-size 16 --dtype bfloat16 --drop-rate 0 --vocab-multiple 64"
    D="--decode-tokens 200 --nocache-tokens 50 --decode-rounds 5"
    S="--new-tokens 200 --rounds 3 --weight-dtype bfloat16"
    P="--context-length 1024 --batch-size 16 --dtype bfloat16 --vocab-multiple 64 --drop-rate 0"
    TESTS=""
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # PyTorch shares the GPU in the benchmark
python -c "import jax; print(jax.devices(), jax.__version__)" > "$OUT/devices.txt" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

run() {  # run NAME SECONDS CMD...: its output in $OUT/NAME.log, its exit status in $OUT/status.txt
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/status.txt"
}
run gpu_tests 120 python -m pytest -q tests/test_gpu.py $TESTS
run profile_train_step 120 python experiments/profile_step.py $P --out "$OUT/profile_train_step"
run bench_train 180 gptjax bench $G --steps 30 --parts train --out "$OUT/bench_gpu_train"
run bench_decode 120 gptjax bench --preset gpt2-small --decode-batches 1 8 $D --weight-dtypes float32 bfloat16 \
    --parts bandwidth decode --no-torch-compile --out "$OUT/bench_gpu_decode"
run decode_stream 60 python experiments/decode_stream.py $S --out "$OUT/decode_stream"
