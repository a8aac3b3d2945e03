#!/usr/bin/env bash
# Fourth device call of 2026-11-27 (H100): issue 9's training loops on one GPU again, now with
# `gemm_conv2d` convolutions (the CUDA default; build of run7.sh): the Fashion-MNIST 16x16 DDPM++
# teacher for 40 steps, 64 pairs, a DMD2 distillation for 20 steps (teacher_fmnist_cuda.toml,
# distill_fmnist_cuda.toml), to compare with the CPU's losses (h100/cpu-same-configs/).
# .carry/ holds dmd.xz and fmnist/ (Fashion-MNIST's t10k-*-idx*-ubyte.gz).
set -u
OUTDIR="${DEST:-results/bench/cuda/out10}"; BUDGET=${BUDGET:-190}
. results/bench/cuda/common.sh
training_pipeline 70 30 80
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
