#!/bin/bash
# The SmolLM2-135M grid of BENCHMARKS.md "The grid": every registered method × 30/40/50 %,
# perplexity (WikiText-2 test, 64 × 512) + zero-shot (9 tasks, 500 seeded docs each) + the
# long-form generation check, on one GPU. Six `capllm bench` groups run side by side (the
# model is small: the GPU is shared; nvidia-smi read 44.7 and 49.5 GB used mid-run), ratio 0.5 first in each group; the CAP
# variants that share CAP's Stage-1 cache wait for CAP's 0.5 cell to have written it.
#
#   bash benchmarks/grid/run_grid_gpu.sh OUT DATA_DIR        # e.g. OUT=/tmp/grid DATA_DIR=../shared/data
#
# Afterwards every cell is under OUT/<group>/cells/; `all/` gathers them and gets report.md.
# Measured on one H100 (2026-11-22): 35 cells in 26 min wall; one cell (sparsegpt 0.5) ran out of GPU
# memory beside the five other groups and was re-run alone (rerunning this script does that).
set -u
OUT=${1:?usage: run_grid_gpu.sh OUT DATA_DIR}; DATA=${2:?usage: run_grid_gpu.sh OUT DATA_DIR}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
TASKS=piqa,hellaswag,arc_easy,arc_challenge,winogrande,rte,openbookqa,boolq,lambada_openai
P="--limit 500 --tasks $TASKS --data-dir $DATA --dataset wikitext2 --eval-seqlen 512 --max-windows 64 --calib enwiki --nsamples 32 --seqlen 512 --seed 0 --gen-prompts 8"
C="--device cuda --zs-source local --zs-batch-size 32 --batch-size 8 --save none"
bench() { local g=$1 methods=$2 r=$3; shift 3; echo "=== $(date +%T) $g $methods $r"; python -m capllm bench --models smollm2-135m --methods "$methods" --ratios "$r" --out "$OUT/$g" $P -- $C "$@"; }
gA() { for r in 0.5 0.3 0.4; do bench gA cap $r; [ $r = 0.5 ] && touch "$OUT/stage1.done"; done; }
gB() { for r in 0.5 0.3 0.4; do bench gB dense,magnitude $r; done
       while [ ! -e "$OUT/stage1.done" ]; do sleep 5; done
       for r in 0.5 0.3 0.4; do bench gB cap-uniform,rpca-threshold $r; done; }
gC() { for r in 0.5 0.3 0.4; do bench gC sparsegpt,wanda,svd $r; done; }
gD() { for r in 0.5 0.3 0.4; do bench gD oats $r --option svd=warm; done; }
gE() { for r in 0.5 0.3 0.4; do bench gE losparse,sslc $r; done; }
gF() { for r in 0.5 0.3 0.4; do bench gF svd-llm,asvd $r; done; }
for g in gA gB gC gD gE gF; do $g > "$OUT/$g.log" 2>&1 & done
wait
mkdir -p "$OUT/all/cells"
for d in "$OUT"/g*/cells/*; do ln -sfn "$(realpath "$d")" "$OUT/all/cells/$(basename "$d")"; done
python -m capllm bench --models smollm2-135m --methods dense,cap,cap-uniform,rpca-threshold,sparsegpt,wanda,magnitude,oats,sslc,losparse,svd-llm,asvd,svd \
  --ratios 0.3,0.4,0.5 --out "$OUT/all" --report-only
