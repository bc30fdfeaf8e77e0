#!/usr/bin/env bash
# CAP on a Llama-3-8B-shaped random bf16 model on one NVIDIA GPU, in at most BUDGET seconds
# (default 460: fits an 8-minute slot). Measures what benchmarks/scale.py fit needs to turn the
# CPU-fitted stage costs into GPU predictions: per-stage seconds and peak GPU / host memory.
#
#   OUT=/some/dir bash benchmarks/gpu_scale.sh            # then, on the CPU machine:
#   python benchmarks/scale.py fit --gpu-results OUT/cells --gpu-probe OUT/probe-cuda.json
#
# Steps (each under a hard `timeout`, cut to what is left of BUDGET; a step that runs out is
# killed and recorded as *.failed.json, the next one still runs):
#   1. python env: `pip install -e .` only if capllm does not import (offline: --no-deps), else PYTHONPATH=src
#   2. probe: GPU matmul (fp32/bf16) and float64 eigh throughput; Robust-PCA s/iteration on
#      the 8B matrices 4096x4096, 14336x4096, 4096x14336 (4 iterations, tol 0)
#   3. llama3-8b, 2 blocks: the same cell as the CPU measurement (direct GPU/CPU ratio per stage)
#   4. llama3-8b, as many of its 32 blocks as the disk holds (BLOCKS, default 32, cut by
#      `scale.py fits`): all 32 need ~15 GiB of checkpoint + ~100 GiB of CAP work directory
#      (capllm's own disk_estimate at 8x512), more than a 64 GB machine has, so there it runs ~10–12
#   5. qwen2.5-coder-1.5b, if its capllm cache is present (nothing is downloaded)
# Settings: 8 calibration windows x 512 tokens (NSAMPLES, SEQLEN); rpca_max_iter=3 (RPCA_ITERS):
# real weights take ~36 iterations per matrix, but per-iteration cost is what the fit needs
# (the R feature counts iterations), and 36 iterations of 224 8B matrices alone would take the
# whole slot; compute dtype bf16, --no-eval --save none. Only JSON and the log go to $OUT
# (models and work directories go to $SCRATCH).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-scale-out}
SCRATCH=${SCRATCH:-/tmp/capllm-scale}
BUDGET=${BUDGET:-460}
BLOCKS=${BLOCKS:-32}
NSAMPLES=${NSAMPLES:-8}
SEQLEN=${SEQLEN:-512}
RPCA_ITERS=${RPCA_ITERS:-3}
SHAPE=${SHAPE:-llama3-8b}  # SHAPE=tiny DEVICE=cpu DTYPE=float32 PROBE="64x64": a dry run of this script on a CPU
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
PROBE=${PROBE:-4096x4096,14336x4096,4096x14336}
REAL=${REAL-qwen2.5-coder-1.5b}  # a real model's alias, run when its capllm cache is present (REAL= : none)
mkdir -p "$OUT/cells" "$SCRATCH"
exec > >(tee -a "$OUT/gpu_scale.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
step() {  # step NAME MAX_SECONDS CMD...: run CMD under timeout min(MAX, what is left - 5)
    local name=$1 lim=$2 l rc t0
    shift 2
    l=$(($(left) - 5))
    ((lim > l)) && lim=$l
    if ((lim < 20)); then echo "== $name: skipped, budget spent"; return 1; fi
    echo "== $name (at most ${lim}s, $(left)s of budget left)"
    t0=$(date +%s)
    DEADLINE=$((t0 + lim - 10)) timeout -k 10 "$lim" "$@"
    rc=$?
    echo "== $name: rc=$rc in $(($(date +%s) - t0))s"
    return $rc
}
measure() {  # measure MODEL: CAP on one model (the deadline lets measure kill and record a slow cell)
    python benchmarks/scale.py measure --models "$1" --methods cap --device "$DEVICE" --dtype "$DTYPE" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
        --rpca-max-iter "$RPCA_ITERS" --calib "$SCRATCH/corpus.txt" --out "$OUT/cells" --models-dir "$SCRATCH/models" --work "$SCRATCH/work" \
        --deadline "$DEADLINE"
}
export -f measure
export NSAMPLES SEQLEN RPCA_ITERS SCRATCH OUT DEVICE DTYPE

echo "== gpu_scale.sh $(date -u +%FT%TZ) budget ${BUDGET}s, scratch $SCRATCH ($(df -h --output=avail "$SCRATCH" | tail -1) free)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! python -c "import capllm" 2>/dev/null; then
    timeout 90 pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD/src
fi
python -c "import torch, transformers, capllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1
[ "$DEVICE" = cpu ] || python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device: nothing to measure"; exit 1; }
cat README.md BENCHMARKS.md docs/*.md benchmarks/*.md > "$SCRATCH/corpus.txt"  # calibration text (random weights: only the token count matters)

N=$([ "$DEVICE" = cpu ] && echo 512 || echo 8192)
step probe 60 python benchmarks/scale.py probe --device "$DEVICE" --n "$N" --eigh-n "$((N / 2))" --rpca-shapes "$PROBE" --rpca-iters 4 --out "$OUT/probe-$DEVICE.json"
step "$SHAPE-b2" 130 bash -c "measure shape:$SHAPE:2"
rm -rf "$SCRATCH/models/$SHAPE-b2-bfloat16" "$SCRATCH/work"
QWEN=$([ -n "$REAL" ] && python -c "from capllm.utils import cache_dir; p = cache_dir() / 'models' / '$REAL'; print(p if (p / 'config.json').exists() else '')")
RESERVE=$([ -n "$QWEN" ] && echo 100 || echo 10)
FIT=$(python benchmarks/scale.py fits --shape "$SHAPE" --max "$BLOCKS" --dir "$SCRATCH" --nsamples "$NSAMPLES" --seqlen "$SEQLEN")
echo "== $SHAPE: $FIT blocks fit the free disk (asked for $BLOCKS)"
if ((FIT > 2)); then
    step "$SHAPE-b$FIT" $(($(left) - RESERVE)) bash -c "measure shape:$SHAPE:$FIT"
    rm -rf "$SCRATCH/models/$SHAPE-b$FIT-bfloat16" "$SCRATCH/work"
fi
if [ -n "$QWEN" ]; then
    step "$REAL" 90 bash -c "measure $REAL"
else
    echo "== ${REAL:-real model}: no capllm cache of it on this machine (or REAL is empty), skipped"
fi
python benchmarks/scale.py summary --dir "$OUT/cells" | tee "$OUT/summary.txt"
echo "== done in $(($(date +%s) - START))s; files in $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
