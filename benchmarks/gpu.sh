#!/usr/bin/env bash
# The GPU rows in one run, for anyone with a GPU and Keras installed (the lent H200 has
# PyTorch and JAX with CUDA; Keras travels as wheels): on torch, then JAX, the dropout
# kernel's tests on the GPU (masks equal to the numpy reference, gradients, nothing kept
# for backward, jit_compile), the one-site floor benchmark up to 256M elements, and the
# model benchmark at its GPU sizes. Each step has its own time limit, so that a slow one
# leaves the others their turn; everything lands in $OUT (default benchmarks/results/gpu).
#
#   OUT=benchmarks/results/gpu bash benchmarks/gpu.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/gpu.log"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log the end of its output
    local limit=$1 name=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" >"$OUT/step.txt" 2>&1
    local status=$?
    tail -n 40 "$OUT/step.txt" | tee -a "$LOG"
    echo "== $name: exit $status" | tee -a "$LOG"
    rm -f "$OUT/step.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
KERAS_BACKEND=torch $PY -c "import torch, jax, keras; print('torch', torch.__version__, 'jax', jax.__version__, \
'keras', keras.__version__, 'cuda', torch.cuda.is_available(), jax.devices())" 2>&1 | tee -a "$LOG"

TESTS=(tests/test_dropout.py tests/test_masks.py tests/test_mask_stats.py)
step 100 "torch: kernel tests on the GPU" env KERAS_BACKEND=torch \
    $PY -m pytest -q -p no:cacheprovider -m "not crossbackend" "${TESTS[@]}"
step 60 "jax: kernel tests on the GPU" env KERAS_BACKEND=jax \
    $PY -m pytest -q -p no:cacheprovider -m "not crossbackend" "${TESTS[@]}"

SIZES=${SIZES:-4096,65536,1048576,16777216,67108864,268435456}
REPS=${REPS:-5}
step 130 "floor: torch eager and compiled, 4K..256M" env KERAS_BACKEND=torch \
    $PY -m benchmarks.floor --backend torch --sizes $SIZES --reps $REPS --out "$OUT/floor_torch"
step 60 "floor: jax jit, 4K..256M" env KERAS_BACKEND=jax \
    $PY -m benchmarks.floor --backend jax --sizes $SIZES --reps $REPS --out "$OUT/floor_jax"

step 130 "models: torch, gpu sizes" env KERAS_BACKEND=torch $PY -m benchmarks --backend torch \
    --models ${TORCH_MODELS:-mlp,cnn,transformer,resnet50} --size gpu --reps $REPS --out "$OUT/bench"
step 60 "models: jax, gpu sizes" env KERAS_BACKEND=jax $PY -m benchmarks --backend jax \
    --models ${JAX_MODELS:-mlp,cnn,transformer} --size gpu --reps $REPS --out "$OUT/bench"

rm -f "$OUT"/floor_*/floor.png "$OUT"/bench/*.png  # regenerated from the JSON here
ls -R "$OUT" | tee -a "$LOG"
