#!/usr/bin/env bash
# Device call of 2026-11-27 (H100): `dmd` with `gemm_conv2d` (Burn's implicit-GEMM convolution
# kernels and their backward, the new CUDA default) against im2col and PyTorch eager on the same
# card: the ImageNet-64 ADM at batch 8 (whole steps and building blocks) and at batch 40 (bf16),
# adm_tiny with the reference check, and the FID Inception. .carry/ holds dmd.xz (the stripped
# `dmd`), edm/ (NVlabs/edm's dnnlib, torch_utils, training) and reference/edm.
set -u
OUTDIR="${DEST:-results/bench/cuda/out7}"; BUDGET=${BUDGET:-440}
. results/bench/cuda/common.sh
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1"
PY="python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json"
run 75 dmd_in64_b8_gemm $B8 --iters 3 --train-iters 3 --ops --json "$OUTDIR/dmd_in64_b8_gemm.json"
run 45 torch_in64_b8 $PY --batch 8 --iters 3 --ops --json "$OUTDIR/torch_in64_b8.json"
run 60 dmd_tiny_gemm /tmp/dmd bench --device cuda --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1,35 --json "$OUTDIR/dmd_tiny_gemm.json"
run 90 dmd_in64_b40_bf16_gemm /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 40 --sampling 1 --warmup 1 --iters 3 --train-iters 2 --bf16 --json "$OUTDIR/dmd_in64_b40_bf16_gemm.json"
run 45 torch_in64_b40_bf16 $PY --batch 40 --iters 3 --bf16 --json "$OUTDIR/torch_in64_b40_bf16.json"
run 60 dmd_in64_b8_im2col env DMD_CONV=im2col $B8 --iters 3 --train-iters 2 --json "$OUTDIR/dmd_in64_b8_im2col.json"
run 40 dmd_fid /tmp/dmd bench --device cuda --fid --no-train --sampling 1 --fid-batch 32 --iters 3
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
