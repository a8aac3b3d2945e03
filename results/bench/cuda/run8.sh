#!/usr/bin/env bash
# Second device call of 2026-11-27 (H100), after run7.sh, same `dmd` plus the teacher step's split
# (loss forward + backward | Adam update): where the ImageNet-64 ADM's training time goes with
# implicit-GEMM convolutions. CubeCL's per-kernel profile of one forward, teacher step, DMD
# iteration and generation at batch 8, summed per kernel on the device (profile_summary.py).
set -u
OUTDIR="${DEST:-results/bench/cuda/out8}"; BUDGET=${BUDGET:-200}
. results/bench/cuda/common.sh
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1"
run 50 dmd_in64_b8_split $B8 --warmup 1 --iters 3 --train-iters 3 --json "$OUTDIR/dmd_in64_b8_split.json"
run 40 dmd_tiny_split /tmp/dmd bench --device cuda --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1 --json "$OUTDIR/dmd_tiny_split.json"
run 90 dmd_in64_b8_profile env CUBECL_DEBUG_LOG=/tmp/profile.log CUBECL_DEBUG_OPTION=profile $B8 --warmup 0 --iters 1 --train-iters 1
python3 results/bench/cuda/profile_summary.py /tmp/profile.log 60 > "$OUTDIR/cubecl_kernel_times.txt"
head -30 "$OUTDIR/cubecl_kernel_times.txt"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
