#!/usr/bin/env bash
# Prepared 2026-11-27 for the next device call (not yet run: the two sessions since had no
# device). It checks and times this project's CubeCL code (group norm + SiLU + modulation in
# either memory layout, attention, SiLU, the convolution's bias in the implicit-GEMM kernel, the
# Adam/AdamW and EMA updates; on by default, DMD_CUBE_KERNELS=off runs Burn's ops instead) in
# one `dmd`:
#  1. correctness first: adm_tiny against the official outputs (--check-reference) and the
#     building blocks' errors against the CPU (--ops --bf16: the group_norm+silu+scale,
#     attention and silu rows are the new kernels' forward and backward; the convolutions with
#     bias are in the whole network's check), kernels on and off;
#  2. the training loops (run10's teacher losses, to set beside h100/run10 and the CPU's);
#  3. the ImageNet-64 ADM's teacher-step split and DMD iteration at batch 8, kernels on and off,
#     and PyTorch's in the same call.
# .carry/ holds dmd.xz (stripped `dmd`, `--features cuda`), edm/, reference/edm and fmnist/.
set -u
OUTDIR="${DEST:-results/bench/cuda/out11}"; BUDGET=${BUDGET:-480}
. results/bench/cuda/common.sh
TINY="/tmp/dmd bench --device cuda --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1 --ops --bf16"
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1 --iters 3 --train-iters 3"
run 60 dmd_tiny_on $TINY --json "$OUTDIR/dmd_tiny_on.json"
run 60 dmd_tiny_off env DMD_CUBE_KERNELS=off $TINY --json "$OUTDIR/dmd_tiny_off.json"
training_pipeline 60 25 70
run 70 dmd_in64_b8_on $B8 --json "$OUTDIR/dmd_in64_b8_on.json"
run 70 dmd_in64_b8_off env DMD_CUBE_KERNELS=off $B8 --json "$OUTDIR/dmd_in64_b8_off.json"
run 45 torch_in64_b8 python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --iters 3 --json "$OUTDIR/torch_in64_b8.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
