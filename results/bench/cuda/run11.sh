#!/usr/bin/env bash
# Prepared 2026-11-27, run 2026-11-28 on an H100 (h100/run11/) at 4e17b11: the teacher steps and
# DMD iterations with the kernels on stopped at the square sums' buffer check, and --ops showed
# the 3-channel weight gradient wrong; both fixed, then run12.sh. It checks and times this project's CubeCL
# code (group norm + SiLU + modulation in either memory layout, attention, SiLU, the
# convolution's bias in the implicit-GEMM kernel, the batched Adam/AdamW, EMA and gradient-norm
# updates; on by default, DMD_CUBE_KERNELS=off runs Burn's ops instead) in one `dmd`, most
# important first, so that a budget cut loses the least:
#  1. correctness: adm_tiny against the official outputs (--check-reference) and the building
#     blocks' errors against the CPU (--ops --bf16: the group_norm+silu+scale, attention and silu
#     rows are the new kernels' forward and backward), kernels on;
#  2. the ImageNet-64 ADM's teacher-step split and DMD iteration at batch 8, kernels on, PyTorch's
#     in the same call, then kernels off;
#  3. adm_tiny with kernels off; the training loops (run10's teacher losses, to set beside
#     h100/run10 and the CPU's);
#  4. CubeCL's per-kernel profile of one forward, teacher step, DMD iteration and generation;
#  5. the one-cube-per-unit kernels with 128 and 512 threads (DMD_CUBE_THREADS; default 256).
# .carry/ holds dmd.xz (stripped `dmd`, `--features cuda`), edm/, reference/edm and fmnist/.
set -u
OUTDIR="${DEST:-results/bench/cuda/out11}"; BUDGET=${BUDGET:-400}
. results/bench/cuda/common.sh
TINY="/tmp/dmd bench --device cuda --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1 --ops --bf16"
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1 --iters 3 --train-iters 3"
run 60 dmd_tiny_on $TINY --json "$OUTDIR/dmd_tiny_on.json"
run 70 dmd_in64_b8_on $B8 --json "$OUTDIR/dmd_in64_b8_on.json"
run 45 torch_in64_b8 python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --iters 3 --json "$OUTDIR/torch_in64_b8.json"
run 70 dmd_in64_b8_off env DMD_CUBE_KERNELS=off $B8 --json "$OUTDIR/dmd_in64_b8_off.json"
run 40 dmd_tiny_off env DMD_CUBE_KERNELS=off $TINY --json "$OUTDIR/dmd_tiny_off.json"
training_pipeline 40 20 60
run 60 dmd_in64_b8_profile env CUBECL_DEBUG_LOG=/tmp/profile.log CUBECL_DEBUG_OPTION=profile /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 0 --iters 1 --train-iters 1
[ -f /tmp/profile.log ] && python3 results/bench/cuda/profile_summary.py /tmp/profile.log 80 > "$OUTDIR/cubecl_kernel_times.txt"
run 60 dmd_in64_b8_t128 env DMD_CUBE_THREADS=128 $B8 --json "$OUTDIR/dmd_in64_b8_t128.json"
run 60 dmd_in64_b8_t512 env DMD_CUBE_THREADS=512 $B8 --json "$OUTDIR/dmd_in64_b8_t512.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
