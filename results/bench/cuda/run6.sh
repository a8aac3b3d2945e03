#!/usr/bin/env bash
# Third device call of 2026-11-26 (H100), after run5.sh: `dmd` built with `--features cuda-fusion`
# (Burn's operation fusion) and two-step group-norm sums. Reference check under fusion, adm_tiny
# both convolution ways, the ImageNet-64 ADM at batch 8 (per-op and whole steps) and at batch 40
# (bf16), and the CUDA training pipeline of run4.sh again. Same .carry/ as run4.sh.
set -u
OUTDIR="${DEST:-results/bench/cuda/out6}"; BUDGET=${BUDGET:-400}
. results/bench/cuda/common.sh
B="/tmp/dmd bench --device cuda"
run 80 dmd_tiny_im2col $B --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1,35 --json "$OUTDIR/dmd_tiny_im2col.json"
run 50 dmd_tiny_native env DMD_CONV=native $B --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1 --json "$OUTDIR/dmd_tiny_native.json"
run 80 dmd_in64_b8 $B --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1 --iters 3 --train-iters 2 --ops --json "$OUTDIR/dmd_in64_b8.json"
run 120 dmd_in64_b40_bf16 $B --net-config $NET/adm_imagenet64.json --batch 40 --warmup 1 --iters 3 --train-iters 2 --sampling 1 --bf16 --json "$OUTDIR/dmd_in64_b40_bf16.json"
training_pipeline 50 30 60
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
