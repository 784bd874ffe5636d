#!/usr/bin/env bash
# The checks run on a lent NVIDIA GPU (issue 12, GPU part), as one script with a time limit
# per section, so that one failure (a kernel that does not compile, an out-of-memory) costs
# only its own section. Results and logs go to OUTDIR (docs/benchmarks.md records them).
#
#   bash scripts/gpu_session.sh OUTDIR [--quick]
#
# Runs from the repository root on a host whose python3 has jax (CUDA), flax, optax, orbax,
# torch and transformers; packages missing there (sae-lens and what it imports, grain,
# tensorboardX, gguf) are installed first from wheels in ./.whl when that folder exists.
# Sections:
#   env     nvidia-smi, package versions, jax devices;
#   kernels tests/test_pallas_sparse.py on the GPU (native Triton kernel vs float64 numpy);
#   decode  scripts/bench_sparse_decode.py --skip-cpu: dense vs XLA sparse vs Pallas (Triton)
#           vs torch embedding_bag on the GPU, L = 6..26, bf16; L = 13 -> 26 scaling of the
#           decode and of a TopK CLT train step;
#   train   scripts/bench_train.py --device cuda: our JumpReLU / TopK SAE train step vs
#           SAELens on the same GPU, full float32 and TF32 matmuls.
set -u
out=${1:?usage: gpu_session.sh OUTDIR [--quick]}
quick=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset JAX_PLATFORMS
python=${PYTHON:-python3}

if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_session_site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_session_site"
fi

section() {  # section NAME LIMIT_S COMMAND...: log to OUTDIR/NAME.log, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name: start $(date -u +%T), limit ${limit}s"
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "=== $name: rc=$rc after $(($(date +%s) - start))s"
    grep -v -E "^\s*$|Warning|warn\(" "$out/$name.log" | tail -n "${TAIL_LINES:-25}"
}

section env 60 bash -c "nvidia-smi; git log -1 --format='commit %H %s' 2>/dev/null; \
    $python -c 'import jax, jaxlib, flax, optax, torch, triton, transformers, sae_lens, sys; \
print(sys.version.split()[0], \"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \
\"flax\", flax.__version__, \"optax\", optax.__version__, \"torch\", torch.__version__, \
\"triton\", triton.__version__, \"transformers\", transformers.__version__, \
\"sae_lens\", sae_lens.__version__); print(jax.devices())'"

JAX_PLATFORMS=cuda,cpu JAX_DEFAULT_MATMUL_PRECISION=highest section kernels 100 \
    "$python" -m pytest -q -p no:cacheprovider tests/test_pallas_sparse.py \
    -k "not pallas_tpu and not tpu_gather_rows"

if [ "$quick" = --quick ]; then
    section decode 200 "$python" scripts/bench_sparse_decode.py --skip-cpu --quick
    section train 120 "$python" scripts/bench_train.py --device cuda --pairs 3 --warmup 1
    exit 0
fi
TAIL_LINES=45 section decode 270 "$python" scripts/bench_sparse_decode.py --skip-cpu \
    --rounds 5 --prefault-gib 4
section train 130 bash -c "$python scripts/bench_train.py --device cuda; \
    $python scripts/bench_train.py --device cuda --tf32; \
    $python scripts/bench_train.py --device cuda --d 2560 --width 65536 --batch 8192; \
    $python scripts/bench_train.py --device cuda --d 2560 --width 65536 --batch 8192 --tf32"
