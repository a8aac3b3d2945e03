#!/usr/bin/env bash
# Second device call of 2026-11-28 (H100), after run11.sh found on CUDA: the gradient norm's
# square sums refusing their buffer (CUDA rounds allocations up), Burn's implicit-GEMM weight
# gradient wrong for a 3-channel input (relative L2 0.59), and the bf16 convolution with bias
# declined (shared memory). Same checks and timings as run11 with those fixed, most important
# first; adds --ops rows for 1-, 4- and 8-channel inputs and a convolution with bias, and the
# DMD2 configuration (batch 40, bf16 body). .carry/ as for run11.
set -u
OUTDIR="${DEST:-results/bench/cuda/out12}"; BUDGET=${BUDGET:-420}
. results/bench/cuda/common.sh
TINY="/tmp/dmd bench --device cuda --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1 --ops --bf16"
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1 --iters 3 --train-iters 3"
run 60 dmd_tiny_on $TINY --json "$OUTDIR/dmd_tiny_on.json"
run 70 dmd_in64_b8_on $B8 --json "$OUTDIR/dmd_in64_b8_on.json"
run 70 dmd_in64_b8_off env DMD_CUBE_KERNELS=off $B8 --json "$OUTDIR/dmd_in64_b8_off.json"
run 45 torch_in64_b8 python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --iters 3 --json "$OUTDIR/torch_in64_b8.json"
training_pipeline 40 20 60
run 60 dmd_in64_b8_profile env CUBECL_DEBUG_LOG=/tmp/profile.log CUBECL_DEBUG_OPTION=profile /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 0 --iters 1 --train-iters 1
[ -f /tmp/profile.log ] && python3 results/bench/cuda/profile_summary.py /tmp/profile.log 80 > "$OUTDIR/cubecl_kernel_times.txt"
run 45 dmd_in64_b8_t128 env DMD_CUBE_THREADS=128 $B8 --json "$OUTDIR/dmd_in64_b8_t128.json"
run 80 dmd_in64_b40_bf16_on /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 40 --bf16 --sampling 1 --warmup 1 --iters 2 --train-iters 2 --json "$OUTDIR/dmd_in64_b40_bf16_on.json"
run 45 dmd_in64_b8_t512 env DMD_CUBE_THREADS=512 $B8 --json "$OUTDIR/dmd_in64_b8_t512.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
